"""IMPRESS ("impress"): Adam on the image against ||x - D(E(x))||^2 + alpha * max(LPIPS(x, x_ptb) - delta, 0),
on the tiny random-weight SD 2.1-base VAE and a seeded random LPIPS trunk, on the CPU.

Runs use 64 px images and 2-15 iterations (~0.04 s each); nothing downloads.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from raypdm.purify import build_purifier
from raypdm.purify.impress import ImpressOptions, ImpressPurifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OFFLINE = {"lpips_backbone": "random", "lpips_net": "alex"}


def _resized(image: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.array(Image.fromarray(image).resize((width, height), Image.BICUBIC))


@pytest.fixture(scope="module")
def astro() -> np.ndarray:
    return _resized(data.astronaut(), 64, 64)


@pytest.fixture(scope="module")
def cat() -> np.ndarray:
    return _resized(data.chelsea(), 60, 44)  # sides not multiples of 8: padded and cropped back


def _build(**options) -> ImpressPurifier:
    return build_purifier("impress", device="cpu", preset="tiny", options={"impress": {**OFFLINE, **options}})


def _tensor(*images: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 images -> N x 3 x H x W in [-1, 1], the purifier's working range."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def _start(x_ptb: torch.Tensor, noise: float, seed: int = 0) -> torch.Tensor:
    """The start point the purifier uses: x_ptb + noise * N(0, 1) from a CPU generator per image."""
    eps = torch.stack([torch.randn(x_ptb.shape[1:], generator=torch.Generator().manual_seed(seed)) for _ in x_ptb])
    return x_ptb + noise * eps


# --------------------------------------------------------------------------------------- objective


def test_defaults_are_the_public_code_settings():
    o = ImpressOptions()
    assert (o.iterations, o.lr, o.alpha, o.lpips_budget, o.init_noise) == (3000, 0.01, 0.1, 0.1, 0.1)
    assert (o.lpips_net, o.lpips_backbone) == ("vgg", "pretrained")


def test_impress_lowers_its_own_objective(astro):
    p = _build(iterations=12, init_noise=0.0)
    x_ptb = _tensor(astro, astro[::-1].copy())
    x = p.optimise(x_ptb, [0, 0])
    with torch.no_grad():
        before, after = p.objective(x_ptb, x_ptb), p.objective(x, x_ptb)
    assert torch.all(before["lpips"] == 0) and torch.all(before["hinge"] == 0)
    assert torch.all(after["loss"] < 0.9 * before["loss"]), (before["loss"], after["loss"])
    assert torch.all(after["consistency"] < before["consistency"])
    assert x.min() >= -1 and x.max() <= 1, "x is clamped to [-1, 1] every step"
    assert not torch.equal(x, x_ptb)


def test_the_lpips_budget_holds_the_image_near_its_input(astro):
    x_ptb = _tensor(astro)
    budget, noise = 0.02, 0.3  # the noisy start is outside the budget (LPIPS ~0.024 with this trunk)
    common = {"iterations": 15, "init_noise": noise, "lpips_budget": budget}
    held = _build(alpha=100.0, **common)
    with torch.no_grad():
        start = held.objective(_start(x_ptb, noise), x_ptb)
    assert start["lpips"].item() > budget and start["hinge"].item() > 0
    x = held.optimise(x_ptb, [0])
    free = _build(alpha=0.0, **common)
    x_free = free.optimise(x_ptb, [0])
    with torch.no_grad():
        end, end_free = held.objective(x, x_ptb), held.objective(x_free, x_ptb)
    # With a large alpha the hinge drives LPIPS(x, x_ptb) under delta; without it, nothing does.
    assert end["lpips"].item() <= budget + 1e-3, end
    assert end["hinge"].item() < start["hinge"].item()
    assert end_free["lpips"].item() > budget, "the budget term, not the clamp, must be what holds LPIPS"
    assert end["consistency"].item() < start["consistency"].item()


def test_the_update_rule_is_the_public_codes(astro):
    """Against a direct transcription of the public impress() loop (mean loss, Adam eps 1e-5,
    CosineAnnealingLR to 1e-5, clamp to [-1, 1]) in float32: the element-sum scaling is exact."""
    iters, alpha, budget, noise = 6, 0.1, 0.1, 0.1
    p = _build(iterations=iters, alpha=alpha, lpips_budget=budget, init_noise=noise)
    x_ptb = _tensor(astro)
    ours = p.optimise(x_ptb, [0])

    x = _start(x_ptb, noise).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.01, eps=1e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters, eta_min=1e-5)
    for _ in range(iters):
        recon = p.vae(x).sample  # AutoencoderKL.forward: posterior mode, decode
        d = p.lpips(x, x_ptb)
        loss = torch.nn.functional.mse_loss(recon, x) + alpha * max(d - budget, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        x.data = torch.clamp(x, -1, 1)
    assert torch.allclose(ours, x.detach(), atol=2e-4), (ours - x).abs().max()


# ---------------------------------------------------------------------------------------- uint8 I/O


def test_output_keeps_shape_dtype_and_each_image_is_independent_of_its_batch(astro, cat):
    p = _build(iterations=4)
    flipped = astro[:, ::-1].copy()
    batch = [cat, astro, flipped, astro]
    out = p(batch)
    assert [o.shape for o in out] == [x.shape for x in batch]
    assert all(o.dtype == np.uint8 for o in out)
    for o, x in zip(out, batch):
        assert 0 < _max_diff(o, x) < 128, "changed, but still the same picture"
        alone = p([x])[0]
        # Summed per-image losses and element-wise Adam: an image's path does not see its batch-mates.
        assert _max_diff(o, alone) <= 1
    assert np.array_equal(out[1], out[3])
    assert np.array_equal(astro, _resized(data.astronaut(), 64, 64)), "input modified in place"
    again = _build(iterations=4, batch_size=1)([astro])[0]
    assert _max_diff(again, out[1]) <= 1, "another actor, batch size 1, same result"
    assert _max_diff(_build(iterations=4, seed=1)([astro])[0], out[1]) > 0


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_runs_under_a_callers_no_grad_or_inference_mode(astro, context):
    p = _build(iterations=2)
    expected = p([astro])[0]
    with context():
        assert np.array_equal(p([astro])[0], expected)


def test_vgg_lpips_runs_offline_with_a_random_trunk(astro):
    p = _build(iterations=2, lpips_net="vgg")
    assert type(p.lpips.net).__name__ == "vgg16"
    out = p([astro])[0]
    assert out.shape == astro.shape and out.dtype == np.uint8


@pytest.mark.parametrize("net, filename", [("vgg", "vgg16-397923af.pth"), ("alex", "alexnet-owt-7be5be79.pth")])
def test_a_missing_pretrained_trunk_names_its_file(net, filename, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=filename) as err:
        build_purifier("impress", device="cpu", preset="tiny", options={"impress": {"lpips_net": net}})
    assert str(tmp_path) in str(err.value)


# ----------------------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "options, field",
    [
        ({"iterations": 0}, "iterations"),
        ({"lr": 0}, "lr"),
        ({"alpha": -1}, "alpha"),
        ({"lpips_budget": -0.1}, "lpips_budget"),
        ({"init_noise": -0.1}, "init_noise"),
        ({"lpips_net": "squeeze"}, "lpips_net"),
        ({"lpips_backbone": "imagenet"}, "lpips_backbone"),
        ({"dtype": "float64"}, "dtype"),
        ({"batch_size": 0}, "batch_size"),
        ({"pur_eps": 0.1}, "pur_eps"),  # the code's name is not an alias: a typo never runs defaults
    ],
)
def test_bad_options_are_rejected_naming_the_field(options, field):
    with pytest.raises(ValueError, match=field) as err:
        build_purifier("impress", device="cpu", preset="tiny", options={"impress": options})
    assert "'impress'" in str(err.value)


def test_config_dict_lists_what_changes_pixels_but_not_the_device():
    p = _build(iterations=3)
    cfg = p.config_dict()
    assert cfg["name"] == "impress" and cfg["preset"] == "tiny" and cfg["weights"] == "random"
    assert cfg["iterations"] == 3 and cfg["lpips_budget"] == 0.1 and cfg["lpips_backbone"] == "random"
    assert "cpu" not in json.dumps(cfg)
    assert _build(iterations=3, alpha=1.0).config_dict() != cfg


# -------------------------------------------------------------------------------------- NaN guard


def test_half_precision_failures_are_rerun_in_float32(astro, cat, monkeypatch, caplog):
    p = _build(iterations=3)
    fp32_alone = p.optimise(_tensor(astro), [0])
    p.dtype = torch.bfloat16  # as on a GPU; bf16 autocast runs on the CPU too
    real = p.optimise
    calls = []

    def optimise(x_ptb, seeds, dtype=None):
        x = real(x_ptb, seeds, dtype)
        calls.append((dtype, len(seeds)))
        if dtype != torch.float32:
            assert torch.isfinite(x).all() and (x - fp32_alone).abs().max() < 0.1  # bf16 really ran, close
            x[1] = float("nan")
        return x

    monkeypatch.setattr(p, "optimise", optimise)
    with caplog.at_level("WARNING", logger="raypdm.purify.impress"):
        out = p([astro, astro.copy()])
    assert calls == [(torch.bfloat16, 2), (torch.float32, 1)]
    assert "re-running in float32" in caplog.text
    expected = ((fp32_alone[0] + 1) * 127.5).clamp(0, 255).permute(1, 2, 0).numpy()
    assert _max_diff(out[1], np.rint(expected).astype(np.uint8)) <= 1
    monkeypatch.setattr(p, "optimise", lambda x_ptb, seeds, dtype=None: torch.full_like(x_ptb, float("nan")))
    with pytest.raises(RuntimeError, match="non-finite"):
        p([cat])


def test_weights_dir_loads_the_sd_vae_and_missing_files_are_named(tmp_path, astro):
    from raypdm import models

    with pytest.raises(models.MissingWeightsError, match="vae"):
        build_purifier("impress", device="cpu", preset="full", weights_dir=str(tmp_path), options={"impress": OFFLINE})
    # A saved (tiny) bundle in the hub layout stands in for the real files: only its VAE is read.
    parts = models.build("sd21-base", preset="tiny")
    parts.save_pretrained(tmp_path / "sd21-base")
    p = build_purifier("impress", device="cpu", preset="full", weights_dir=str(tmp_path),
                       options={"impress": {**OFFLINE, "iterations": 2}})
    assert p.weights == "weights" and p.config_dict()["weights"] == "weights"
    saved = parts.vae.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in p.vae.state_dict().items())
    assert p([astro])[0].shape == astro.shape
