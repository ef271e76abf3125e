"""The `paper` and `official-code` protocols (issue 32 parts 1 and 4): every setting of each, where it
applies, that explicit settings override it, that `--print-config` says where each value came from, and
the mapping from Eq. 6's w to diffusers' guidance_scale."""

from __future__ import annotations

import pytest
import torch
import yaml
from pydantic import BaseModel
from click.testing import CliRunner

from raypdm.cli import cli
from raypdm.cli.jobs import JOBS, get_job
from raypdm.protocols import PROTOCOLS, SETTINGS, applies, protocol_layer

# The whole table, written out: changing a protocol's setting must change this test too (and the README's
# Fidelity section), never silently. (path: (paper, official-code))
EXPECTED = {
    "prompt_preset": ("paper", "official-code"),
    "sampling.scheduler": ("pndm", "pndm"),
    "sampling.w": (6.5, 6.5),
    "sampling.steps": (100, 100),
    "sampling.num_images": (16, 16),
    "train.latents": ("sample", "sample"),
    "train.optimizer": ("auto", "auto"),
    "train.mixed_precision": ("auto", "auto"),
    "train.lr": (5e-7, 5e-7),
    "train.steps": (1000, 1000),
    "statistics.unit": ("observation", "observation"),
    "statistics.alpha": (0.01, 0.01),
    "statistics.test": ("improvement", "improvement"),
}
# Which jobs each setting reaches (by the config's fields): a row that stops reaching a job fails here.
REACHES = {
    "prompt_preset": {"train", "sweep", "redteam"},
    "sampling.scheduler": {"sample", "redteam"},
    "sampling.w": {"sample", "redteam"},
    "sampling.steps": {"sample", "redteam"},
    "sampling.num_images": {"sample", "redteam"},
    "train.latents": {"train", "sweep", "redteam"},
    "train.optimizer": {"train", "sweep", "redteam"},
    "train.mixed_precision": {"train", "sweep", "redteam"},
    "train.lr": {"train", "sweep", "redteam"},
    "train.steps": {"train", "sweep", "redteam"},
    "statistics.unit": {"redteam"},
    "statistics.alpha": {"redteam"},
    "statistics.test": {"redteam"},
}


def test_the_table_is_what_was_checked():
    assert {s.path: (s.paper, s.official_code) for s in SETTINGS} == EXPECTED
    assert all(s.why for s in SETTINGS)  # each row says why (the README's Fidelity section)


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.path)
def test_each_setting_reaches_its_jobs(setting):
    reached = {spec.name for spec in JOBS if applies(setting, spec.config_class())}
    assert reached == REACHES[setting.path]


def _default_at(model, path: str):
    node = None
    for part in path.split("."):
        if model is not None:
            info = model.model_fields[part]
            node = info.get_default(call_default_factory=True)
            model = type(node) if isinstance(node, BaseModel) else None
        else:
            node = getattr(node, part)
    return node


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.path)
def test_model_defaults_are_the_paper_protocol(setting):
    # A config built in Python (tests, the demo, a notebook) without the CLI gets the paper's values too.
    for spec in JOBS:
        cls = spec.config_class()
        if not applies(setting, cls):
            continue
        assert _default_at(cls, setting.path) == setting.paper, (spec.name, setting.path)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_protocol_layer_sets_every_applicable_row(protocol):
    layer = protocol_layer(get_job("redteam").config_class(), protocol)
    assert layer["prompt_preset"] == protocol
    assert layer["sampling"] == {"scheduler": "pndm", "w": 6.5, "steps": 100, "num_images": 16}
    assert layer["statistics"] == {"unit": "observation", "alpha": 0.01, "test": "improvement"}


def _print(args: list[str], tmp_path, monkeypatch) -> tuple[dict, str]:
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(cli, [*args, "--print-config"])
    assert res.exit_code == 0, res.output
    return yaml.safe_load(res.output), res.output


def _line(text: str, key: str) -> str:
    return next(line for line in text.splitlines() if line.strip().startswith(key + ":"))


def test_official_code_by_flag_and_an_explicit_value_wins(tmp_path, monkeypatch):
    cfg, text = _print(["train", "--data", "d", "--output", "o", "--protocol", "official-code"], tmp_path, monkeypatch)
    assert cfg["protocol"] == "official-code" and cfg["prompt_preset"] == "official-code"
    assert _line(text, "prompt_preset").endswith("# protocol official-code")
    assert _line(text, "protocol").endswith("# flag") and _line(text, "identities").endswith("# default")
    cfg, text = _print(["train", "--data", "d", "--output", "o", "--protocol", "official-code",
                        "--set", "prompt_preset=paper"], tmp_path, monkeypatch)
    assert cfg["prompt_preset"] == "paper" and _line(text, "prompt_preset").endswith("# --set")


def test_protocol_from_the_yaml_and_the_yaml_beats_it(tmp_path, monkeypatch):
    (tmp_path / "c.yaml").write_text("protocol: official-code\nmodels: m\noutput: o\nsampling: {w: 3.0}\n")
    cfg, text = _print(["sample", "--config", "c.yaml"], tmp_path, monkeypatch)
    assert cfg["protocol"] == "official-code" and cfg["sampling"]["w"] == 3.0
    assert _line(text, "w").endswith("# config c.yaml")
    assert _line(text, "scheduler").endswith("# protocol official-code")


def test_printed_config_loads_back_to_the_same_config(tmp_path, monkeypatch):
    cfg, text = _print(["redteam", "--smoke", "--output", "out", "--protocol", "official-code"], tmp_path, monkeypatch)
    (tmp_path / "again.yaml").write_text(text)
    again, _ = _print(["redteam", "--config", "again.yaml"], tmp_path, monkeypatch)
    assert again == cfg
    # the smoke protection's two steps still reach the radius, and say where they came from
    assert cfg["protections"][0]["options"]["step"] == "6/255"


def test_unknown_protocol_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(cli, ["train", "--data", "d", "--output", "o", "--set", "protocol=papr", "--print-config"])
    assert res.exit_code == 2 and "protocol" in res.output and "official-code" in res.output


# ---- Eq. 6's w and diffusers' guidance_scale


def test_guidance_mapping_is_the_papers_cfg_7_5():
    from raypdm.sample.decoupled import SamplingConfig, cfg_scale_for, decoupled_noise_pred, w_for_cfg_scale

    cfg = SamplingConfig()
    assert cfg.w == 6.5 and cfg.cfg_scale == 7.5  # App. A.2's "CFG 7.5" is diffusers' guidance_scale 7.5
    assert cfg_scale_for(7.5) == 8.5 and w_for_cfg_scale(7.5) == 6.5  # Eq. 6's "w = 7.5" read literally
    eps_pos, eps_neg = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    s = cfg.cfg_scale
    # diffusers: ε_u + s·(ε_c − ε_u) with c_neg in the unconditional slot == Eq. 6 with w = s − 1
    torch.testing.assert_close(decoupled_noise_pred(eps_pos, eps_neg, cfg.w), eps_neg + s * (eps_pos - eps_neg))
    assert cfg.scheduler == "pndm"


def test_redteam_passes_the_protocols_sampler_and_prompts_to_its_stages(tmp_path):
    from raypdm.pipelines.redteam import RedteamConfig, RedteamPlan

    cfg = RedteamConfig(data=str(tmp_path / "d"), output=str(tmp_path / "o"), protocol="official-code",
                        prompt_preset="official-code", protections=[{"name": "advdm"}], purifiers=["none"],
                        modes=["cdl"])
    plan = RedteamPlan(cfg)
    cell = plan.cells()[0]
    train, sample = plan.train_config(cell), plan.sample_config(cell)
    assert train.prompt_preset == "official-code" and train.protocol == "official-code"
    assert sample.sampling.scheduler == "pndm" and sample.sampling.cfg_scale == 7.5
