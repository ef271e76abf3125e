"""The job table behind `raypdm <job>`, `jobs/*.py`, `raypdm submit` and the demo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from raypdm.cli import cli, job_main
from raypdm.cli.jobs import JOBS, get_job
from raypdm.cli.runner import job_data, resolve_job_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGURED = [spec.name for spec in JOBS if spec.name != "demo"]


def _command(spec) -> list[str]:
    return [spec.group, spec.cli_name] if spec.group else [spec.cli_name]


def test_every_job_and_alias_has_a_one_line_entrypoint():
    for spec in JOBS:
        for name in (spec.name, *spec.aliases):
            if "-" in name:
                continue  # a CLI spelling only
            script = ROOT / "jobs" / f"{name}.py"
            assert script.is_file(), script
            code = [line for line in script.read_text().split('"""')[-1].splitlines() if line.strip()]
            assert code == ["import sys", "from raypdm.cli import job_main", 'if __name__ == "__main__":',
                            f'    sys.exit(job_main("{spec.name}"))'], script


def test_names_and_aliases_resolve_to_one_job():
    assert get_job("finetune") is get_job("train")
    assert get_job("sweep_noise_tokens") is get_job("sweep") is get_job("sweep-noise-tokens")
    with pytest.raises(KeyError, match="unknown job"):
        get_job("nope")
    res = CliRunner().invoke(cli, ["finetune", "--help"])
    assert res.exit_code == 0 and "DreamBooth" in res.output


@pytest.mark.parametrize("job", CONFIGURED)
def test_example_configs_validate_with_and_without_smoke(job, tmp_path):
    spec = get_job(job)
    path = ROOT / "jobs" / "configs" / f"{job}.yaml"
    assert path.is_file(), path
    for smoke in (False, True):
        data = job_data(spec, config_path=str(path), smoke=smoke, flags={"output": str(tmp_path)})
        if not smoke:  # the example configs point at /mnt/shared; only the smoke run fills missing inputs
            data = {k: (str(tmp_path) if isinstance(v, str) and v.startswith("/mnt/shared") else v)
                    for k, v in data.items()}
        cfg = resolve_job_config(spec, data, smoke=smoke, make_inputs=False, source=str(path))
        if smoke:
            assert getattr(cfg, "preset", "tiny") == "tiny", job
        assert not (tmp_path / "_smoke_data").exists()  # naming inputs writes nothing


@pytest.mark.parametrize("spec", JOBS, ids=lambda s: s.name)
def test_print_config_resolves_relative_paths_against_the_working_directory(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(cli, [*_command(spec), "--output", "out", "--smoke", "--print-config"])
    assert res.exit_code == 0, res.output
    cfg = yaml.safe_load(res.output)
    assert cfg["output"] == str(tmp_path / "out")
    for key in ("input", "data", "images", "reference", "models"):
        if isinstance(cfg.get(key), str):
            assert os.path.isabs(cfg[key]), (key, cfg[key])
    assert not (tmp_path / "out").exists()  # --print-config writes nothing


def test_flag_layers_in_order(tmp_path, monkeypatch):
    """defaults < YAML < --smoke < flags < --set."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"input": "in", "output": "o", "purifier": "jpeg", "batch_size": 3,
                                                    "workers": 5, "smoke": {"workers": 7, "batch_size": 6}}))
    base = ["purify", "--config", "c.yaml", "--print-config"]
    assert yaml.safe_load(CliRunner().invoke(cli, base).output)["workers"] == 5
    smoke = yaml.safe_load(CliRunner().invoke(cli, [*base, "--smoke"]).output)
    assert smoke["workers"] == 7 and smoke["batch_size"] == 6 and smoke["lpips_backbone"] == "random"
    flagged = yaml.safe_load(CliRunner().invoke(cli, [*base, "--smoke", "--workers", "2"]).output)
    assert flagged["workers"] == 2
    setted = yaml.safe_load(CliRunner().invoke(cli, [*base, "--workers", "2", "--set", "workers=9"]).output)
    assert setted["workers"] == 9 and setted["input"] == str(tmp_path / "in")


def test_nested_errors_name_the_full_field_path(tmp_path):
    res = CliRunner().invoke(cli, ["purify", "--input", "i", "--output", "o", "--purifier", "codesr",
                                   "--set", "options.sr.noise_level=999", "--print-config"])
    assert res.exit_code == 2
    assert "options.sr.noise_level: Input should be less than or equal to 350" in res.output
    res = CliRunner().invoke(cli, ["purify", "--input", "i", "--output", "o", "--set", "bogus=1", "--print-config"])
    assert res.exit_code == 2 and "bogus: unknown field" in res.output


@pytest.mark.parametrize(
    ("job", "setting", "message"),
    [
        ("train", "distributed.zero_stage=7", "distributed.zero_stage: Input should be less than or equal to 3"),
        ("train", "class_prior.bogus=1", "class_prior.bogus: unknown field"),
        ("sweep", "class_prior.resolution=65", "class_prior.resolution: resolution must be a multiple of 8"),
        ("redteam", "distributed.backend=mpi", "distributed.backend: Input should be 'deepspeed' or 'ddp'"),
        ("redteam", "purifier_options.sr.noise_level=-5", "purifier_options.sr.noise_level: Input should be greater"),
        ("protect", "options.steps=-1", "options.steps: Input should be greater than or equal to 0"),
    ],
)
def test_every_nested_section_is_typed(job, setting, message, tmp_path):
    """No `dict[str, Any]` sections: a bad nested value fails at once, named by the path the user typed."""
    spec = get_job(job)
    res = CliRunner().invoke(cli, [*_command(spec), "--output", str(tmp_path), "--smoke", "--set", setting,
                                   "--print-config"])
    assert res.exit_code == 2, res.output
    assert message in res.output, res.output


@pytest.mark.parametrize("job", ["purify", "protect", "train", "sample", "evaluate", "redteam"])
def test_identities_mean_the_same_on_every_job(job, tmp_path):
    spec = get_job(job)
    args = [*_command(spec), "--output", str(tmp_path), "--smoke", "--print-config"]
    res = CliRunner().invoke(cli, [*args, "--identities", "alice,bob"])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load(res.output)["identities"] == ["alice", "bob"]
    res = CliRunner().invoke(cli, [*args, "--identities", "all"])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load(res.output)["identities"] in (None, "all")
    res = CliRunner().invoke(cli, [*args, "--identities", "../etc"])
    assert res.exit_code == 2 and "identities:" in res.output


def test_unknown_schemes_and_missing_backends_fail_before_anything_starts(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gcsfs" else real(name, *a))
    res = CliRunner().invoke(cli, ["purify", "--input", "gs://bucket/data", "--output", str(tmp_path)])
    assert res.exit_code == 2 and "gs:// needs the gcsfs package" in res.output and "raypdm[gcs]" in res.output
    res = CliRunner().invoke(cli, ["purify", "--input", "ftpx://host/data", "--output", str(tmp_path)])
    assert res.exit_code == 2 and "unknown scheme ftpx://" in res.output
    assert not any(tmp_path.iterdir())


def test_job_main_returns_the_exit_status(tmp_path, capsys):
    assert job_main("purify", ["--output", str(tmp_path), "--set", "workers=0", "--print-config"]) == 2
    assert "workers:" in capsys.readouterr().err
    assert job_main("purify", ["--output", str(tmp_path), "--smoke", "--print-config"]) == 0


def test_protect_list_needs_no_config():
    res = CliRunner().invoke(cli, ["protect", "--list"], terminal_width=200)
    assert res.exit_code == 0 and "advdm" in res.output and "metacloak" in res.output


@pytest.mark.parametrize(
    ("job", "args"),
    [
        ("purify", ["--purifier", "jpeg"]),
        ("evaluate", ["--metrics", "lpips"]),
        ("protect", ["--method", "glaze", "--lpips", "random", "--set", "options.lpips_backbone=pretrained"]),
    ],
)
def test_a_job_without_its_lpips_trunk_fails_before_ray_with_the_fix(job, args, tmp_path, monkeypatch):
    """A fresh machine (empty torch cache, no weights dir): one message naming the file, the fetch command
    and `--lpips random`, exit 2, and Ray never started."""
    import raypdm.runtime

    # Ray may already run in this test process (the integration tests' shared cluster): record whether
    # this command tries to start it, rather than asking whether it runs
    started = []
    monkeypatch.setattr(raypdm.runtime, "init_ray", lambda *a, **k: started.append(1))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    spec = get_job(job)
    inputs = {"purify": ["--input", "d"], "protect": ["--input", "d"],
              "evaluate": ["--images", "d", "--reference", "d"]}[job]
    res = CliRunner().invoke(cli, [*_command(spec), *inputs, "--output", "o", *args])
    assert res.exit_code == 2, res.output
    assert "alexnet-owt-7be5be79.pth" in res.output
    assert "raypdm models fetch" in res.output and "lpips-alex" in res.output
    assert "--lpips random" in res.output
    assert "lpips_pretrained=False" not in res.output
    assert not started


@pytest.mark.parametrize("spec", JOBS, ids=lambda s: s.name)
def test_the_cli_and_the_job_script_resolve_one_config_and_it_round_trips(spec, tmp_path, monkeypatch, capsys):
    """`raypdm <job> --smoke --print-config` == `jobs/<job>.py --smoke --print-config`, and the printed YAML
    given back with `--config` resolves to the same config (nothing lost or renamed on the way)."""
    monkeypatch.chdir(tmp_path)
    args = ["--output", "out", "--smoke", "--print-config"]
    res = CliRunner().invoke(cli, [*_command(spec), *args])
    assert res.exit_code == 0, res.output
    printed = yaml.safe_load(res.output)
    capsys.readouterr()
    assert job_main(spec.name, args) == 0
    assert yaml.safe_load(capsys.readouterr().out) == printed
    (tmp_path / "resolved.yaml").write_text(res.output)
    again = CliRunner().invoke(cli, [*_command(spec), "--config", "resolved.yaml", "--print-config"])
    assert again.exit_code == 0, again.output
    assert yaml.safe_load(again.output) == printed


def test_no_verify_and_quiet_reach_the_run(tmp_path, monkeypatch):
    """`--no-verify` sets RAYPDM_NO_VERIFY for this process (init_ray carries it to the workers) and says
    so on stderr; `-q`/`--quiet` is `--no-progress`."""
    import raypdm.cli.commands as commands
    from raypdm.models.verify import NO_VERIFY_ENV

    seen = []
    monkeypatch.setattr(commands, "run_job", lambda name, data, **kw: seen.append((os.environ.get(NO_VERIFY_ENV),
                                                                                  kw["ctx"].progress)))
    monkeypatch.delenv(NO_VERIFY_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    base = ["purify", "--input", "d", "--output", "o"]
    res = CliRunner().invoke(cli, base)
    assert res.exit_code == 0, res.output
    try:
        res = CliRunner().invoke(cli, [*base, "--no-verify", "-q"])
    finally:
        set_by_the_command = os.environ.pop(NO_VERIFY_ENV, None)  # never leak it into later tests
    assert res.exit_code == 0, res.output
    assert "--no-verify: weight files are loaded without checking their sha256" in res.output
    assert seen == [(None, True), ("1", False)] and set_by_the_command == "1"
