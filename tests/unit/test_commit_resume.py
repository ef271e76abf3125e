"""The commit protocol (data/commit.py) and the resume planner (data/resume.py), without Ray: every state a
kill can leave behind, and every reason an earlier row is not enough."""

from __future__ import annotations

import hashlib
import os

import pyarrow as pa
import pytest

from raypdm.data.commit import publish, recover, staged_uri, write_staged
from raypdm.data.layout import list_images
from raypdm.data.manifest import Manifest
from raypdm.data.resume import plan_resume

CHASH = "cfg-1"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _dataset(root, n=4):
    for i in range(n):
        p = root / "id000" / "set_A" / f"{i:04d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(f"input-{i}".encode() * 10)
    refs, problems = list_images(str(root), splits=("set_A",))
    assert not problems and len(refs) == n
    return refs


def _commit(out, refs, manifest: Manifest, payload=b"output", chash=CHASH, rename=True):
    """What a stage does for each ref: stage the file, append its row, rename (unless `rename=False`)."""
    rows = []
    for ref in refs:
        final = str(out / ref.identity / ref.split / ref.name)
        data = payload + ref.name.encode()
        write_staged(final, data, manifest.run_id)
        rows.append({"identity": ref.identity, "split": ref.split, "name": ref.name, "src_uri": ref.src_uri,
                     "uri": final, "input_sha256": _sha(open(ref.src_uri, "rb").read()),
                     "input_bytes": ref.size, "input_mtime": ref.mtime, "output_sha256": _sha(data),
                     "output_bytes": len(data), "stage": "t", "config_hash": chash})
    table = manifest.stamp(pa.Table.from_pylist(rows))
    manifest.append(table)
    if rename:
        assert publish(table, manifest.run_id) == len(refs)
    return table


def _latest(out):
    return Manifest(str(out)).read().to_pylist()


def test_publish_renames_only_after_the_rows_and_fills_the_run_id(tmp_path):
    refs = _dataset(tmp_path / "in")
    out = tmp_path / "out"
    m = Manifest(str(out))
    _commit(out, refs, m)
    rows = _latest(out)
    assert len(rows) == 4 and {r["run_id"] for r in rows} == {m.run_id}
    for r in rows:
        data = open(r["uri"], "rb").read()
        assert _sha(data) == r["output_sha256"] and len(data) == r["output_bytes"]
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def test_recover_rolls_committed_files_forward_and_removes_the_rest(tmp_path):
    refs = _dataset(tmp_path / "in")
    out = tmp_path / "out"
    old = Manifest(str(out))
    _commit(out, refs, old, payload=b"old")  # a finished earlier run
    # Killed between the rows and the rename: rows durable for refs 0-1, files still staged.
    new = Manifest(str(out))
    _commit(out, refs[:2], new, payload=b"new!", rename=False)
    # Killed before the rows: ref 2 staged by the same run, no row.
    write_staged(str(out / "id000" / "set_A" / refs[2].name), b"orphan", new.run_id)
    # A plain atomic write's temporary file from a crash (raypdm.data.uri.write_bytes).
    (out / "id000" / "set_A" / "0003.png.tmp-deadbeef").write_bytes(b"x")

    result = recover(str(out), _latest(out))
    assert (result.rolled_forward, result.removed) == (2, 2)
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    for r in _latest(out):  # every file is what its row says
        data = open(r["uri"], "rb").read()
        assert _sha(data) == r["output_sha256"], r["name"]
    assert open(out / "id000" / "set_A" / refs[2].name, "rb").read().startswith(b"old")
    assert recover(str(out), _latest(out)).rolled_forward == 0  # idempotent


def test_a_staged_file_of_another_size_than_its_row_is_not_rolled_forward(tmp_path):
    refs = _dataset(tmp_path / "in", n=1)
    out = tmp_path / "out"
    m = Manifest(str(out))
    table = _commit(out, refs, m, rename=False)
    staged = staged_uri(table.column("uri")[0].as_py(), m.run_id)
    with open(staged, "ab") as f:
        f.write(b"garbage")
    assert (recover(str(out), _latest(out)).removed, os.path.exists(staged)) == (1, False)


def test_plan_skips_verified_rows_without_reading_anything(tmp_path, monkeypatch):
    refs = _dataset(tmp_path / "in")
    out = tmp_path / "out"
    _commit(out, refs, Manifest(str(out)))
    import raypdm.data.resume as resume

    monkeypatch.setattr(resume, "_sha256_of", lambda uri: pytest.fail(f"hashed {uri}"))
    plan = plan_resume(refs, _latest(out), CHASH, str(out))
    assert (plan.skipped, plan.verified, plan.todo, dict(plan.recomputed)) == (4, 4, [], {})


def test_plan_recomputes_missing_truncated_and_altered_outputs_and_says_why(tmp_path):
    refs = _dataset(tmp_path / "in", n=5)
    out = tmp_path / "out"
    _commit(out, refs, Manifest(str(out)))
    rows = {r["name"]: r for r in _latest(out)}
    os.remove(rows["0000.png"]["uri"])
    with open(rows["0001.png"]["uri"], "r+b") as f:
        f.truncate(3)
    altered = bytearray(open(rows["0002.png"]["uri"], "rb").read())
    altered[0] ^= 1  # same size, other bytes: only a hash sees it
    open(rows["0002.png"]["uri"], "wb").write(bytes(altered))

    size_plan = plan_resume(refs, _latest(out), CHASH, str(out))
    assert dict(size_plan.recomputed) == {"missing": 1, "size": 1}
    assert sorted(r.name for r in size_plan.todo) == ["0000.png", "0001.png"] and size_plan.skipped == 3
    full = plan_resume(refs, _latest(out), CHASH, str(out), verify="full")
    assert dict(full.recomputed) == {"missing": 1, "size": 1, "hash": 1}
    assert sorted(r.name for r in full.todo) == ["0000.png", "0001.png", "0002.png"] and full.skipped == 2


def test_plan_config_change_runtime_failure_and_changed_inputs(tmp_path):
    refs = _dataset(tmp_path / "in", n=4)
    out = tmp_path / "out"
    m = Manifest(str(out))
    _commit(out, refs, m)
    m.append([{"identity": "id000", "split": "set_A", "name": "0003.png", "src_uri": refs[3].src_uri,
               "input_sha256": "x", "stage": "t", "config_hash": CHASH, "error": "oom", "error_kind": "runtime"}])
    # 0000: touched (new time, same bytes): hashed here and skipped. 0001: new bytes of the same size.
    st = os.stat(refs[0].src_uri)
    os.utime(refs[0].src_uri, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    data = open(refs[1].src_uri, "rb").read()
    open(refs[1].src_uri, "wb").write(data[::-1])
    os.utime(refs[1].src_uri, ns=(st.st_atime_ns, st.st_mtime_ns + 7_000_000_000))
    fresh, _ = list_images(str(tmp_path / "in"), splits=("set_A",))

    plan = plan_resume(fresh, _latest(out), CHASH, str(out))
    assert dict(plan.recomputed) == {"input changed": 1, "failed before": 1}
    assert sorted(r.name for r in plan.todo) == ["0001.png", "0003.png"] and plan.skipped == 2
    other = plan_resume(fresh, _latest(out), "cfg-2", str(out))
    assert dict(other.recomputed) == {"config changed": 4} and other.skipped == 0


def test_plan_of_an_empty_output_is_every_input(tmp_path):
    refs = _dataset(tmp_path / "in", n=2)
    plan = plan_resume(refs, [], CHASH, str(tmp_path / "nothing"))
    assert plan.todo == refs and plan.skipped == 0 and not plan.recomputed
    with pytest.raises(ValueError, match="verify"):
        plan_resume(refs, [], CHASH, str(tmp_path), verify="sometimes")


def test_an_input_that_now_fails_leaves_no_stale_output_and_nothing_outside_is_removed(tmp_path):
    from raypdm.data.commit import discard_stale

    refs = _dataset(tmp_path / "in", n=2)
    out = tmp_path / "out"
    _commit(out, refs, Manifest(str(out)))
    outside = tmp_path / "set_A" / "victim.png"  # what out/../set_A/victim.png would reach
    outside.parent.mkdir()
    outside.write_bytes(b"keep me")
    failed = pa.Table.from_pylist([
        {"identity": "id000", "split": "set_A", "name": "0000.png", "error": "decode failed"},
        {"identity": "id000", "split": "set_A", "name": "0001.png", "error": None},
        {"identity": "..", "split": "set_A", "name": "victim.png", "error": "bad name"},  # never a path
    ])
    discard_stale(str(out), failed)
    assert not (out / "id000" / "set_A" / "0000.png").exists()  # its row is an error now: the file goes
    assert (out / "id000" / "set_A" / "0001.png").exists()
    assert outside.read_bytes() == b"keep me"


def test_publish_on_a_store_bulk_moves_falls_back_and_never_leaves_a_row_without_its_file():
    """memory:// stands in for an object store (no rename: copy + delete)."""
    import fsspec

    from raypdm.data.commit import publish, staged_uri

    fs = fsspec.filesystem("memory")
    root = "memory://pubtest"
    finals = [f"{root}/id0/set_A/{n}.png" for n in "abc"]
    for f in finals:
        fs.pipe_file(staged_uri(f, "r1"), b"png-" + f[-5:].encode())
    rows = pa.Table.from_pylist([{"uri": f, "error": None, "run_id": "r1"} for f in finals])
    assert publish(rows, "r1") == 3
    assert [fs.cat_file(f) for f in finals] == [b"png-" + f[-5:].encode() for f in finals]
    assert not [p for p in fs.find("/pubtest") if ".tmp-" in p]
    # one already moved by an earlier call: the bulk copy fails, file by file finishes the others
    more = [f"{root}/id0/set_A/{n}.png" for n in "de"]
    fs.pipe_file(staged_uri(more[1], "r2"), b"e")
    fs.pipe_file(more[0], b"d")  # its staged copy is gone, its final is there
    assert publish(pa.Table.from_pylist([{"uri": f, "error": None, "run_id": "r2"} for f in more]), "r2") == 1
    assert fs.cat_file(more[1]) == b"e"
    # neither staged nor final: raise rather than keep a row that describes no file
    with pytest.raises(FileNotFoundError):
        publish(pa.Table.from_pylist([{"uri": f"{root}/id0/set_A/ghost.png", "error": None, "run_id": "r3"}]), "r3")


def test_recover_on_a_store_rolls_forward_and_removes_staged_objects():
    """Before the fix, a store's bare keys were checked as local paths, refused, and left behind."""
    import fsspec

    fs = fsspec.filesystem("memory")
    root = "memory://recovertest"
    kept, orphan = f"{root}/id0/set_A/a.png", f"{root}/id0/set_A/b.png"
    fs.pipe_file(staged_uri(kept, "r1"), b"abc")
    fs.pipe_file(staged_uri(orphan, "r1"), b"xyz")
    latest = [{"uri": kept, "error": None, "run_id": "r1", "output_bytes": 3}]
    result = recover(root, latest)
    assert (result.rolled_forward, result.removed) == (1, 1)
    assert fs.cat_file(kept) == b"abc" and not fs.exists(orphan)
    assert not [p for p in fs.find("/recovertest") if ".tmp-" in p]
