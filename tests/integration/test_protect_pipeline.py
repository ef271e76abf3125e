"""`raypdm protect` on a local Ray cluster: the saved-file bound, copied splits, resume, and per-identity
methods that run identities side by side and only ever see their own images."""

import numpy as np
import pytest
from PIL import Image

from raypdm.data.manifest import Manifest
from raypdm.data.synthetic import make_synthetic
from raypdm.pipelines.protect import ProtectJobConfig, run_protect

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("one_torch_thread")]
R = 11 / 255


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("protect") / "data"
    make_synthetic(str(root), identities=2, images=2, seed=0, size=64, real_photos=False)
    return root


def _png(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.mark.slow
def test_advdm_stage_bound_copy_and_resume(ray_local, dataset, tmp_path):
    out = tmp_path / "advdm"
    cfg = ProtectJobConfig(input=str(dataset), output=str(out), method="advdm", options={"steps": 2, "resample": False},
                           lpips_backbone="random")
    protect, copy = run_protect(cfg)
    assert protect.processed == 4 and protect.errors == 0 and copy.processed == 2 * 2 * 2
    rows = Manifest(str(out)).read().to_pandas()
    a = rows[rows["split"] == "set_A"]
    assert len(a) == 4 and (a["loss_after"] > a["loss_before"]).all()
    for r in a.itertuples():
        # measured on the saved PNG against the clean input
        delta = np.abs(_png(r.uri) - _png(r.src_uri)).max() / 255
        assert delta <= R + 1e-9 and r.linf == pytest.approx(delta) and r.l2 > 0 and r.lpips >= 0
    b = rows[rows["split"] == "set_B"].iloc[0]
    assert (_png(b.uri) == _png(b.src_uri)).all()  # clean references are copied unchanged
    again = run_protect(cfg)
    assert again[0].processed == 0 and again[0].skipped == 4 and again[1].processed == 0


def _barrier(ray, parties: int):
    """An async actor that lets callers through once `parties` distinct names have arrived. Defined inside
    a function so Ray ships the class by value (workers cannot import this test module)."""
    import asyncio
    import time

    @ray.remote(num_cpus=0)
    class Barrier:
        def __init__(self):
            self.names: set[str] = set()

        async def arrive(self, name: str, timeout: float) -> bool:
            self.names.add(name)
            deadline = time.monotonic() + timeout
            while len(self.names) < parties and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return len(self.names) >= parties

        def arrived(self) -> list[str]:
            return sorted(self.names)

    return Barrier.remote()


@pytest.mark.slow  # two actor pools, each a fresh process that imports diffusers (~5 s): 16 s on 2 cores
def test_per_identity_method_isolated_and_concurrent(ray_local, dataset, tmp_path):
    opts = {"steps": 2, "finetune_steps": 1, "resolution": 64, "num_class_images": 2, "class_prior_steps": 2,
            "gradient_checkpointing": False, "eval_timesteps": 2}
    both = ProtectJobConfig(input=str(dataset), output=str(tmp_path / "both"), method="fsmg", options=opts,
                            lpips_backbone="random", copy_splits=False, cpus_per_identity=0.5)
    # Concurrency is proven with a barrier, not with wall-clock spans (worker start-up on a loaded 2-core
    # machine can take longer than a tiny identity's whole task): each identity's task waits inside until
    # the other one has started too, so the run only succeeds if both tasks were running at once.
    barrier = _barrier(ray_local, parties=2)

    def wait_for_the_other(identity):
        if not ray_local.get(barrier.arrive.remote(identity, 300.0)):
            raise RuntimeError(f"{identity} ran alone: the other identity's task never started beside it")

    [summary] = run_protect(both, on_identity_start=wait_for_the_other)
    rows = Manifest(str(tmp_path / "both")).read().to_pandas()
    assert summary.errors == 0, rows["error"].dropna().tolist()
    assert summary.processed == 4
    assert sorted(ray_local.get(barrier.arrived.remote())) == ["id000", "id001"]
    assert (rows["linf"] <= R + 1e-9).all()
    # the first identity alone gives bit-identical outputs: nothing leaks between identities
    first = sorted(set(rows["identity"]))[0]
    alone = ProtectJobConfig(input=str(dataset), output=str(tmp_path / "alone"), method="fsmg", options=opts,
                             lpips_backbone="random", copy_splits=False, identities=[first])
    run_protect(alone)
    solo = Manifest(str(tmp_path / "alone")).read().to_pandas()
    assert set(solo["identity"]) == {first}
    for r in solo.itertuples():
        other = rows[(rows["identity"] == first) & (rows["name"] == r.name)].iloc[0]
        assert (_png(r.uri) == _png(other.uri)).all()
    again = run_protect(both)
    assert again[0].processed == 0 and again[0].skipped == 4


@pytest.mark.slow
def test_an_identity_whose_worker_dies_becomes_error_rows_and_the_others_finish(ray_local, dataset, tmp_path):
    """The OS killing an identity's actor (here: os._exit on every try) costs that identity only: after its
    retry it becomes runtime error rows, the other identity's images are committed, and a re-run (the
    worker healthy again) does just the failed identity."""
    opts = {"steps": 2, "finetune_steps": 1, "resolution": 64, "num_class_images": 2, "class_prior_steps": 2,
            "gradient_checkpointing": False, "eval_timesteps": 2}
    cfg = ProtectJobConfig(input=str(dataset), output=str(tmp_path / "dies"), method="fsmg", options=opts,
                           lpips_backbone="random", copy_splits=False, cpus_per_identity=0.5)

    def die_on_id001(identity):
        if identity == "id001":
            import os

            os._exit(1)

    [summary] = run_protect(cfg, on_identity_start=die_on_id001)
    rows = Manifest(str(tmp_path / "dies")).read().to_pandas()
    assert summary.processed == 2 and summary.errors == 2
    dead = rows[rows["identity"] == "id001"]
    assert len(dead) == 2 and dead["error"].str.contains("worker died and was retried").all()
    assert (dead["error_kind"] == "runtime").all() and dead["uri"].isna().all()
    assert rows[rows["identity"] == "id000"]["error"].isna().all()
    assert not (tmp_path / "dies" / "id001").exists()  # nothing half-written for the dead identity
    [again] = run_protect(cfg)
    assert again.processed == 2 and again.skipped == 2 and again.errors == 0
