"""Faithfulness metrics agree with the libraries called directly, on real photos."""

from __future__ import annotations

import math

import lpips
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

from raypdm.metrics.faithfulness import FaithfulnessScorer, ms_ssim_settings
from raypdm.purify import build_purifier

WANG_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def scorer():
    return FaithfulnessScorer("cpu", lpips_pretrained=False)


@pytest.fixture(scope="module")
def pairs():
    """(purified, input) pairs: JPEG-10 and JPEG-75 of 256 px crops of three photos."""
    clean = [
        data.astronaut()[::2, ::2].copy(),
        data.chelsea()[:256, :256].copy(),
        data.coffee()[100:356, 200:456].copy(),
    ]
    q10 = build_purifier("jpeg", options={"jpeg": {"quality": 10}})(clean)
    q75 = build_purifier("jpeg")(clean)
    return clean, q10, q75


def _tensor(images):
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()


def test_identical_images(scorer, pairs):
    clean, _, _ = pairs
    for s in scorer.score(clean, clean):
        assert s["lpips"] == pytest.approx(0.0, abs=1e-6)
        assert s["ssim"] == pytest.approx(1.0)
        assert s["ms_ssim"] == pytest.approx(1.0, abs=1e-5)
        assert s["psnr"] == math.inf
    capped = FaithfulnessScorer("cpu", psnr_cap=100.0).score(clean[:1], clean[:1])[0]
    assert capped["psnr"] == 100.0


def test_ssim_and_psnr_equal_skimage(scorer, pairs):
    clean, q10, _ = pairs
    for s, x, y in zip(scorer.score(q10, clean), q10, clean, strict=True):
        assert s["psnr"] == pytest.approx(peak_signal_noise_ratio(y, x, data_range=255), rel=1e-12)
        expected = structural_similarity(
            x, y, data_range=255, channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
        assert s["ssim"] == pytest.approx(expected, rel=1e-12)


def test_ms_ssim_equals_torchmetrics(scorer, pairs):
    clean, q10, _ = pairs  # 256 px: all five scales
    expected = multiscale_structural_similarity_index_measure(
        _tensor(q10), _tensor(clean), data_range=255.0, reduction="none"
    )
    got = [s["ms_ssim"] for s in scorer.score(q10, clean)]
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5)


@pytest.mark.filterwarnings("ignore::UserWarning:torchvision")  # lpips' own pretrained= call
def test_lpips_equals_the_lpips_package(scorer, pairs):
    clean, q10, _ = pairs
    torch.manual_seed(0)  # the scorer's random trunk is built from seed 0
    direct = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()
    with torch.no_grad():
        expected = [float(direct(lpips.im2tensor(x), lpips.im2tensor(y))) for x, y in zip(q10, clean, strict=True)]
    got = [s["lpips"] for s in scorer.score(q10, clean)]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_stronger_compression_is_less_faithful(scorer, pairs):
    clean, q10, q75 = pairs
    for bad, good in zip(scorer.score(q10, clean), scorer.score(q75, clean), strict=True):
        assert bad["ssim"] < good["ssim"] and bad["ms_ssim"] < good["ms_ssim"] and bad["psnr"] < good["psnr"]
        assert bad["lpips"] > 0 and good["lpips"] > 0


def test_small_images_use_fewer_ms_ssim_scales(scorer):
    assert [len(ms_ssim_settings(s)) for s in (512, 176, 175, 128, 64, 32)] == [5, 5, 4, 4, 3, 2]
    betas = ms_ssim_settings(128)
    assert sum(betas) == pytest.approx(1.0)
    assert np.allclose(np.array(betas) / betas[0], np.array(WANG_BETAS[:4]) / WANG_BETAS[0])
    x = data.astronaut()[::4, ::4].copy()  # 128 px
    y = build_purifier("jpeg", options={"jpeg": {"quality": 20}})([x])[0]
    expected = multiscale_structural_similarity_index_measure(_tensor([y]), _tensor([x]), data_range=255.0, betas=betas)
    assert scorer.score([y], [x])[0]["ms_ssim"] == pytest.approx(float(expected), rel=1e-5)


def test_reference_of_another_size_is_resized_to_the_image(scorer):
    x = data.astronaut()[::2, ::2].copy()  # 256 px purified image
    reference = data.astronaut()  # 512 px input
    resized = np.asarray(Image.fromarray(reference).resize((256, 256), Image.BICUBIC))
    assert scorer.score([x], [reference]) == scorer.score([x], [resized])


def test_mixed_sizes_keep_order(scorer, pairs):
    clean, q10, _ = pairs
    small = data.chelsea()[:64, :96].copy()
    small_q = build_purifier("jpeg", options={"jpeg": {"quality": 10}})([small])[0]
    batch = scorer.score([q10[0], small_q, q10[1]], [clean[0], small, clean[1]])
    alone = [scorer.score([a], [b])[0] for a, b in ((q10[0], clean[0]), (small_q, small), (q10[1], clean[1]))]
    for got, want in zip(batch, alone, strict=True):
        assert got == pytest.approx(want, rel=1e-5)


def test_bad_inputs(scorer, pairs):
    clean, _, _ = pairs
    with pytest.raises(ValueError, match="pairs"):
        scorer.score(clean, clean[:2])
    with pytest.raises(ValueError, match="uint8"):
        scorer.score([clean[0].astype(np.float32)], [clean[0]])
    with pytest.raises(ValueError, match="at least 32 px"):
        scorer.score([clean[0][:16]], [clean[0][:16]])


def test_pretrained_trunk_missing_names_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth") as err:
        FaithfulnessScorer("cpu", lpips_pretrained=True)
    assert str(tmp_path) in str(err.value)


def test_random_trunk_is_reproducible_and_leaves_the_global_rng_alone(scorer, pairs):
    clean, q10, _ = pairs
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    other = FaithfulnessScorer("cpu")
    assert torch.rand(1) == before
    assert other.score(q10[:1], clean[:1]) == scorer.score(q10[:1], clean[:1])
    assert other.config_dict()["lpips_backbone"] == "random-seed0"


def test_without_lpips_no_trunk_is_needed_and_lpips_is_nan(pairs, tmp_path, monkeypatch):
    """SSIM/MS-SSIM/PSNR alone (`evaluate --metrics ssim`) must run on a machine without the AlexNet file."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    scorer = FaithfulnessScorer("cpu", lpips_pretrained=True, with_lpips=False)
    clean, q10, _ = pairs
    rows = scorer.score(q10, clean)
    assert all(math.isnan(r["lpips"]) and r["ssim"] > 0 and not math.isnan(r["ms_ssim"]) for r in rows)
    assert scorer.config_dict()["lpips"] is None
