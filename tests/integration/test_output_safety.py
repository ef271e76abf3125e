"""Inputs are never touched and writes stay inside the output root (issue 27): typed as a user types them
(the CLI in a subprocess) where refusal is the point, and on the session's local Ray where rows are."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from test_demo import fresh_env, raypdm_cmd  # noqa: E402

from raypdm.data.layout import list_images  # noqa: E402
from raypdm.data.manifest import Manifest  # noqa: E402
from raypdm.data.synthetic import make_synthetic  # noqa: E402
from raypdm.pipelines.purify import PurifyConfig, run_purify  # noqa: E402

pytestmark = pytest.mark.ray


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("output", ["data", "data/out", "."])
def test_an_output_that_is_inside_or_contains_the_input_is_refused_before_anything_starts(tmp_path, output):
    cwd = tmp_path / "cwd"
    make_synthetic(str(cwd / "data"), identities=1, images=2, size=32, seed=0)
    before = _hashes(cwd)
    res = subprocess.run([*raypdm_cmd(), "purify", "--input", "data", "--output", output, "--purifier", "jpeg",
                          "--lpips", "random"], cwd=cwd, env=fresh_env(tmp_path), capture_output=True, text=True,
                         timeout=120, check=False)
    assert res.returncode != 0
    text = res.stdout + res.stderr
    assert "refusing to write into an input" in text and "--input" not in text.split("refusing")[0], text[-2000:]
    how = {"data": "is the same folder as", "data/out": "is inside", ".": "contains"}[output]
    assert f"{how} the input" in text, text[-2000:]
    assert "Traceback" not in text
    assert _hashes(cwd) == before  # nothing written, nothing changed


def test_a_planted_folder_symlink_gets_error_rows_and_nothing_is_written_outside(ray_local, tmp_path):
    data, out, elsewhere = tmp_path / "data", tmp_path / "out", tmp_path / "elsewhere"
    make_synthetic(str(data), identities=2, images=2, size=32, seed=0)
    out.mkdir()
    elsewhere.mkdir()
    (out / "id000").symlink_to(elsewhere, target_is_directory=True)  # planted inside the output root
    cfg = PurifyConfig(input=str(data), output=str(out), purifier="jpeg", lpips_backbone="random",
                       faithfulness=False)
    summary = run_purify(cfg)
    assert list(elsewhere.rglob("*")) == []  # nothing landed outside the root
    rows = Manifest(str(out)).read().to_pylist()
    planted = [r for r in rows if r["identity"] == "id000"]
    assert planted and all(r["error"] and "outside the output root" in r["error"] for r in planted)
    assert all(r["error"] is None for r in rows if r["identity"] == "id001")
    assert summary.errors == len(planted) == 6


def test_input_symlinks_outside_the_root_and_hidden_entries_are_reported_not_dropped(tmp_path):
    data, outside = tmp_path / "data", tmp_path / "outside"
    make_synthetic(str(data), identities=2, images=2, size=32, seed=0)
    make_synthetic(str(outside), identities=1, images=1, size=32, seed=1)
    a = data / "id000" / "set_A"
    (a / "escape.png").symlink_to(outside / "id000" / "set_A" / "0000.png")
    (a / "inside.png").symlink_to(a / "0000.png")  # a link within the root is fine
    (a / ".DS_Store").write_bytes(b"x")
    (a / "0001.png.tmp-20990101T000000000000Z-abcdef").write_bytes(b"x")
    (data / "id002").symlink_to(outside / "id000", target_is_directory=True)
    refs, problems = list_images(str(data))
    by_name = {r.name: r for r in refs if r.identity == "id000" and r.split == "set_A"}
    assert "outside the input root" in by_name["escape.png"].error
    assert by_name["inside.png"].error is None and by_name["inside.png"].size == by_name["0000.png"].size
    assert not any(r.identity == "id002" for r in refs)
    text = "\n".join(problems)
    assert "1 symlinked folders (follow_symlinks to read them) skipped: id002" in text
    assert "1 hidden entries skipped: id000/set_A/.DS_Store" in text
    assert "1 leftover temporary files" in text
    followed, _ = list_images(str(data), follow_symlinks=True)
    assert any(r.identity == "id002" for r in followed)
    assert all(r.error is None for r in followed if r.name == "escape.png")


@pytest.mark.parametrize("name", ["a\u202egnp.exe.png", "zero\u200bwidth.png", "bom\ufeff.png", "soft\u00adhyphen.png"])
def test_invisible_or_direction_changing_characters_make_error_rows(tmp_path, name):
    data = tmp_path / "data"
    make_synthetic(str(data), identities=1, images=1, size=32, seed=0)
    (data / "id000" / "set_A" / name).write_bytes((data / "id000" / "set_A" / "0000.png").read_bytes())
    refs, _ = list_images(str(data))
    bad = [r for r in refs if r.name == name]
    assert len(bad) == 1 and "invisible or direction-changing characters (U+" in bad[0].error
    assert all(r.error is None for r in refs if r.name != name)
