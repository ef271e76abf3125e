"""`raypdm train`: identities train concurrently on Ray Tune + Ray Train; one failing does not stop the others;
a re-run skips identities already trained."""

import shutil

import pytest

from raypdm.config import ConfigError, resolve_config
from raypdm.data.synthetic import make_synthetic
from raypdm.pipelines.train import TrainJobConfig, run_train

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _config(data, out, **extra):
    base = {
        "data": str(data), "output": str(out), "preset": "tiny",
        "train": {"steps": 3, "resolution": 32, "gradient_checkpointing": False},
        "distributed": {"backend": "ddp", "workers": 1, "gpus_per_worker": 0, "cpus_per_worker": 0.25,
                        "checkpoint_every": 2, "report_every": 1, "quality_every": 2, "max_failures": 0},
        "class_prior": {"count": 2, "steps": 2, "resolution": 32, "workers": 1},
        "max_concurrent": 2, "retries": 0,
    }
    base.update(extra)
    return resolve_config(TrainJobConfig, flags=base)


def test_two_identities_train_concurrently_and_a_failure_is_isolated(ray_local, tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    make_synthetic(str(data), identities=2, images=2, size=32, splits=("set_A",))
    broken = data / "id002" / "set_A"
    broken.mkdir(parents=True)
    (broken / "0000.png").write_bytes(b"not a png")
    # A folder symlink planted where id003's model would go: refused before training, nothing written there.
    shutil.copytree(data / "id000", data / "id003")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    (out / "id003").symlink_to(elsewhere, target_is_directory=True)

    outcomes = {o["identity"]: o for o in run_train(_config(data, out))}
    assert outcomes["id000"]["status"] == outcomes["id001"]["status"] == "trained"
    assert outcomes["id002"]["status"] == "failed" and outcomes["id002"]["error"]
    assert outcomes["id003"]["status"] == "failed" and "outside the output root" in outcomes["id003"]["error"]
    assert list(elsewhere.iterdir()) == []
    for ident in ("id000", "id001"):
        assert outcomes[ident]["steps"] == 3
        assert (out / ident / "export" / "unet" / "config.json").exists()
    assert (out / "train_summary.parquet").exists() and (out / "train_config.yaml").exists()

    again = {o["identity"]: o for o in run_train(_config(data, out, identities=["id000", "id001"]))}
    assert again["id000"]["status"] == again["id001"]["status"] == "skipped"


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="train.lr"):
        resolve_config(TrainJobConfig, flags={"data": "d", "output": "o", "train": {"lr": -1}})
    with pytest.raises(ConfigError, match="identities"):
        resolve_config(TrainJobConfig, flags={"data": "d", "output": "o", "identities": ["../x"]})
