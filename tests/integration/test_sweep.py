"""`raypdm sweep` on a local Ray cluster: one fine-tune per (token, identity) serves every w; a failing
trial is recorded and the sweep finishes; a re-run resumes without re-running finished trials."""

import shutil

import pandas as pd
import pytest

from raypdm.data.synthetic import make_synthetic
from raypdm.search.sweep import SweepConfig, run_sweep

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    good = root / "good"
    make_synthetic(str(good), identities=1, images=2, seed=0, size=64, real_photos=False)
    broken = root / "broken"  # same layout, every training image corrupt: its trials fail inside
    shutil.copytree(good, broken)
    for f in (broken / "id000" / "set_A").iterdir():
        f.write_bytes(b"not an image")
    return good, broken


def test_sweep_rows_failures_and_resume(ray_local, datasets, tmp_path):
    good, broken = datasets
    cfg = SweepConfig(
        output=str(tmp_path / "sweep"), reference=str(good), preset="tiny",
        space={"tokens": ["t@j", "bhi"], "w": [3.0, 7.5], "data": {"good": str(good), "broken": str(broken)}},
        train={"steps": 2, "resolution": 64, "gradient_checkpointing": False}, report_every=1, probe_images=1,
        sampling={"num_images": 1, "steps": 2, "size": 64, "batch_size": 1},
        class_prior={"count": 2, "steps": 2, "resolution": 64}, max_concurrent=2, max_failures=0,
    )
    out = run_sweep(cfg, log=lambda m: None)
    trials, results = out["trials"], out["results"]
    assert len(trials) == 4
    assert set(trials[trials["data"] == "broken"]["status"]) == {"error"}
    assert set(trials[trials["data"] == "good"]["status"]) == {"done"}
    final = results[(results["final"] == True) & (results["data"] == "good")]  # noqa: E712
    # one training per (trial, identity): every w comes from the same 2-step model
    for _, g in final.groupby(["trial", "identity"]):
        assert sorted(g["w"]) == [3.0, 7.5] and set(g["steps_trained"]) == {2} and set(g["step"]) == {2}
    probes = results[(results["final"] == False) & (results["data"] == "good")]  # noqa: E712
    assert len(probes) == 2 and set(probes["step"]) == {1}  # an intermediate report per trial for ASHA
    errors = results[results["status"] == "error"]
    assert len(errors) == 2 and errors["error"].str.contains("no usable images").all()
    stored = pd.read_parquet(tmp_path / "sweep" / "results.parquet")
    for col in ("token", "template", "w", "negative_prompt", "identity", "ims", "ims_ip", "ims_vgg", "q", "liqe",
                "clip_iqac", "fdfr", "steps_trained", "seconds", "stopped_early"):
        assert col in stored.columns, col
    assert out["best"]["data"] == "good" and out["best"]["w"] in (3.0, 7.5)
    assert (tmp_path / "sweep" / "sweep_scores.png").stat().st_size > 1000

    parts = {p: p.stat().st_mtime_ns for p in (tmp_path / "sweep" / "trials").glob("*/part-*.parquet")}
    again = run_sweep(cfg, log=lambda m: None)
    assert {p: p.stat().st_mtime_ns for p in parts} == parts  # finished trials were not run again
    assert len(again["trials"]) == 4 and set(again["trials"][again["trials"]["data"] == "good"]["status"]) == {"done"}
