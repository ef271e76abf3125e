"""Pixel-space diffusion purifiers (pixel_diffpure, ddspure, gridpure) and the schedule they share, on the tiny ADM."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data

from raypdm.diffusion import GaussianDiffusion, linear_betas, sdedit, space_timesteps
from raypdm.models.adm import ADM_URL
from raypdm.models.weights import MissingWeightsError
from raypdm.purify import BuildContext, build_purifier, list_purifiers, parse_spec
from raypdm.purify.ddspure import DDSPureOptions, DDSPurePurifier
from raypdm.purify.gridpure import GridPureOptions, GridPurePurifier, grid_boxes, grid_origins, gridpure
from raypdm.purify.pixel_diffpure import PixelDiffPureOptions, PixelDiffPurePurifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SUMMARY = json.loads((Path(__file__).resolve().parents[1] / "reference" / "adm256_uncond_summary.json").read_text())
SCHEDULE = SUMMARY["schedule"]
TINY = BuildContext(device="cpu", preset="tiny")


def _abar(step: int) -> float:
    """alphas_cumprod of the linear 1000-step schedule, by hand: prod(1 - beta_i), beta linear in [1e-4, 0.02]."""
    return math.prod(1 - (1e-4 + (0.02 - 1e-4) * i / 999) for i in range(step + 1))


def _ratio(step: int) -> float:
    return math.sqrt((1 - _abar(step)) / _abar(step))


@pytest.fixture(scope="module")
def face() -> np.ndarray:
    return np.ascontiguousarray(data.astronaut()[::4, ::4])  # 128 x 128 x 3


# ------------------------------------------------------------------------------------------ schedule


def test_linear_schedule_matches_the_reference():
    d = GaussianDiffusion.linear(1000)
    betas = linear_betas(1000)
    assert betas[0] == SCHEDULE["beta_start"] and betas[-1] == pytest.approx(SCHEDULE["beta_end"], abs=1e-17)
    for t, value in SCHEDULE["alphas_cumprod_at"].items():
        assert d.alphas_cumprod[int(t)] == pytest.approx(value, rel=1e-12), t
    for t, value in SCHEDULE["sqrt_one_minus_over_sqrt_alphas_cumprod_at"].items():
        assert d.noise_ratio()[int(t)] == pytest.approx(value, rel=1e-12), t
    assert list(d.timestep_map) == list(range(1000))


@pytest.mark.parametrize("respacing", list(SCHEDULE["respacing"]))
def test_respacing_matches_the_reference(respacing):
    ref = SCHEDULE["respacing"][respacing]
    d = GaussianDiffusion.linear(1000, respacing)
    steps = list(d.timestep_map)
    assert d.num_timesteps == len(steps) == ref["num_steps"]
    assert steps[:10] == ref["timestep_map_first10"] and steps[-5:] == ref["timestep_map_last5"]
    if "timestep_map" in ref:
        assert steps == ref["timestep_map"]
    assert d.betas[0] == pytest.approx(ref["respaced_beta_first"], rel=1e-9)
    assert d.betas[-1] == pytest.approx(ref["respaced_beta_last"], rel=1e-9)
    assert d.alphas_cumprod[-1] == pytest.approx(ref["respaced_alphas_cumprod_last"], rel=1e-9)
    base = GaussianDiffusion.linear(1000)
    np.testing.assert_allclose(d.alphas_cumprod, base.alphas_cumprod[steps], rtol=1e-12)  # keyed by position


def test_space_timesteps_rejects_bad_strings():
    assert space_timesteps(1000, "") == list(range(1000)) == space_timesteps(1000, "1000")
    for bad in ("abc", "ddim999", "0", "600,600"):
        with pytest.raises(ValueError, match="respacing"):
            space_timesteps(1000, bad)
    with pytest.raises(ValueError, match="respacing"):
        PixelDiffPureOptions(respacing="ddimx")


def test_learned_range_posterior_on_a_hand_case():
    d = GaussianDiffusion(np.array([0.1, 0.2, 0.3]))
    x_t = torch.tensor([0.5, -0.2]).view(2, 1, 1, 1)
    eps = torch.tensor([0.1, -0.4]).view(2, 1, 1, 1)
    v = torch.tensor([0.5, -1.0]).view(2, 1, 1, 1)
    t = torch.tensor([2, 2])
    out = d.p_mean_variance_from_output(torch.cat([eps, v], 1), x_t, t, clip_denoised=False)
    abar1, abar2 = 0.9 * 0.8, 0.9 * 0.8 * 0.7
    x0 = [(xv - math.sqrt(1 - abar2) * e) / math.sqrt(abar2) for xv, e in ((0.5, 0.1), (-0.2, -0.4))]
    c1, c2 = 0.3 * math.sqrt(abar1) / (1 - abar2), (1 - abar1) * math.sqrt(0.7) / (1 - abar2)
    post_var = 0.3 * (1 - abar1) / (1 - abar2)
    logvar = [f * math.log(0.3) + (1 - f) * math.log(post_var) for f in (0.75, 0.0)]
    torch.testing.assert_close(out["pred_xstart"].flatten(), torch.tensor(x0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["mean"].flatten(), torch.tensor([c1 * a + c2 * b for a, b in zip(x0, (0.5, -0.2))]))
    torch.testing.assert_close(out["log_variance"].flatten(), torch.tensor(logvar))
    # At t = 0 the posterior variance is 0: its log is "clipped" to entry 1's, beta_1 (1 - abar_0) / (1 - abar_1).
    out0 = d.p_mean_variance_from_output(torch.cat([eps, -torch.ones_like(v)], 1), x_t, torch.tensor([0, 0]))
    torch.testing.assert_close(out0["log_variance"].flatten(), torch.full((2,), math.log(0.2 * 0.1 / (1 - abar1))))
    # p_sample adds no noise at t = 0; clipping clamps x0 to [-1, 1].
    sample = d.p_sample(lambda x, s: torch.cat([eps * 50, v], 1), x_t, torch.tensor([0, 0]), torch.ones_like(x_t))
    assert sample["pred_xstart"].abs().max() == 1.0
    torch.testing.assert_close(sample["sample"], d.q_posterior_mean(sample["pred_xstart"], x_t, torch.tensor([0, 0])))


def test_sdedit_calls_the_model_with_original_steps():
    d = GaussianDiffusion.linear(1000, "250")
    seen: list[list[int]] = []

    def model(x, steps):
        seen.append(steps.tolist())
        return torch.zeros(x.shape[0], 6, *x.shape[2:])

    sdedit(model, d, torch.zeros(2, 3, 4, 4), 3, lambda: torch.zeros(2, 3, 4, 4))
    assert seen == [[12, 12], [8, 8], [4, 4], [0, 0]]


# ------------------------------------------------------------------------------------------ DDSPure


def test_dds_timestep_by_hand_on_the_linear_and_a_respaced_schedule():
    # sigma = 0.25 in [0, 1] units -> 0.5 in [-1, 1]; t* is the first step with sqrt((1 - abar) / abar) >= 0.5.
    assert _ratio(144) < 0.5 <= _ratio(145)
    d = GaussianDiffusion.linear(1000)
    assert d.index_for_noise_ratio(0.5) == 145
    assert [d.index_for_noise_ratio(2 * s) for s in (0.12, 0.25, 0.5, 1.0)] == [70, 145, 259, 396]
    # Respaced to 250 steps: the kept steps around 145 are 144 and 148, so t* is index 37 = original step 148,
    # not index 145 (original step 581, about 4x the intended noise).
    r = GaussianDiffusion.linear(1000, "250")
    assert list(r.timestep_map[36:38]) == [144, 148] and _ratio(144) < 0.5 <= _ratio(148)
    assert r.index_for_noise_ratio(0.5) == 37
    assert d.index_for_noise_ratio(1e6) == 999 and r.index_for_noise_ratio(1e6) == 249  # clipped to the schedule
    purifier = DDSPurePurifier(DDSPureOptions(sigma=0.25, respacing="250"), TINY)
    assert (purifier.t_index, purifier.t_step, purifier.sigma_model) == (37, 148, 0.5)


def test_dds_noises_as_the_paper_and_predicts_x0_in_one_shot(monkeypatch):
    purifier = DDSPurePurifier(DDSPureOptions(sigma=0.1), TINY)
    calls: list[list[int]] = []

    def zero_eps(x, steps):
        calls.append(steps.tolist())
        return torch.zeros(x.shape[0], 6, *x.shape[2:])

    monkeypatch.setattr(purifier.backbone, "net", zero_eps)
    x = torch.linspace(-0.5, 0.5, 3 * 8 * 8).view(1, 3, 8, 8)
    y = purifier.denoise(x, [7])
    noise = torch.randn((1, 3, 8, 8), generator=torch.Generator().manual_seed(7))
    # eps = 0: x0 = x_t / sqrt(abar) = x + sigma_m * e exactly (the paper's x_t = sqrt(abar) (x + sigma_m e)), clipped.
    torch.testing.assert_close(y, (x + 0.2 * noise).clamp(-1, 1), rtol=1e-5, atol=1e-6)
    assert calls == [[purifier.t_step]] and purifier.t_step == 58  # one call, at the first step with ratio >= 0.2
    assert _ratio(57) < 0.2 <= _ratio(58)


# ------------------------------------------------------------------------------------------ GrIDPure arithmetic


def test_grid_boxes_follow_upstream():
    assert grid_origins(512, 256, 128) == [0, 128, 256]
    assert len(grid_boxes(512, 256, 128)) == 9
    assert grid_origins(600, 256, 128) == [0, 128, 256, 344]  # the last grid is flush with the edge
    with pytest.raises(ValueError, match="larger"):
        grid_origins(128, 256, 128)


@pytest.mark.parametrize("corner", [True, False])
@pytest.mark.parametrize("size,grid,stride", [(512, 256, 128), (100, 64, 32)])
def test_gridpure_with_an_identity_denoiser_is_exact(corner, size, grid, stride):
    x = torch.rand(2, 3, size, size) * 2 - 1
    seen: list[int] = []

    def identity(grids, keys):
        seen.append(len(keys))
        return grids.clone()

    y = gridpure(x, identity, grid=grid, stride=stride, gamma=0.1, iterations=3, corner_composite=corner)
    assert torch.equal(y, x)
    per_image = len(grid_boxes(size, grid, stride)) + corner
    assert seen == [2 * per_image] * 3


def test_gridpure_merges_by_averaging_and_blends_with_gamma():
    x = torch.rand(1, 3, 512, 512)
    # Each grid becomes its index (0..8 grids, 9 = corner composite): a pixel gets the mean of its covering grids.
    y = gridpure(x, lambda g, keys: torch.stack([torch.full(g.shape[1:], float(k[1])) for k in keys]),
                 gamma=0.0, iterations=1)
    assert y[0, 0, 0, 0] == 4.5  # grid 0 and the composite's top-left quarter
    assert y[0, 0, 0, 511] == (2 + 9) / 2  # grid 2 and the composite's top-right quarter
    assert y[0, 0, 200, 200] == (0 + 1 + 3 + 4) / 4
    assert y[0, 0, 200, 0] == (0 + 3) / 2
    assert y[0, 0, 256, 256] == (4 + 5 + 7 + 8) / 4
    # A denoiser that outputs 0 leaves gamma * x per iteration: (1 - gamma) * 0 + gamma * x.
    z = gridpure(x, lambda g, keys: torch.zeros_like(g), gamma=0.1, iterations=2)
    torch.testing.assert_close(z, 0.01 * x)


def test_gridpure_purifier_with_an_injected_identity_returns_the_input(face):
    big = np.ascontiguousarray(np.tile(face, (4, 4, 1)))  # 512 x 512: no canvas resize
    purifier = GridPurePurifier(GridPureOptions(iterations=2), TINY, grid_denoiser=lambda g, keys: g)
    assert purifier.backbone is None and purifier.grids_per_image == 10
    np.testing.assert_array_equal(purifier([big])[0], big)


# ------------------------------------------------------------------------------------------ purifiers


def test_registered_with_defaults():
    assert {"pixel_diffpure", "ddspure", "gridpure"} <= set(list_purifiers())
    assert parse_spec("pixel-diffpure") == ["pixel_diffpure"]
    assert (PixelDiffPureOptions().t, PixelDiffPureOptions().respacing) == (150, "")
    assert DDSPureOptions().sigma == 0.25
    o = GridPureOptions()
    assert (o.t, o.iterations, o.gamma, o.grid_size, o.stride, o.canvas_size) == (10, 10, 0.1, 256, 128, 512)
    with pytest.raises(ValueError, match="canvas_size"):
        GridPureOptions(grid_size=600)
    with pytest.raises(ValueError):
        PixelDiffPureOptions(t=0)


def test_pixel_diffpure_start_index_on_a_respaced_schedule():
    plain = PixelDiffPurePurifier(PixelDiffPureOptions(t=100), TINY)
    assert plain.start == 99
    spaced = PixelDiffPurePurifier(PixelDiffPureOptions(t=100, respacing="250"), TINY)
    d = spaced.backbone.diffusion
    assert spaced.start == 25 and d.timestep_map[25] == 100  # nearest kept step to 99, not index 99 (step 397)
    assert d.alphas_cumprod[spaced.start] == pytest.approx(_abar(100), rel=1e-12)


def test_pixel_diffpure_runs_deterministically_per_image(face):
    purifier = build_purifier("pixel-diffpure", device="cpu", preset="tiny", options={"pixel-diffpure": {"t": 3}})
    other = np.ascontiguousarray(face[::-1])
    a, _b = purifier([face, other])
    assert a.shape == face.shape and a.dtype == np.uint8 and not np.array_equal(a, face)
    alone = purifier([face])[0]
    assert np.abs(alone.astype(int) - a).max() <= 1  # same noise in any batch (float kernels may round apart)
    np.testing.assert_array_equal(purifier([face, other])[0], a)
    reseeded = build_purifier("pixel_diffpure", device="cpu", preset="tiny",
                              options={"pixel_diffpure": {"t": 3, "seed": 1}})
    assert not np.array_equal(reseeded([face])[0], alone)
    cfg = purifier.config_dict()
    assert cfg["preset"] == "tiny" and cfg["weights"] == "random:tiny" and cfg["t"] == 3


def test_ddspure_and_gridpure_run_on_tiny(face):
    dds = build_purifier("ddspure", device="cpu", preset="tiny")
    odd = np.ascontiguousarray(face[:100, :90])
    out = dds([face, odd])
    assert [o.shape for o in out] == [face.shape, odd.shape]
    np.testing.assert_array_equal(dds([face])[0], out[0])
    grid = build_purifier("gridpure", device="cpu", preset="tiny", options={"gridpure": {
        "t": 2, "iterations": 2, "canvas_size": 128, "grid_size": 64, "stride": 32}})
    g1, g2 = grid([face, odd])
    assert g1.shape == face.shape and g2.shape == odd.shape and not np.array_equal(g1, face)
    assert np.abs(grid([face])[0].astype(int) - g1).max() <= 1
    assert grid.config_dict()["weights"] == "random:tiny"


def test_full_preset_without_weights_names_the_file(tmp_path):
    for name in ("pixel_diffpure", "ddspure", "gridpure"):
        with pytest.raises(MissingWeightsError) as err:
            build_purifier(name, device="cpu", preset="full", weights_dir=str(tmp_path))
        assert "256x256_diffusion_uncond.pt" in str(err.value) and ADM_URL in str(err.value)
