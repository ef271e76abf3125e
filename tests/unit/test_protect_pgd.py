"""The PGD core and the protection framework: the ℓ∞ bound on the saved uint8 image, projection,
quantisation, per-sample randomness, options parsing and the registry. No diffusion models here."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from raypdm.protect.base import (
    ImageProtection,
    ProtectContext,
    ProtectOptions,
    ProtectResult,
    build_protection,
    image_seed,
    list_protections,
    parse_fraction,
    protection_options_model,
    register_protection,
    weights_identity,
)
from raypdm.protect.pgd import (
    budget_levels,
    crop_to,
    generators_for,
    pad_to_multiple,
    perturbation_norms,
    pgd_linf,
    quantise,
    to_tensor,
    to_uint8,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _grid_images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, 3, h, w), generator=g).float() / 255.0
    # Saturated pixels are where clipping to [0, 1] and the ball interact: put some in.
    x[:, :, 0, :] = 0.0
    x[:, :, -1, :] = 1.0
    return x


def _linear_objective(b: int, h: int, w: int, seed: int = 1):
    weights = torch.randn((b, 3, h, w), generator=torch.Generator().manual_seed(seed))
    return weights, lambda z: (z * weights).flatten(1).sum(1)


# ------------------------------------------------------------------------------------ parse_fraction


@pytest.mark.parametrize(
    ("value", "expected"),
    [("11/255", 11 / 255), ("0.05", 0.05), (" 16 / 255 ", 16 / 255), (0.1, 0.1), (8, 8.0), ("1e-2", 0.01)],
)
def test_parse_fraction(value, expected):
    assert parse_fraction(value) == pytest.approx(expected, rel=0, abs=1e-15)


@pytest.mark.parametrize("value", ["eleven/255", "11/0", "", "nan", "1/2/3", True, None, [1]])
def test_parse_fraction_errors_name_the_value(value):
    with pytest.raises(ValueError, match=re.escape(repr(value))):
        parse_fraction(value)


def test_options_accept_fraction_strings_and_forbid_unknown_keys():
    opts = ProtectOptions(radius="16/255", step="0.5/255")
    assert opts.radius == 16 / 255 and opts.step == pytest.approx(0.5 / 255)
    assert ProtectOptions().radius == 11 / 255 and ProtectOptions().steps == 6
    with pytest.raises(ValueError, match="radius"):
        ProtectOptions(radius="a/3")
    with pytest.raises(ValueError, match="radus"):
        ProtectOptions(radus=0.1)
    with pytest.raises(ValueError, match="radius"):
        ProtectOptions(radius=0)
    with pytest.raises(ValueError):  # frozen: hashed configs must not change under the pipeline
        ProtectOptions().steps = 3


# ------------------------------------------------------------------------------------------ quantise


@pytest.mark.parametrize("radius", [11 / 255, 16 / 255, 8 / 255, 0.05, 3.5 / 255, 1 / 255])
def test_quantised_uint8_satisfies_the_bound_exactly(radius):
    x = _grid_images(3, 16, 16)
    wild = x + (torch.rand(x.shape, generator=torch.Generator().manual_seed(2)) * 2 - 1) * 3 * radius
    q = quantise(wild, x, radius)
    assert torch.equal(q, torch.round(q * 255) / 255), "not on the 1/255 grid"
    assert q.min() >= 0 and q.max() <= 1
    for protected, clean in zip(to_uint8(q), to_uint8(x), strict=True):
        linf, _ = perturbation_norms(protected, clean)
        assert linf <= radius
        # The whole budget is usable: some pixel sits exactly at floor(255 r) levels.
        assert linf == budget_levels(radius) / 255
    assert budget_levels(11 / 255) == 11 and budget_levels(16 / 255) == 16 and budget_levels(0.05) == 12


def test_quantise_handles_off_grid_clean_images():
    # A clean image that is not on the grid (e.g. decoded in float) is measured by its rounded value.
    x = torch.full((1, 3, 4, 4), 100.4 / 255)
    q = quantise(torch.full_like(x, 1.0), x, 11 / 255)
    assert torch.allclose(q * 255, torch.full_like(x, 111.0))


# ------------------------------------------------------------------------------------------ pgd_linf


@pytest.mark.parametrize("radius", [11 / 255, 16 / 255])
@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_bound_range_and_ascent(radius, random_start):
    x = _grid_images(2, 12, 10)
    _, objective = _linear_objective(2, 12, 10)
    res = pgd_linf(
        x, objective, radius=radius, step=2 / 255, steps=3, random_start=random_start, generator=generators_for([5, 6])
    )
    assert res.x_adv.shape == x.shape and res.loss_before.shape == (2,) and res.loss_after.shape == (2,)
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    assert torch.equal(res.x_adv, torch.round(res.x_adv * 255) / 255)
    for protected, clean in zip(to_uint8(res.x_adv), to_uint8(x), strict=True):
        assert perturbation_norms(protected, clean)[0] <= radius
    assert torch.equal(res.loss_before, objective(x))
    assert torch.allclose(res.loss_after, objective(res.x_adv))  # measured at the quantised point
    assert (res.loss_after > res.loss_before).all()


def test_pgd_reaches_the_linear_optimum_inside_the_box():
    # For a linear objective the optimum of the ball ∩ [0, 1] is x + r·sign(w), clipped: PGD with
    # enough steps of size 1/255 must land exactly there (saturated pixels stay in range).
    x = _grid_images(1, 8, 8)
    weights, objective = _linear_objective(1, 8, 8)
    res = pgd_linf(x, objective, radius=4 / 255, step=1 / 255, steps=6)
    assert torch.allclose(res.x_adv, (x + 4 / 255 * weights.sign()).clamp(0, 1), atol=1e-6)


def test_pgd_random_start_is_per_sample():
    # Sample i's random start comes from generator i alone: the same image with the same generator
    # seed gets the same start whatever else shares the batch.
    x = _grid_images(3, 8, 8)

    def zero(z):  # no ascent: x_adv is the quantised random start
        return z.flatten(1).sum(1) * 0.0

    together = pgd_linf(
        x, zero, radius=8 / 255, step=1 / 255, steps=1, random_start=True, generator=generators_for([1, 2, 3])
    )
    alone = pgd_linf(
        x[2:], zero, radius=8 / 255, step=1 / 255, steps=1, random_start=True, generator=generators_for([3])
    )
    assert torch.equal(together.x_adv[2:], alone.x_adv)
    assert not torch.equal(together.x_adv[0] - x[0], together.x_adv[1] - x[1])
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        pgd_linf(x, zero, radius=0.1, step=0.01, steps=1, random_start=True, generator=generators_for([1, 2]))


def test_pgd_x_init_continues_and_is_projected():
    x = _grid_images(1, 8, 8)
    _, objective = _linear_objective(1, 8, 8)
    far = x + 0.5  # outside the ball: projected back before the first step
    res = pgd_linf(x, objective, radius=4 / 255, step=1 / 255, steps=0, x_init=far)
    assert perturbation_norms(to_uint8(res.x_adv)[0], to_uint8(x)[0])[0] <= 4 / 255
    first = pgd_linf(x, objective, radius=6 / 255, step=1 / 255, steps=2)
    second = pgd_linf(x, objective, radius=6 / 255, step=1 / 255, steps=2, x_init=first.x_adv)
    straight = pgd_linf(x, objective, radius=6 / 255, step=1 / 255, steps=4)
    assert torch.allclose(second.x_adv, straight.x_adv, atol=1e-6)


def test_pgd_eval_objective_scores_before_and_after():
    x = _grid_images(1, 4, 4)
    _, objective = _linear_objective(1, 4, 4)
    res = pgd_linf(x, objective, radius=2 / 255, step=1 / 255, steps=1, eval_objective=lambda z: z.flatten(1).mean(1))
    assert torch.allclose(res.loss_before, x.flatten(1).mean(1))
    assert torch.allclose(res.loss_after, res.x_adv.flatten(1).mean(1))


def test_pgd_rejects_a_scalar_or_detached_objective():
    x = _grid_images(2, 4, 4)
    with pytest.raises(ValueError, match="one loss per sample"):
        pgd_linf(x, lambda z: z.sum(), radius=0.1, step=0.01, steps=1)
    with pytest.raises(RuntimeError, match="does not depend on x_adv"):
        pgd_linf(x, lambda z: torch.zeros(len(z)), radius=0.1, step=0.01, steps=1)


# --------------------------------------------------------------------------------------------- pixels


def test_tensor_roundtrip_and_norms(astronaut):
    images = [astronaut[:20, :24].copy(), astronaut[20:40, :24].copy()]
    x = to_tensor(images, "cpu")
    assert x.shape == (2, 3, 20, 24) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    back = to_uint8(x)
    assert all(b.dtype == np.uint8 and np.array_equal(b, im) for b, im in zip(back, images, strict=True))
    with pytest.raises(ValueError, match="different shapes"):
        to_tensor([images[0], astronaut[:8, :8]], "cpu")
    moved = images[0].astype(np.int32)
    moved[0, 0, 0] += 3 if moved[0, 0, 0] < 250 else -3
    moved[1, 1, 1] += 4 if moved[1, 1, 1] < 250 else -4
    linf, l2 = perturbation_norms(moved.astype(np.uint8), images[0])
    assert linf == 4 / 255 and l2 == pytest.approx(5 / 255)


@pytest.mark.parametrize("shape", [(16, 24), (13, 21), (5, 3)])
def test_pad_to_multiple_and_crop(shape):
    x = torch.rand(1, 3, *shape)
    padded = pad_to_multiple(x, 8)
    assert padded.shape[-2] % 8 == 0 and padded.shape[-1] % 8 == 0
    assert torch.equal(crop_to(padded, shape), x)


def test_image_seed_depends_on_bytes_shape_and_seed(astronaut):
    a = astronaut[:16, :16].copy()
    assert image_seed(a, 0) == image_seed(a.copy(), 0)
    assert image_seed(a, 0) != image_seed(a, 1)
    b = a.copy()
    b[0, 0, 0] ^= 1
    assert image_seed(a, 0) != image_seed(b, 0)
    assert image_seed(a, 0) != image_seed(a.reshape(8, 32, 3), 0)
    assert 0 <= image_seed(a, 0) < 2**63


# ------------------------------------------------------------------------------------------- registry


class _ShiftOptions(ProtectOptions, frozen=True):
    amount: int = 1


@register_protection("test_shift", _ShiftOptions)
class _Shift(ImageProtection):
    """A toy protection registered by this test module (not GPU, no models)."""

    name = "test_shift"
    uses_gpu = False
    weight_models = ()

    def __init__(self, options, context):
        self.options, self.context = options, context

    def protect(self, images):
        return [
            ProtectResult(np.clip(im.astype(int) + self.options.amount, 0, 255).astype(np.uint8), 0.0, 1.0)
            for im in images
        ]


def test_registry_builds_and_validates():
    assert "test_shift" in list_protections()
    prot = build_protection("Test-Shift", options={"amount": 2, "radius": "4/255"}, device="cpu")
    assert isinstance(prot, _Shift) and prot.options.amount == 2 and prot.options.radius == 4 / 255
    assert protection_options_model("test-shift") is _ShiftOptions
    image = np.zeros((4, 4, 3), np.uint8)
    assert prot([image])[0].image.max() == 2
    config = prot.config_dict()
    assert config["name"] == "test_shift" and config["amount"] == 2 and config["preset"] == "tiny"
    assert "device" not in config and "cpu" not in str(config)
    with pytest.raises(ValueError, match="amont"):
        build_protection("test_shift", options={"amont": 2})
    with pytest.raises(ValueError, match="unknown protection 'nope'.*test_shift"):
        build_protection("nope")
    with pytest.raises(ValueError, match="preset"):
        build_protection("test_shift", preset="huge")
    with pytest.raises(ValueError, match="must match"):
        register_protection("Bad-Name", _ShiftOptions)
    with pytest.raises(ValueError, match="already registered"):
        register_protection("test_shift", _ShiftOptions)(lambda options, context: None)
    with pytest.raises(ValueError, match="uint8"):
        prot([np.zeros((4, 4, 3), np.float32)])


def test_protection_output_is_checked():
    class Bad(_Shift):
        def protect(self, images):
            return [ProtectResult(im[:2], 0.0, 0.0) for im in images]

    with pytest.raises(RuntimeError, match="shape"):
        Bad(_ShiftOptions(), ProtectContext())([np.zeros((4, 4, 3), np.uint8)])


def test_weights_identity(tmp_path):
    assert weights_identity("sd21-base", ProtectContext(preset="tiny", weights_dir=str(tmp_path))) == "random:tiny"
    folder = tmp_path / "sd21-base" / "unet"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"a": 1}')
    full = ProtectContext(preset="full", weights_dir=str(tmp_path))
    first = weights_identity("sd21-base", full)
    assert first.startswith("files:") and first == weights_identity("sd21-base", full)
    (folder / "config.json").write_text('{"a": 2}')
    assert weights_identity("sd21-base", full) != first
