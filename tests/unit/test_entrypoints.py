"""jobs/*.py entrypoints: one per job, configs that parse and validate, the smoke sections."""

import argparse
from pathlib import Path

import pytest
import yaml

from raypdm.entrypoints import JOBS, load_job_config

ROOT = Path(__file__).resolve().parents[2]


def test_every_job_has_an_entrypoint_and_a_config():
    for job in JOBS:
        script = ROOT / "jobs" / f"{job}.py"
        assert script.is_file(), script
        assert f'main("{job}")' in script.read_text()
        assert (ROOT / "jobs" / "configs" / f"{job}.yaml").is_file()
    assert 'main("sweep")' in (ROOT / "jobs" / "sweep_noise_tokens.py").read_text()


@pytest.mark.parametrize("job", JOBS)
def test_configs_validate_in_both_modes(job, tmp_path):
    from raypdm.entrypoints import _validate
    from raypdm.pipelines.evaluate import EvaluateConfig
    from raypdm.pipelines.protect import ProtectJobConfig
    from raypdm.pipelines.purify import PurifyConfig
    from raypdm.pipelines.redteam import RedteamConfig
    from raypdm.pipelines.sample import SampleJobConfig
    from raypdm.pipelines.train import TrainJobConfig
    from raypdm.search.sweep import SweepConfig
    from raypdm.bench.purifiers import PurifierBenchConfig

    classes = {"purify": PurifyConfig, "protect": ProtectJobConfig, "finetune": TrainJobConfig,
               "sample": SampleJobConfig, "evaluate": EvaluateConfig, "sweep": SweepConfig,
               "bench": PurifierBenchConfig, "redteam": RedteamConfig}
    fill = {"input": "x", "data": "x", "models": "x", "images": "x", "reference": "x"}
    for smoke in (False, True):
        args = argparse.Namespace(config=str(ROOT / "jobs" / "configs" / f"{job}.yaml"), output=str(tmp_path),
                                  smoke=smoke, overrides=[])
        data = load_job_config(job, args)
        for k, v in fill.items():  # smoke runs make these from synthetic data
            if k in data and data[k] is None:
                data[k] = v
        _validate(classes[job], data)


def test_sweep_smoke_config_validates_with_synthetic_data(tmp_path):
    from raypdm.entrypoints import _validate
    from raypdm.search.sweep import SweepConfig

    args = argparse.Namespace(config=str(ROOT / "jobs" / "configs" / "sweep_smoke.yaml"), output=str(tmp_path),
                              smoke=True, overrides=[])
    data = load_job_config("sweep", args)
    assert "data" not in data and "reference" not in data  # the smoke run makes them
    cfg = _validate(SweepConfig, {**data, "data": "x", "reference": "x"})
    assert cfg.preset == "tiny" and cfg.space.tokens == ["t@j", "bhi"] and cfg.space.w_values() == [3.0, 7.5]
    assert cfg.train.steps <= 4 and cfg.search == "grid"


def test_redteam_smoke_yaml_matches_the_code():
    from raypdm.pipelines.redteam import smoke_overrides

    smoke = yaml.safe_load((ROOT / "jobs" / "configs" / "redteam.yaml").read_text())["smoke"]
    smoke.pop("data")
    assert smoke == smoke_overrides()


def test_overrides_and_output(tmp_path):
    args = argparse.Namespace(config=str(ROOT / "jobs" / "configs" / "purify.yaml"), output="s3://b/o", smoke=True,
                              overrides=["workers=3"])
    data = load_job_config("purify", args)
    assert data["output"] == "s3://b/o" and data["workers"] == 3 and data["preset"] == "tiny"


def test_config_error_exit_code(tmp_path, capsys):
    from raypdm.entrypoints import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("purifier: nope\ninput: x\n")
    assert main("purify", ["--config", str(bad), "--output", str(tmp_path / "o")]) == 2
    assert "purifier" in capsys.readouterr().err
