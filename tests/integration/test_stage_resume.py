"""A stage on a local Ray: error rows, resume, interruption, retry of passing failures."""

import os

import numpy as np
import pytest

from raypdm.data.manifest import Manifest
from raypdm.data.synthetic import make_synthetic
from raypdm.pipelines.purify import PurifyConfig, run_purify
from raypdm.pipelines.stage import ImageStage, run_image_stage

pytestmark = pytest.mark.ray


def _dataset_with_broken_files(root):
    """40 files: 37 good images and 3 broken ones (zero bytes, truncated, not an image)."""
    make_synthetic(str(root), identities=2, images=6, size=32, seed=1)  # 2 * 3 * 6 = 36 images
    a = root / "id000" / "set_A"
    (a / "extra.png").write_bytes((a / "0000.png").read_bytes()[::-1][::-1])  # 37th good image (same bytes)
    (a / "empty.png").write_bytes(b"")
    good = (a / "0001.png").read_bytes()
    (a / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "id001" / "set_B" / "notes.jpg").write_text("not an image")


def _snapshot(out):
    return {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "_manifest_parts" not in str(p)}


@pytest.mark.slow
def test_broken_files_become_error_rows_and_rerun_writes_nothing(ray_local, tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    _dataset_with_broken_files(data)
    cfg = PurifyConfig(input=str(data), output=str(out), purifier="jpeg", batch_size=4, lpips_backbone="random")
    first = run_purify(cfg)
    assert (first.total, first.processed, first.errors) == (40, 37, 3)

    table = Manifest(str(out)).read().to_pylist()
    assert len(table) == 40
    errors = {r["name"]: r["error"] for r in table if r["error"]}
    assert set(errors) == {"empty.png", "truncated.png", "notes.jpg"}
    assert "empty" in errors["empty.png"] and "truncated" in errors["truncated.png"]
    assert all(r["error_kind"] == "input" for r in table if r["error"])
    pngs = [p for p in out.rglob("*.png")]
    assert len(pngs) == 37
    ok = [r for r in table if not r["error"]]
    assert all(os.path.exists(r["uri"]) and r["output_sha256"] and r["config_hash"] for r in ok)
    assert (out / "config.yaml").exists()

    before = _snapshot(out)
    second = run_purify(cfg)
    assert (second.processed, second.skipped, second.errors) == (0, 40, 0)
    after = _snapshot(out)
    changed = {p for p in after if after[p] != before.get(p)}
    assert changed <= {out / "config.yaml"}, f"re-run rewrote {changed}"
    assert Manifest(str(out)).read().num_rows == 40

    # A changed config is a new key: everything is processed again, still one row per image.
    third = run_purify(cfg.model_copy(update={"options": {"jpeg": {"quality": 50}}}))
    assert third.processed == 37 and Manifest(str(out)).read().num_rows == 40


class _Interrupt(Exception):
    pass


def _counting_transform(log_path):
    def make():
        def transform(images):
            with open(log_path, "a") as f:
                f.write(f"{len(images)}\n")
            return [np.ascontiguousarray(255 - im) for im in images]

        return transform

    return make


def _stage(log_path, name="invert"):
    return ImageStage(name=name, config={"invert": 1}, config_hash="inv1", make_transform=_counting_transform(log_path),
                      batch_size=2)


def test_interrupted_run_resumes_without_duplicates(ray_local, tmp_path):
    data, out, log = tmp_path / "data", tmp_path / "out", tmp_path / "calls.log"
    make_synthetic(str(data), identities=2, images=5, size=24)  # 30 images

    def stop_early(done, total):
        if done >= 8:
            raise _Interrupt()

    with pytest.raises(_Interrupt):
        run_image_stage(_stage(log), str(data), str(out), progress=stop_early, flush_rows=1)
    kept = Manifest(str(out)).read().num_rows
    assert 8 <= kept < 30  # rows that finished before the interruption were persisted

    summary = run_image_stage(_stage(log), str(data), str(out))
    assert summary.skipped == kept and summary.processed == 30 - kept
    table = Manifest(str(out)).read()
    assert table.num_rows == 30
    assert len({(r["identity"], r["split"], r["name"]) for r in table.to_pylist()}) == 30
    assert not (out / "_manifest_parts").exists() or not list((out / "_manifest_parts").iterdir())

    log.write_text("")
    again = run_image_stage(_stage(log), str(data), str(out))
    assert again.processed == 0 and again.skipped == 30 and log.read_text() == ""


def _flaky_transform(flag_path):
    def make():
        def transform(images):
            # Fails on dark images while the flag file exists: a passing failure (runtime error).
            if os.path.exists(flag_path) and any(im.mean() < 30 for im in images):
                raise RuntimeError("simulated device error")
            return images

        return transform

    return make


def test_runtime_errors_are_isolated_and_retried(ray_local, tmp_path):
    data, out, flag = tmp_path / "data", tmp_path / "out", tmp_path / "flag"
    make_synthetic(str(data), identities=1, images=2, size=24)
    dark = data / "id000" / "set_A" / "0000.png"
    from raypdm.data.decode import encode_png

    dark.write_bytes(encode_png(np.full((24, 24, 3), 10, np.uint8)))
    flag.write_text("on")
    stage = ImageStage(name="flaky", config={}, config_hash="f1", make_transform=_flaky_transform(str(flag)), batch_size=8)
    first = run_image_stage(stage, str(data), str(out))
    assert first.errors >= 1 and first.processed >= 1  # the batch was split: good images still finished
    rows = {r["name"]: r for r in Manifest(str(out)).read().to_pylist() if r["split"] == "set_A"}
    assert rows["0000.png"]["error_kind"] == "runtime" and "simulated device error" in rows["0000.png"]["error"]

    flag.unlink()
    second = run_image_stage(stage, str(data), str(out))
    assert second.processed == first.errors and second.errors == 0
    assert all(r["error"] is None for r in Manifest(str(out)).read().to_pylist())


def _crashing_transform(flag_path):
    def make():
        def transform(images):
            # The process dies on dark images (a segfault in native code, the OS's OOM killer) while the
            # flag file exists: no Python exception to catch, the actor is gone.
            if os.path.exists(flag_path) and any(im.mean() < 30 for im in images):
                os._exit(1)
            return images

        return transform

    return make


@pytest.mark.slow
def test_an_image_whose_actor_dies_every_time_becomes_an_error_row_not_a_hang(ray_local, tmp_path):
    data, out, flag = tmp_path / "data", tmp_path / "out", tmp_path / "flag"
    make_synthetic(str(data), identities=1, images=3, size=24)
    from raypdm.data.decode import encode_png

    (data / "id000" / "set_A" / "0000.png").write_bytes(encode_png(np.full((24, 24, 3), 10, np.uint8)))
    flag.write_text("on")
    stage = ImageStage(name="crashy", config={}, config_hash="c1", make_transform=_crashing_transform(str(flag)),
                       uses_model=True, batch_size=1)
    first = run_image_stage(stage, str(data), str(out))
    rows = {(r["split"], r["name"]): r for r in Manifest(str(out)).read().to_pylist()}
    assert len(rows) == 9 and first.errors == 1 and first.processed == 8
    dead = rows[("set_A", "0000.png")]
    assert dead["error_kind"] == "runtime" and "worker died and was retried" in dead["error"]
    assert not (out / "id000" / "set_A" / "0000.png").exists()
    flag.unlink()
    second = run_image_stage(stage, str(data), str(out))
    assert second.processed == 1 and second.skipped == 8 and second.errors == 0
