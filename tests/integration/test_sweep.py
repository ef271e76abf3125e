"""`raypdm sweep` on a local Ray cluster: one fine-tune per (token, identity) serves every w; a failing
trial is recorded and the sweep finishes; a re-run resumes without re-running finished trials."""

import shutil

import pandas as pd
import pytest

from raypdm.data.synthetic import make_synthetic
from raypdm.search.sweep import SweepConfig, run_sweep

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


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


def test_optuna_with_asha_keeps_repeated_points_apart(ray_local, datasets, tmp_path):
    """Optuna (TPE) proposing 3 trials over 2 tokens must repeat a point: each trial keeps its own rows.
    ASHA sees every probe report; a trial it stops is marked stopped early and is not a best candidate."""
    good, _ = datasets
    cfg = SweepConfig(
        output=str(tmp_path / "sweep"), data=str(good), reference=str(good), preset="tiny",
        space={"tokens": ["t@j", "bhi"], "w": [3.0]}, search="optuna", num_samples=3, scheduler="asha",
        asha={"grace_period": 1, "reduction_factor": 2},
        train={"steps": 2, "resolution": 64, "gradient_checkpointing": False}, report_every=1, probe_images=1,
        sampling={"num_images": 1, "steps": 2, "size": 64, "batch_size": 1},
        class_prior={"count": 2, "steps": 2, "resolution": 64}, max_concurrent=1, max_failures=0,
    )
    out = run_sweep(cfg, log=lambda m: None)
    trials, results = out["trials"], out["results"]
    assert len(trials) == 3 and trials["trial"].is_unique
    assert trials["token"].duplicated().any()  # the pigeonhole: some point was drawn twice
    assert set(trials["status"]) <= {"done", "stopped"} and (trials["status"] == "done").any()
    for trial in trials.itertuples():
        rows = results[results["trial"] == trial.trial]
        assert len(rows) and set(rows["token"]) == {trial.token}
        # a probe report per trial; a trial that finished has its final row
        assert (rows["final"] == False).sum() == 1  # noqa: E712
        if trial.status == "done":
            assert (rows["final"] == True).sum() == 1  # noqa: E712
        assert set(rows["stopped_early"]) == {trial.status == "stopped"}
    assert out["best"]["token"] in set(trials[trials["status"] == "done"]["token"])
