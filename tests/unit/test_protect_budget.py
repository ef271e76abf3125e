"""Per-image protections reach their budget with their defaults (issue 32, part 2).

Before, every per-image method defaulted to the bi-level methods' 6 steps of 1/255, so its saved
perturbation could not pass 6/255 of an 11/255 radius. Now a per-image method's ``steps`` default to
2·⌈r/α⌉, an explicit K·α < r warns, and the protect table shows the measured ℓ∞ beside the radius."""

from __future__ import annotations

import logging
import types

import numpy as np
import pytest
from PIL import Image

from raypdm.protect import build_protection, budget_steps, protection_options_model, reaches_budget
from raypdm.protect.pgd import perturbation_norms

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Only knobs that make each forward cheaper on a CPU; radius, step and steps are the method's defaults.
CHEAP = {
    "advdm": dict(eval_timesteps=2),
    "photoguard_encoder": {},
    "photoguard_diffusion": dict(diffusion_steps=2),
    "glaze": dict(diffusion_steps=2),
    "adaptive_codesr": dict(sr_steps=1, sr_low_res=16, eval_timesteps=2, gradient_checkpointing=False),
}
PER_IMAGE = sorted(CHEAP)


@pytest.fixture(scope="module")
def face():
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize((32, 32), Image.Resampling.BICUBIC))


@pytest.mark.parametrize("name", PER_IMAGE)
def test_defaults_reach_the_radius_on_the_saved_png(name, face):
    prot = build_protection(name.replace("_", "-"), options=CHEAP[name], device="cpu", preset="tiny")
    o = prot.options
    assert reaches_budget(o.radius, o.step, o.steps)
    linf, _ = perturbation_norms(prot([face])[0].image, face)
    assert linf >= 0.9 * o.radius, f"{name}: {linf * 255:.1f}/255 of {o.radius * 255:.0f}/255 with {o.steps} steps"


@pytest.mark.parametrize("name", PER_IMAGE)
def test_the_old_six_steps_fall_short(name, face):
    # The test above can fail: with K = 6 steps of 1/255 no method gets past 6/255.
    prot = build_protection(name.replace("_", "-"), options={**CHEAP[name], "steps": 6}, device="cpu",
                            preset="tiny")
    linf, _ = perturbation_norms(prot([face])[0].image, face)
    assert linf <= 6 / 255 + 1e-9 < 0.9 * prot.options.radius


@pytest.mark.parametrize(("name", "radius", "steps"), [
    ("advdm", 11 / 255, 22), ("glaze", 11 / 255, 22), ("photoguard_encoder", 11 / 255, 22),
    ("photoguard_diffusion", 11 / 255, 22), ("adaptive_codesr", 16 / 255, 32),
])
def test_default_steps_follow_radius_and_step(name, radius, steps):
    model = protection_options_model(name)
    o = model()
    assert o.radius == pytest.approx(radius) and o.step == pytest.approx(1 / 255) and o.steps == steps
    assert model(radius="16/255").steps == 32  # a larger radius alone scales the steps
    assert model(step="2/255").steps == budget_steps(o.radius, 2 / 255)
    assert model(steps=3).steps == 3  # an explicit value is kept (and warned about)
    assert model(steps=None).steps == steps  # null in a config file means "the default"


@pytest.mark.parametrize(("name", "steps", "step"), [
    ("aspl", 6, 1 / 255), ("easpl", 6, 1 / 255), ("metacloak", 6, 11 / 2550), ("fsmg", 100, 1 / 255)])
def test_bi_level_methods_keep_their_own_steps(name, steps, step):
    # ASPL & co. run `steps` PGD steps per outer round over many rounds (paper: 6 × 1/255, r = 11/255;
    # MetaCloak's release r/10; FSMG one long run): the per-image default does not apply to them.
    o = protection_options_model(name)()
    assert (o.steps, o.step, o.radius) == (steps, pytest.approx(step), pytest.approx(11 / 255))
    assert protection_options_model(name)(radius="16/255").steps == steps


def test_budget_steps():
    assert budget_steps(11 / 255, 1 / 255) == 22
    assert budget_steps(16 / 255, 1 / 255) == 32
    assert budget_steps(11 / 255, 6 / 255) == 4
    assert reaches_budget(11 / 255, 6 / 255, 2) and not reaches_budget(11 / 255, 1 / 255, 6)
    assert reaches_budget(11 / 255, 1 / 255, 11)  # exactly K·α = r counts (no float off-by-one)


def test_shortfall_warning_names_the_numbers_and_the_fix():
    from raypdm.pipelines.protect import budget_shortfall, protection_options

    assert budget_shortfall("advdm", protection_options("advdm", {})) is None
    assert budget_shortfall("aspl", protection_options("aspl", {})) is None  # per round, not per run
    msg = budget_shortfall("advdm", protection_options("advdm", {"steps": 6}))
    assert "6 × 1/255 = 6/255" in msg and "radius 11/255" in msg and "22" in msg


def test_protect_table_shows_the_radius_and_warns_below_ninety_percent(tmp_path, capsys):
    from raypdm.cli.runs import _print_protection_budget
    from raypdm.data.manifest import Manifest

    def row(ident, name, linf, stage="advdm"):
        return {"identity": ident, "split": "set_A", "name": name, "src_uri": f"/in/{name}", "uri": f"/o/{name}",
                "input_sha256": "s", "output_sha256": "o", "stage": stage, "config_hash": "c", "seconds": 0.1,
                "error": None, "error_kind": None, "linf": linf, "l2": 0.01, "loss_before": 0.1, "loss_after": 0.2}

    Manifest(str(tmp_path)).append([row("full", "a.png", 11 / 255), row("weak", "b.png", 6 / 255),
                                    row("weak", "c.png", 0.0, stage="copy")])
    _print_protection_budget(types.SimpleNamespace(method="advdm", options={}, output=str(tmp_path)))
    out = capsys.readouterr().out
    assert "11/255" in out and "100%" in out and "55%" in out
    assert "warning" in out and "weak" in out.split("warning")[1] and "full" not in out.split("warning")[1]


def test_run_protect_logs_the_shortfall(tmp_path, caplog):
    # The warning comes before any work: a misconfigured run says so at once, not after hours.
    from raypdm.pipelines.protect import ProtectJobConfig, run_protect

    (tmp_path / "in").mkdir()
    cfg = ProtectJobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), method="advdm",
                           options={"steps": 3}, copy_splits=False,
                           lpips_backbone="random")
    with caplog.at_level(logging.WARNING, logger="raypdm.pipelines.protect"):
        run_protect(cfg)
    assert any("cannot reach the radius 11/255" in r.getMessage() for r in caplog.records)
