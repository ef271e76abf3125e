"""The per-identity (bi-level) protections FSMG, ASPL, E-ASPL and MetaCloak on tiny random models.

Every method runs on identity "a", then on "b" with the very same images, then on "a" again, with one
protection object: the outputs must have the inputs' count/shape/dtype, respect the uint8 ℓ∞ budget,
raise the instance loss more than random ±r sign noise does, differ between identity names (seeding)
and be identical for the two "a" runs (determinism, and nothing carried over from "b").

The tiny random VAE's posterior mean has a standard deviation of ~0.2, which SD's scaling factor
(0.18215, chosen for the real VAE's unit-variance latents) shrinks to ~0.04: the instance loss then
hardly depends on the pixels and tells nothing about an attack. The fixture rescales each surrogate's
VAE to unit-variance latents, as the real factor does for the real VAE; the posterior *mean* is used
(``latent_sample=False``) because the random VAE's posterior std (~1) is far above the real one's.
With a random UNet, per-draw gradients are nearly uncorrelated, so the attacks average 32 (t, ε)
draws per step where the real methods use 1.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from raypdm.protect.base import build_protection
from raypdm.protect.pgd import perturbation_norms, to_tensor

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 32
RADIUS = 8  # levels of 1/255
COMMON = {
    "resolution": SIZE,
    "radius": f"{RADIUS}/255",
    "step": "2/255",
    "lr": 1e-4,
    "num_class_images": 2,
    "class_prior_steps": 2,
    "timesteps_per_step": 32,
    "eval_timesteps": 64,
    "latent_sample": False,
    "gradient_checkpointing": False,  # tiny models on one thread: recomputation costs more than it saves
    "seed": 0,
}
METHODS = {
    "fsmg": {"finetune_steps": 2, "steps": 4},
    "aspl": {"iterations": 2, "surrogate_steps": 1, "steps": 3},
    "easpl": {"iterations": 1, "surrogate_steps": 1, "steps": 3, "models": ["sd21-base", "other-base"]},
    "metacloak": {
        "pool_train_steps": 1,
        "pool_interval": 1,
        "advance_steps": 1,
        "rounds": 1,
        "steps": 4,
        "eot_samples": 2,
        "eot_transforms": ["hflip", "blur", "jpeg"],
    },
}


def _crop(image: np.ndarray, top: int, left: int, side: int = 200) -> np.ndarray:
    return np.asarray(Image.fromarray(image[top : top + side, left : left + side]).resize((SIZE, SIZE)))


@pytest.fixture(scope="module")
def faces():
    from skimage import data

    ast = data.astronaut()
    images = [_crop(ast, 0, 150), _crop(ast, 20, 170)]
    references = [_crop(ast, 40, 130), _crop(ast, 10, 160)]
    return images, references


def _calibrate(protection, images) -> None:
    """Unit-variance latents for every surrogate's VAE (see the module docstring)."""
    bases = [m.base for m in getattr(protection, "members", [])] or [protection.model.base]
    for base in bases:
        with torch.no_grad():
            std = base.vae.encode(to_tensor(images, "cpu") * 2 - 1).latent_dist.mean.std().item()
        base.vae.register_to_config(scaling_factor=1.0 / std)


@pytest.fixture(scope="module", params=sorted(METHODS))
def runs(request, faces, one_torch_thread):
    name = request.param
    images, references = faces
    protection = build_protection(name, options={**COMMON, **METHODS[name]}, device="cpu")
    _calibrate(protection, images)
    first = protection.attack(images, references, "a")
    other = protection(images, references, "b")  # the same photos under another identity's name
    again = protection(images, references, "a")
    return name, protection, images, first, other, again


def test_outputs_have_the_inputs_shape_and_dtype(runs):
    _, _, images, first, other, again = runs
    for results in (first.results, other, again):
        assert len(results) == len(images)
        for res, image in zip(results, images, strict=True):
            assert res.image.dtype == np.uint8 and res.image.shape == image.shape
            assert np.isfinite(res.loss_before) and np.isfinite(res.loss_after)


def test_uint8_perturbation_respects_the_budget(runs):
    _, _, images, first, _, _ = runs
    for res, image in zip(first.results, images, strict=True):
        linf, l2 = perturbation_norms(res.image, image)
        assert linf <= RADIUS / 255 + 1e-12
        assert l2 > 0  # the image was actually perturbed


def test_raises_the_instance_loss(runs):
    name, _, _, first, _, _ = runs
    for res in first.results:
        assert res.loss_after > res.loss_before, name


def test_beats_random_sign_noise_of_the_same_budget(runs):
    name, _, images, first, _, _ = runs
    clean = np.array(first.score(images))
    gain = np.mean([r.loss_after for r in first.results] - clean)
    rng = np.random.default_rng(0)
    noise_gains = []
    for _ in range(3):
        noisy = [
            np.clip(im.astype(np.int16) + RADIUS * rng.choice([-1, 1], im.shape), 0, 255).astype(np.uint8)
            for im in images
        ]
        noise_gains.append(np.mean(np.array(first.score(noisy)) - clean))
    assert gain > max(noise_gains), (name, gain, noise_gains)


def test_deterministic_and_nothing_carried_between_identities(runs):
    name, _, _, first, _, again = runs
    for a, b in zip(first.results, again, strict=True):
        np.testing.assert_array_equal(a.image, b.image)
        assert a.loss_before == b.loss_before and a.loss_after == b.loss_after, name


def test_seeded_by_the_identity_name(runs):
    name, _, _, first, other, _ = runs
    assert any(not np.array_equal(a.image, b.image) for a, b in zip(first.results, other, strict=True)), name


def test_identity_result_depends_only_on_its_own_images(runs, faces):
    """Protecting identity "a" with one image gives that image's slot only, and no other photo leaks in:
    the result is what a fresh object computes from the same inputs."""
    name, protection, images, *_ = runs
    _, references = faces
    single = protection(images[:1], references, "solo")
    fresh = build_protection(name, options={**COMMON, **METHODS[name]}, device="cpu")
    _calibrate(fresh, images)
    alone = fresh(images[:1], references, "solo")
    assert len(single) == 1 and single[0].image.shape == images[0].shape
    np.testing.assert_array_equal(single[0].image, alone[0].image)


# ------------------------------------------------------------------------------------------ options


def test_options_are_validated_with_the_field_name():
    with pytest.raises(ValueError, match="surrogate_stepz"):
        build_protection("aspl", options={"surrogate_stepz": 1})
    with pytest.raises(ValueError, match="blur_kernel_size"):
        build_protection("metacloak", options={"blur_kernel_size": 4})
    with pytest.raises(ValueError, match="models"):
        build_protection("easpl", options={"models": ["sd21-base", "sd21-base"]})
    with pytest.raises(ValueError, match="resolution"):
        build_protection("fsmg", options={"resolution": 30})


def test_release_defaults():
    from raypdm.protect.aspl import ASPLOptions
    from raypdm.protect.easpl import EASPLOptions
    from raypdm.protect.fsmg import FSMGOptions
    from raypdm.protect.metacloak import MetaCloakOptions

    aspl = ASPLOptions()
    assert (aspl.iterations, aspl.surrogate_steps, aspl.steps, aspl.lr) == (50, 3, 6, 5e-7)
    assert aspl.prompts().instance_prompt() == "a photo of sks person"
    assert aspl.prompts().class_prompt() == "a photo of person"
    assert (aspl.radius, aspl.step, aspl.num_class_images) == (11 / 255, 1 / 255, 200)
    assert len(EASPLOptions().models) == 3
    fsmg = FSMGOptions()
    assert (fsmg.finetune_steps, fsmg.steps, fsmg.train_batch_size) == (1000, 100, 2)
    mc = MetaCloakOptions()
    assert mc.step == pytest.approx(mc.radius / 10)
    assert (mc.steps, mc.pool_size, mc.advance_steps, mc.rounds, mc.blur_kernel_size) == (6, 6, 2, 4, 7)


def test_easpl_config_names_every_member():
    p = build_protection("easpl", options={"models": ["sd21-base", "x"], "iterations": 1}, device="cpu")
    weights = p.config_dict()["weights"]
    assert set(weights) == {"sd21-base", "x"} and weights["sd21-base"] != weights["x"]
    a, b = (p.members[0].base.unet, p.members[1].base.unet)
    assert not torch.equal(next(a.parameters()), next(b.parameters()))  # different "base models"


def test_easpl_members_from_folders(tmp_path):
    """With real weights, an unregistered entry is a diffusers folder under weights_dir (SD 1.x there)."""
    from raypdm import models

    saved = models.build("sd21-base", "tiny")
    with torch.no_grad():
        next(saved.unet.parameters()).add_(1.0)  # not the registry's weights
    saved.save_pretrained(tmp_path / "my-sd")
    p = build_protection("easpl", options={"models": ["my-sd"]}, preset="full", weights_dir=str(tmp_path))
    assert p.config_dict()["weights"]["my-sd"].startswith("folder:")
    assert torch.equal(next(p.members[0].base.unet.parameters()), next(saved.unet.parameters()))
    with pytest.raises(FileNotFoundError, match="missing-sd"):
        build_protection("easpl", options={"models": ["missing-sd"]}, preset="full", weights_dir=str(tmp_path))


def test_without_references_the_surrogate_learns_from_the_images(faces):
    images, references = faces
    p = build_protection("fsmg", options={**COMMON, **METHODS["fsmg"]}, device="cpu")
    without = p(images, [], "a")
    with_refs = p(images, references, "a")
    assert len(without) == len(images)
    assert any(not np.array_equal(a.image, b.image) for a, b in zip(without, with_refs, strict=True))


def test_class_images_from_a_folder(tmp_path):
    from raypdm.protect.surrogate import SurrogateOptions, load_class_images

    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(tmp_path / f"{i:05d}.png")
    got = load_class_images(None, SurrogateOptions(class_images=str(tmp_path), num_class_images=2), "cpu")
    assert len(got) == 2 and got[0].shape == (SIZE, SIZE, 3)
    with pytest.raises(ValueError, match="num_class_images"):
        load_class_images(None, SurrogateOptions(class_images=str(tmp_path), num_class_images=3), "cpu")


def test_model_input_matches_the_trainer_resize():
    """The attack sees the images the way the trainer encodes them (shorter side, centre crop)."""
    from raypdm.protect.surrogate import model_input
    from raypdm.train.dreambooth import _to_square_tensor

    rng = np.random.default_rng(1)
    image = np.asarray(Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).resize((40, 48)))
    ours = model_input(to_tensor([image], "cpu"), SIZE)[0] * 2 - 1
    theirs = _to_square_tensor(image, SIZE)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().mean() < 0.02


# ------------------------------------------------------------------------------- EOT transformations


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, SIZE, SIZE, generator=g)


@pytest.mark.parametrize("transform", ["hflip", "crop", "resize", "blur"])
def test_eot_differentiable_transforms(batch, transform):
    from raypdm.protect import metacloak as mc

    fn = {
        "hflip": mc.hflip,
        "crop": lambda x: mc.crop_resize(x, 2, 3, 24, 26),
        "resize": lambda x: mc.resize_roundtrip(x, 0.5),
        "blur": lambda x: mc.gaussian_blur(x, 7, 1.5),
    }[transform]
    x = batch.clone().requires_grad_(True)
    y = fn(x)
    assert y.shape == x.shape
    assert not torch.allclose(y, batch)
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad((y * weights).sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # The gradient is the true one, not a straight-through identity.
    assert not torch.allclose(grad, weights)


def test_eot_blur_preserves_constants_and_mean(batch):
    from raypdm.protect.metacloak import gaussian_blur

    flat = torch.full((1, 3, SIZE, SIZE), 0.3)
    assert torch.allclose(gaussian_blur(flat, 7, 2.0), flat, atol=1e-6)
    assert torch.allclose(gaussian_blur(batch, 7, 1e-3), batch, atol=1e-5)  # σ → 0 is the identity


def test_eot_jpeg_is_straight_through(batch):
    import io

    from raypdm.protect.metacloak import jpeg_straight_through

    x = batch.clone().requires_grad_(True)
    y = jpeg_straight_through(x, [60, 90])
    arr = np.round(batch[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=60)
    ref = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255
    np.testing.assert_allclose(y[0].detach().permute(1, 2, 0).numpy(), ref, atol=1e-6)
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    (grad,) = torch.autograd.grad((y * weights).sum(), x)
    assert torch.equal(grad, weights)


def test_eot_transform_is_per_image_and_seeded(batch):
    from raypdm.protect.metacloak import EOTTransform, MetaCloakOptions
    from raypdm.protect.pgd import generators_for

    eot = EOTTransform(MetaCloakOptions(eot_probability=1.0))
    both = eot(batch, generators_for([5, 6]))
    assert both.shape == batch.shape
    alone = eot(batch[1:], generators_for([6]))
    torch.testing.assert_close(both[1:], alone)  # image 1 does not depend on image 0
    torch.testing.assert_close(eot(batch, generators_for([5, 6])), both)
    assert not torch.allclose(eot(batch, generators_for([7, 8])), both)
    x = batch.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(eot(x, generators_for([5, 6])).sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
