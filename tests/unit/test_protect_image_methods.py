"""The five per-image protections on tiny random-weight models: shape and dtype, the ℓ∞ bound on the
uint8 output, that the attack raises its own objective (and more than random ±r sign noise of the same
ℓ∞ norm does), and that an image's result does not depend on the batch it arrives in."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from raypdm.protect import build_protection, list_protections
from raypdm.protect.pgd import budget_levels, perturbation_norms, to_tensor

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Small budgets of steps so the whole module stays fast on a CPU; resample=False makes the
# Monte-Carlo methods ascend the fixed draws they report (tiny random models have noisy gradients).
OPTIONS = {
    "advdm": dict(steps=3, step="2/255", resample=False, eval_timesteps=4),
    "photoguard_encoder": dict(steps=3, step="2/255"),
    "photoguard_diffusion": dict(steps=2, step="2/255", diffusion_steps=4, strength=0.5, resample=False),
    "glaze": dict(steps=3, step="2/255", diffusion_steps=4),
    "adaptive_codesr": dict(
        steps=2, step="4/255", sr_steps=2, sr_low_res=32, resample=False, eval_timesteps=4, gradient_checkpointing=False
    ),
}
METHODS = sorted(OPTIONS)


@pytest.fixture(scope="module")
def images():
    from skimage import data

    face = np.asarray(Image.fromarray(data.astronaut()).resize((48, 48), Image.Resampling.BICUBIC))
    # 36 x 44: not a multiple of 8, so the pad-for-the-VAE-and-crop-back path runs too.
    cat = np.asarray(Image.fromarray(data.chelsea()).resize((44, 36), Image.Resampling.BICUBIC))
    return [face, cat]


@pytest.fixture(scope="module")
def runs(images):
    """name -> (protection, results of protect(images)), built once per module."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            prot = build_protection(name.replace("_", "-"), options=OPTIONS[name], device="cpu", preset="tiny")
            cache[name] = (prot, prot(images))
        return cache[name]

    return get


def test_all_five_are_registered():
    assert set(METHODS) <= set(list_protections())


@pytest.mark.parametrize("name", METHODS)
def test_shape_bound_and_ascent(name, runs, images):
    prot, results = runs(name)
    assert len(results) == len(images)
    for res, clean in zip(results, images, strict=True):
        assert res.image.dtype == np.uint8 and res.image.shape == clean.shape
        linf, l2 = perturbation_norms(res.image, clean)
        assert 0 < linf <= prot.options.radius and l2 > 0
        assert res.loss_after > res.loss_before, (name, res.loss_before, res.loss_after)
    # loss_before/after are the method's own evaluation objective at the clean and protected images.
    assert prot.score(images, images) == pytest.approx([r.loss_before for r in results], rel=1e-4, abs=1e-6)
    protected = [r.image for r in results]
    assert prot.score(images, protected) == pytest.approx([r.loss_after for r in results], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_beats_random_sign_noise_of_the_same_norm(name, runs, images):
    prot, results = runs(name)
    levels = budget_levels(prot.options.radius)
    rng = np.random.default_rng(123)
    noisy = []
    for clean in images:
        sign = rng.choice(np.array([-1, 1]), size=clean.shape)
        noisy.append(np.clip(clean.astype(int) + levels * sign, 0, 255).astype(np.uint8))
        assert perturbation_norms(noisy[-1], clean)[0] <= prot.options.radius
    noise_scores = prot.score(images, noisy)
    for res, noise_score in zip(results, noise_scores, strict=True):
        assert res.loss_after - res.loss_before > noise_score - res.loss_before, (name, res, noise_score)


@pytest.mark.parametrize("name", METHODS)
def test_same_image_same_result_in_any_batch(name, runs, images):
    prot, results = runs(name)
    alone = prot([images[1]])[0]
    assert np.array_equal(alone.image, results[1].image)
    assert alone.loss_after == pytest.approx(results[1].loss_after, rel=1e-5)


def test_config_dict_names_method_options_preset_and_weights(runs):
    prot, _ = runs("adaptive_codesr")
    config = prot.config_dict()
    assert config["name"] == "adaptive_codesr" and config["sr_steps"] == 2 and config["preset"] == "tiny"
    assert config["weights"] == {
        "sd21-base": "random:tiny",
        "codeformer": "random:tiny",
        "sd-x4-upscaler": "random:tiny",
    }
    assert "device" not in config
    assert prot.options.radius == 16 / 255  # the paper's adaptive-attack radius is the default


def test_random_start_keeps_the_bound(images):
    prot = build_protection(
        "photoguard-encoder", options=dict(steps=1, radius="16/255", random_start=True), device="cpu"
    )
    res = prot([images[0]])[0]
    assert perturbation_norms(res.image, images[0])[0] <= 16 / 255


def test_photoguard_targets_are_deterministic_patterns():
    from raypdm.protect.photoguard_encoder import PhotoGuardEncoderOptions, target_image

    grey = target_image(PhotoGuardEncoderOptions(), (8, 12), "cpu")
    assert grey.shape == (1, 3, 8, 12) and torch.all(grey == 128 / 255)
    board = target_image(PhotoGuardEncoderOptions(target="checkerboard", checker_cell=4), (8, 8), "cpu")[0, 0]
    assert board[0, 0] == 0 and board[0, 4] == 1 and board[4, 0] == 1 and board[4, 4] == 0
    with pytest.raises(ValueError, match="zero_latent"):
        target_image(PhotoGuardEncoderOptions(target="zero_latent"), (8, 8), "cpu")


def test_adaptive_purifier_matches_the_codesr_purifier(runs, images):
    """The differentiable CodeSR reproduces the real purifier chain (up to its 8-bit roundings): the
    upscaler noise drawn from a CPU generator seeded like the sr purifier's gives the same image."""
    from raypdm.purify import build_purifier

    prot, _ = runs("adaptive_codesr")
    purifier = build_purifier("codesr", device="cpu", options={"sr": {"steps": 2, "low_res": 32}})
    reference = purifier([images[0].copy()])[0].astype(np.float64)
    with torch.no_grad():
        mine = prot.purify(to_tensor([images[0]], "cpu"), [torch.Generator().manual_seed(0)])
    mine = mine[0].permute(1, 2, 0).numpy() * 255.0
    assert np.abs(mine - reference).max() < 2.0


def test_adaptive_straight_through_forward_is_codeformers(runs):
    from raypdm.protect.adaptive_codesr import codeformer_straight_through

    prot, _ = runs("adaptive_codesr")
    net = prot.codeformer
    x = torch.rand(1, 3, net.config.img_size, net.config.img_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        expected = net(x, w=0.5, adain=True)[0]
    x.requires_grad_(True)
    out = codeformer_straight_through(net, x, 0.5, True)
    assert torch.equal(out, expected)  # the straight-through lookup changes the backward pass only
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad.abs().sum() > 0


def test_glaze_style_target_is_seeded_per_image(runs, images):
    prot, _ = runs("glaze")
    x = to_tensor([images[0]], "cpu")
    first = prot.style_target(x, [7])
    assert first.shape == x.shape and torch.equal(first, prot.style_target(x, [7]))
    assert not torch.equal(first, prot.style_target(x, [8]))


def test_glaze_objective_penalises_lpips_above_the_budget_only(images):
    """Glaze's objective is −(‖Φ(x+δ) − Φ(x_T)‖² + α·max(LPIPS(x+δ, x) − p, 0)): the hinge costs exactly
    α·(LPIPS − p) above the budget p and nothing within it. (PGD's sign steps move every pixel each step,
    so the budget shapes the ascent; it is no hard constraint on the saved image, unlike the ℓ∞ radius.)"""
    prot = build_protection("glaze", options={**OPTIONS["glaze"], "lpips_budget": 0.0, "lpips_weight": 1000.0},
                            device="cpu", preset="tiny")
    x = to_tensor(images[:1], "cpu")
    sign = torch.from_numpy(np.random.default_rng(0).choice([-1.0, 1.0], size=tuple(x.shape))).float()
    x_adv = (x + 8 / 255 * sign).clamp(0, 1)
    with torch.no_grad():
        d = float(prot.lpips(x_adv, x, normalize=True).flatten()[0])

        def value(**update):
            prot.options = prot.options.model_copy(update=update)
            objective, _ = prot.objectives(x, [0])
            return float(objective(x_adv)[0])

        heavy = value(lpips_budget=0.0, lpips_weight=1000.0)
        free = value(lpips_budget=0.0, lpips_weight=0.0)
        within = value(lpips_budget=d + 0.01, lpips_weight=1000.0)
        half = value(lpips_budget=d / 2, lpips_weight=1000.0)
    assert d > 0
    assert heavy - free == pytest.approx(-1000.0 * d, rel=1e-3)
    assert within == pytest.approx(free, rel=1e-5)
    assert half - free == pytest.approx(-1000.0 * d / 2, rel=1e-3)
