"""JPEG, Gaussian and TVM purifiers on real photos (scikit-image's astronaut, chelsea, coffee)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from scipy.ndimage import gaussian_filter, laplace
from skimage import data
from skimage.metrics import peak_signal_noise_ratio
from skimage.restoration import denoise_tv_chambolle

from raypdm.purify import build_purifier
from raypdm.purify.gaussian import opencv_sigma
from raypdm.purify.tvm import masked_tv_reconstruct


@pytest.fixture(scope="module")
def photos():
    return [data.astronaut(), data.chelsea(), data.coffee()]  # 512x512, 300x451, 400x600


def laplacian_variance(image: np.ndarray) -> float:
    """High-frequency energy: variance of the Laplacian of the grey image."""
    grey = image.astype(np.float64).mean(axis=2)
    return float(laplace(grey).var())


def psnr(a, b):
    return peak_signal_noise_ratio(a, b, data_range=255)


@pytest.mark.parametrize(
    "spec", ["jpeg", "gaussian", "tvm", "gaussian+jpeg"]
)
@pytest.mark.parametrize("mode_options", [None, {"gaussian": {"mode": "pil_radius"}}])
def test_shape_dtype_range_order_and_batch_invariance(photos, spec, mode_options):
    options = mode_options if mode_options and "gaussian" in spec else None
    purifier = build_purifier(spec, options=options)
    assert not purifier.uses_gpu
    out = purifier(photos)
    assert len(out) == len(photos)
    for x, y in zip(photos, out, strict=True):
        assert y.shape == x.shape and y.dtype == np.uint8
        assert 0 < y.mean() < 255
    # A batch gives what single images give (TVM's mask is per image, not per batch position).
    singles = [purifier([x])[0] for x in reversed(photos)][::-1]
    for y, s in zip(out, singles, strict=True):
        np.testing.assert_array_equal(y, s)


# ----------------------------------------------------------------------------------------------- JPEG


def test_jpeg_quality_100_is_near_identity_and_10_is_much_worse(photos):
    q100 = build_purifier("jpeg", options={"jpeg": {"quality": 100, "subsampling": "4:4:4"}})(photos)
    # PIL's default 4:2:0 halves chroma resolution whatever the quality: coffee's saturated edges then
    # cap it just under 40 dB.
    q100_420 = build_purifier("jpeg", options={"jpeg": {"quality": 100}})(photos)
    q10 = build_purifier("jpeg", options={"jpeg": {"quality": 10}})(photos)
    for x, hi, hi_420, lo in zip(photos, q100, q100_420, q10, strict=True):
        assert psnr(x, hi) > 40
        assert psnr(x, hi_420) > 37
        assert psnr(x, lo) < psnr(x, hi_420) - 10


def test_jpeg_matches_a_direct_pil_round_trip(photos):
    def direct(x, quality, subsampling):
        buffer = io.BytesIO()
        Image.fromarray(x).save(buffer, format="JPEG", quality=quality, subsampling=subsampling)
        return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))

    for opts in ({}, {"quality": 40, "subsampling": "4:4:4"}):
        out = build_purifier("jpeg", options={"jpeg": opts})(photos)
        for x, y in zip(photos, out, strict=True):
            np.testing.assert_array_equal(y, direct(x, opts.get("quality", 75), opts.get("subsampling", 2)))


# ------------------------------------------------------------------------------------------- Gaussian


def test_gaussian_kernel_mode_defaults_to_5x5_with_opencv_sigma(photos):
    purifier = build_purifier("gaussian")
    assert purifier.config_dict() == {"name": "gaussian", "mode": "kernel", "kernel_size": 5, "sigma": opencv_sigma(5)}
    assert opencv_sigma(5) == pytest.approx(1.1)
    x = photos[1]
    # scipy's Gaussian with radius 2 is the same 5-tap kernel; "mirror" is OpenCV's BORDER_REFLECT_101.
    expected = np.stack(
        [gaussian_filter(x[..., c].astype(np.float64), sigma=1.1, radius=2, mode="mirror") for c in range(3)], -1
    )
    diff = np.abs(purifier([x])[0].astype(np.float64) - expected)
    assert diff.max() <= 0.5 + 1e-3  # only rounding


def test_gaussian_reduces_high_frequencies_and_pil_radius_blurs_more(photos):
    kernel = build_purifier("gaussian")(photos)
    pil = build_purifier("gaussian", options={"gaussian": {"mode": "pil_radius"}})(photos)
    for x, k, p in zip(photos, kernel, pil, strict=True):
        assert laplacian_variance(k) < 0.5 * laplacian_variance(x)
        assert laplacian_variance(p) < 0.1 * laplacian_variance(k)


def test_gaussian_pil_radius_is_the_papers_code(photos):
    out = build_purifier("gaussian", options={"gaussian": {"mode": "pil_radius", "radius": 5}})(photos[:1])[0]
    expected = np.asarray(Image.fromarray(photos[0]).filter(ImageFilter.GaussianBlur(radius=5)))
    np.testing.assert_array_equal(out, expected)


def test_gaussian_config_only_hashes_the_active_mode():
    a = build_purifier("gaussian", options={"gaussian": {"mode": "pil_radius", "kernel_size": 7}})
    b = build_purifier("gaussian", options={"gaussian": {"mode": "pil_radius"}})
    assert a.config_dict() == b.config_dict()


# ------------------------------------------------------------------------------------------------ TVM


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)


def test_tv_solver_matches_skimage_rof_without_dropout(photos):
    small = _resize(torch.from_numpy(photos[0]).permute(2, 0, 1)[None].double() / 255, (64, 64)).clamp(0, 1)
    small = small[0].numpy()
    ours = masked_tv_reconstruct(small, np.ones((1, 64, 64)), 0.03, 300).transpose(1, 2, 0)
    reference = denoise_tv_chambolle(small.transpose(1, 2, 0), weight=0.03, eps=1e-9, channel_axis=-1)
    # 300 iterations: within a grey level everywhere, far closer on average.
    assert np.abs(ours - reference).max() * 255 < 1.5
    assert np.abs(ours - reference).mean() * 255 < 0.1


def test_tv_solver_ignores_dropped_pixels():
    # A flat grey patch with one wild pixel: kept, TV only shrinks it; dropped, it is filled from its neighbours.
    y = np.full((1, 16, 16), 0.5)
    y[..., 8, 8] = 1.0
    mask = np.ones_like(y)
    kept = masked_tv_reconstruct(y, mask, 0.05, 300)
    mask[..., 8, 8] = 0
    dropped = masked_tv_reconstruct(y, mask, 0.05, 300)
    assert float(kept[0, 8, 8]) > 0.6
    assert float(dropped[0, 8, 8]) == pytest.approx(0.5, abs=1e-3)


def test_tvm_is_close_to_a_smooth_version_and_deterministic(photos):
    tvm = build_purifier("tvm")
    out = tvm(photos)
    assert all(np.array_equal(a, b) for a, b in zip(out, build_purifier("tvm")(photos), strict=True))
    for x, y in zip(photos, out, strict=True):
        t = torch.from_numpy(x).permute(2, 0, 1)[None].double() / 255
        # Smooth version: the same 64 px round trip with skimage's TV denoiser and no dropout.
        small = _resize(t, (64, 64)).clamp(0, 1)[0].permute(1, 2, 0).numpy()
        smooth = denoise_tv_chambolle(small, weight=0.03, eps=1e-6, channel_axis=-1)
        smooth = _resize(torch.from_numpy(smooth).permute(2, 0, 1)[None], x.shape[:2]).clamp(0, 1)
        smooth = np.rint(smooth[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        assert psnr(smooth, y) > 35
        assert laplacian_variance(y) < 0.2 * laplacian_variance(x)


def test_tvm_mask_depends_on_content(photos):
    tvm = build_purifier("tvm")
    assert (tvm._mask(photos[0]) != tvm._mask(photos[0][::-1].copy())).any()
    assert (tvm._mask(photos[0]) == tvm._mask(photos[0].copy())).all()
    assert abs(1 - tvm._mask(photos[0]).mean() - 0.02) < 0.01
    no_drop = build_purifier("tvm", options={"tvm": {"drop": 0.0}})([photos[0]])[0]
    assert not np.array_equal(no_drop, tvm([photos[0]])[0])
