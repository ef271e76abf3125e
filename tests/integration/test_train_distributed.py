"""One identity on Ray Train V2: DeepSpeed ZeRO-2 on 2 CPU workers, resume after a killed worker, DDP.

Tiny SD 2.1 preset at 32 px, 2 instance images and 2 class images, a few steps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from raypdm.data.synthetic import make_synthetic
from raypdm.train import TrainConfig, cdl_prompts
from raypdm.train.distributed import DistributedConfig, FailOnceAt, IdentityTrainJob, run_identity_training

pytestmark = pytest.mark.ray

SIZE = 32


@pytest.fixture(autouse=True)
def fast_polling(monkeypatch):
    # Ray Train V2's controller collects reports every 2 s and a worker's next report waits for that;
    # the driver propagates this variable to the controller and workers of the runs it starts.
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist-data")
    data = root / "data"
    make_synthetic(str(data), identities=1, images=2, size=SIZE)
    # Class-prior images: the same generator's faces of another seed, flat in one folder.
    made = make_synthetic(str(root / "prior-src"), identities=1, images=2, size=SIZE, seed=7, splits=("set_A",))
    classes = root / "class_images"
    classes.mkdir()
    for i, uri in enumerate(sorted(made)):
        (classes / f"{i:04d}.png").write_bytes(Path(uri).read_bytes())
    return str(data), str(classes)


def job(dataset, output, *, steps, **dist) -> IdentityTrainJob:
    data, classes = dataset
    return IdentityTrainJob(
        identity="id000",
        data=data,
        output=str(output),
        class_images=classes,
        preset="tiny",
        train=TrainConfig(steps=steps, lr=1e-4, resolution=SIZE, seed=1),
        prompts=cdl_prompts(),
        distributed=DistributedConfig(gpus_per_worker=0, **dist),
    )


def checkpoints(output: Path) -> list[Path]:
    return sorted(p for p in (output / "train").glob("checkpoint_*") if p.is_dir())


def assert_export_loads(export_uri: str) -> None:
    from diffusers import StableDiffusionPipeline

    export = Path(export_uri)
    assert (export / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert not list(export.rglob("*.bin"))
    pipe = StableDiffusionPipeline.from_pretrained(str(export), local_files_only=True)
    assert pipe.unet.config.sample_size is not None
    info = json.loads((export / "cdl_prompts.json").read_text())
    assert info["prompts"]["token"] == "t@j"


@pytest.mark.slow
def test_zero2_two_cpu_workers_trains_checkpoints_and_exports(ray_local, dataset, tmp_path):
    out = tmp_path / "id000"
    cfg = job(dataset, out, steps=4, backend="deepspeed", zero_stage=2, workers=2,
              checkpoint_every=2, report_every=1, quality_every=2)  # fmt: skip
    result = run_identity_training(cfg)

    assert result.steps == 4 and result.attempts == 1
    assert [m["step"] for m in result.losses] == [1, 2, 3, 4]
    assert all(math.isfinite(m[k]) for m in result.losses for k in ("loss", "instance_loss", "prior_loss"))
    assert [m["step"] for m in result.losses if "val_loss" in m] == [2, 4]
    assert math.isfinite(result.final_loss) and result.final_loss == result.losses[-1]["loss"]

    kept = checkpoints(out)
    assert len(kept) == 1, kept
    ckpt = kept[0]
    assert result.checkpoint_uri == str(ckpt)
    state = json.loads((ckpt / "state.json").read_text())
    assert state == {**state, "step": 4, "backend": "deepspeed", "world_size": 2, "zero_stage": 2}
    assert (ckpt / "unet.safetensors").exists() and (ckpt / "text_encoder.safetensors").exists()
    shards = sorted(p.name for p in (ckpt / "deepspeed").glob("*optim_states.pt"))
    assert len(shards) == 2, shards  # one ZeRO optimizer shard per rank, merged into one checkpoint

    # The checkpoint's weights are the trained ones, and the export holds exactly them.
    from safetensors.torch import load_file

    from raypdm import models

    trained = load_file(str(ckpt / "unet.safetensors"))
    base = models.build("sd21-base", preset="tiny").unet.state_dict()
    assert any(not torch.equal(trained[k], base[k]) for k in base)
    exported = load_file(str(Path(result.export_uri) / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(exported[k], trained[k]) for k in trained)
    assert_export_loads(result.export_uri)


@pytest.mark.slow
def test_killed_worker_resumes_from_checkpoint_and_continues_the_step_count(ray_local, dataset, tmp_path):
    out = tmp_path / "id000"
    flag = tmp_path / "failed-once"
    cfg = job(dataset, out, steps=5, backend="deepspeed", zero_stage=2, workers=2, max_failures=1,
              checkpoint_every=2, report_every=1, quality_every=100)  # fmt: skip
    result = run_identity_training(cfg, step_hook=FailOnceAt(3, flag, delay_s=1.0))

    assert flag.exists()  # a worker did die after completing step 3 (before reporting it)
    assert result.attempts == 2
    assert result.steps == 5
    steps = [m["step"] for m in result.losses]
    assert steps == [1, 2, 3, 4, 5]  # every step exactly once: nothing restarted from 0
    first = [m for m in result.losses if m["attempt"] == 1]
    second = [m for m in result.losses if m["attempt"] == 2]
    assert [m["step"] for m in first] == [1, 2] and all(m["start_step"] == 0 for m in first)
    assert [m["step"] for m in second] == [3, 4, 5] and all(m["start_step"] == 2 for m in second)
    assert all(math.isfinite(m["loss"]) for m in result.losses)
    assert len(checkpoints(out)) == 1
    assert json.loads((checkpoints(out)[0] / "state.json").read_text())["step"] == 5
    assert Path(result.export_uri, "model_index.json").exists()


@pytest.mark.slow
def test_ddp_single_worker(ray_local, dataset, tmp_path):
    out = tmp_path / "id000"
    cfg = job(dataset, out, steps=3, backend="ddp", workers=1, checkpoint_every=2, report_every=2, quality_every=2)
    result = run_identity_training(cfg)

    assert result.steps == 3 and result.attempts == 1
    assert [m["step"] for m in result.losses] == [2, 3]
    assert all("val_loss" in m and math.isfinite(m["val_loss"]) for m in result.losses)
    kept = checkpoints(out)
    assert len(kept) == 1
    assert (kept[0] / "trainer_state.pt").exists()
    assert json.loads((kept[0] / "state.json").read_text())["backend"] == "ddp"
    assert_export_loads(result.export_uri)

    # A rerun with the same output resumes the finished run: no step trained again, same export.
    again = run_identity_training(cfg)
    assert again.steps == 3 and [m["step"] for m in again.losses] == [2, 3]
    assert again.attempts == 1


def test_config_validation():
    with pytest.raises(ValueError, match="offload_optimizer"):
        DistributedConfig(zero_stage=0, offload_optimizer=True)
    with pytest.raises(ValueError):
        DistributedConfig(zero_stage=4)
    assert DistributedConfig(gpus_per_worker=0).resolved_cpus_per_worker() == 0.5
    assert DistributedConfig().resolved_cpus_per_worker() == 1.0
    with pytest.raises(ValueError):
        IdentityTrainJob(identity="../x", data="d", output="o", class_images="c")
