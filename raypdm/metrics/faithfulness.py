"""Faithfulness of a purified image to a reference: LPIPS, SSIM, MS-SSIM, PSNR.

The reference is the purifier's input (how much did purification change the image) or the clean image
(how close to clean did it get). Inputs are uint8 HxWx3 RGB arrays; all metrics run on 0..255 values
with ``data_range=255``.

Choices:
- LPIPS: ``lpips`` package, AlexNet trunk, v0.1 linear layers (shipped inside the package, offline).
  The ImageNet AlexNet trunk comes from ``<weights_dir>/lpips-alex/`` or torchvision's cache under
  ``TORCH_HOME`` (``raypdm.models.lpips_trunks``); with
  ``lpips_pretrained=False`` the trunk is random (fixed seed 0, so values are reproducible) and the
  numbers are only useful for tests and smoke runs, never comparable with published LPIPS.
- SSIM: ``skimage.metrics.structural_similarity`` with Wang et al.'s settings (11 x 11 Gaussian
  window, sigma 1.5, population covariance), per channel and averaged (``channel_axis``).
- MS-SSIM: ``torchmetrics`` (5 scales, Wang et al.'s weights, 11 x 11 Gaussian window, its default
  ``normalize="relu"``). Five scales need the coarsest scale (side / 16) to still hold the window, so
  about 176 px; smaller images use the largest number of scales that fits (128 px: 4, 64 px: 3) with
  the first weights renormalised to sum to one. Values for images of different sizes are then not
  strictly comparable; the pipeline scores at a fixed resolution, where this does not arise.
- PSNR: ``10 log10(255^2 / MSE)``; ``+inf`` for identical images, as skimage returns. Pass
  ``psnr_cap`` (e.g. 100 dB) to get a finite value that means and standard deviations can use.
- Pairs of different sizes: the reference ``b`` is resized to ``a``'s size (PIL bicubic) first.
- Images must be at least ``MIN_SIDE`` (32) px on each side: LPIPS-AlexNet needs 31 px to reach its
  last layer, SSIM needs its 11 px window.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from skimage.metrics import structural_similarity
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

__all__ = [
    "MIN_SIDE",
    "MSSSIM_BETAS",
    "SSIM_KWARGS",
    "FaithfulnessScorer",
    "alexnet_weights_path",
    "load_lpips",
    "ms_ssim_settings",
    "psnr",
    "ssim",
]

MIN_SIDE = 32
SSIM_KWARGS: dict[str, Any] = {
    "data_range": 255,
    "channel_axis": -1,
    "gaussian_weights": True,
    "sigma": 1.5,
    "use_sample_covariance": False,
}
MSSSIM_KERNEL = 11
MSSSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
LPIPS_RANDOM_SEED = 0


def psnr(a: np.ndarray, b: np.ndarray, cap: float | None = None) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    value = math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)
    return min(value, cap) if cap is not None else value


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    return float(structural_similarity(a, b, **SSIM_KWARGS))


def ms_ssim_settings(min_side: int) -> tuple[float, ...]:
    """MS-SSIM weights for an image whose shorter side is ``min_side``: as many scales as fit.

    A scale count fits when the coarsest scale (``min_side // 2**(n-1)``) holds the 11 px window and
    torchmetrics' own size checks pass.
    """
    k = MSSSIM_KERNEL
    for n in range(len(MSSSIM_BETAS), 0, -1):
        fits = min_side // 2 ** (n - 1) >= k
        torchmetrics_ok = min_side >= 2**n and min_side // max(1, n - 1) ** 2 > k - 1
        if fits and torchmetrics_ok:
            betas = MSSSIM_BETAS[:n]
            total = sum(betas)
            return tuple(beta / total for beta in betas) if n < len(MSSSIM_BETAS) else betas
    raise ValueError(f"MS-SSIM needs images of at least {k} px per side, got {min_side}")


def alexnet_weights_path(weights_dir: str | os.PathLike | None = None) -> str:
    """Where LPIPS's ImageNet AlexNet trunk is read from: ``<weights_dir>/lpips-alex/`` when that holds it
    (or when torchvision's cache does not), else torchvision's cache under ``TORCH_HOME``."""
    from raypdm.models.lpips_trunks import find_trunk, trunk_candidates

    found = find_trunk("alex", weights_dir)
    return str(found if found is not None else trunk_candidates("alex", weights_dir)[0])


def load_lpips(
    device: str | torch.device = "cpu", pretrained_backbone: bool = False, weights_dir: str | os.PathLike | None = None
) -> torch.nn.Module:
    """LPIPS-Alex in eval mode on ``device``; never touches the network.

    ``pretrained_backbone=True`` reads torchvision's ImageNet AlexNet file from ``<weights_dir>/lpips-alex/``
    (``raypdm models fetch --model lpips-alex``) or torchvision's cache, sha256-checked; a missing one is a
    ``MissingWeightsError`` (a FileNotFoundError) naming both places, the fetch command and ``--lpips random``.
    ``False``: the seeded random trunk (seed ``LPIPS_RANDOM_SEED``).
    """
    from raypdm.models.lpips_trunks import build_lpips, load_lpips_net

    if pretrained_backbone:
        return load_lpips_net("alex", device, weights_dir)
    return build_lpips("alex", device)


def _to_tensor(images: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).to(device).permute(0, 3, 1, 2).float()


class FaithfulnessScorer:
    """Scores batches of image pairs; loads LPIPS once (one scorer per actor).

    ``score(a, b)`` returns, for each pair, ``{"lpips", "ssim", "ms_ssim", "psnr"}`` as floats; ``b`` is
    resized (PIL bicubic) to ``a``'s size where the sizes differ.
    """

    def __init__(
        self,
        device: str | torch.device | None = None,
        lpips_pretrained: bool = False,
        *,
        batch_size: int = 16,
        psnr_cap: float | None = None,
        weights_dir: str | os.PathLike | None = None,
        with_lpips: bool = True,
    ):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.lpips_pretrained = lpips_pretrained
        self.batch_size = batch_size
        self.psnr_cap = psnr_cap
        # Without LPIPS (a caller that asked only for SSIM/MS-SSIM/PSNR) no trunk is loaded or needed, and
        # the `lpips` value stays NaN.
        self.lpips = load_lpips(self.device, pretrained_backbone=lpips_pretrained, weights_dir=weights_dir) if with_lpips else None

    def config_dict(self) -> dict[str, Any]:
        """What changes the scores (for a stage config hash)."""
        return {
            "lpips": "alex-v0.1" if self.lpips is not None else None,
            "lpips_backbone": (None if self.lpips is None
                               else "imagenet" if self.lpips_pretrained else f"random-seed{LPIPS_RANDOM_SEED}"),
            "ssim": {k: v for k, v in SSIM_KWARGS.items() if k != "channel_axis"},
            "ms_ssim": {"kernel": MSSSIM_KERNEL, "betas": list(MSSSIM_BETAS), "normalize": "relu"},
            "psnr_cap": self.psnr_cap,
        }

    @staticmethod
    def _check(image: np.ndarray, where: str) -> None:
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise ValueError(f"{where}: expected a uint8 HxWx3 array, got {got}")
        if min(image.shape[:2]) < MIN_SIDE:
            raise ValueError(f"{where}: faithfulness metrics need at least {MIN_SIDE} px per side, got {image.shape}")

    @torch.no_grad()
    def score(self, a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> list[dict[str, float]]:
        if len(a) != len(b):
            raise ValueError(f"score() needs pairs: got {len(a)} images and {len(b)} references")
        pairs = []
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            self._check(x, f"image {i}")
            self._check(y, f"reference {i}")
            if y.shape != x.shape:
                y = np.asarray(Image.fromarray(y).resize((x.shape[1], x.shape[0]), Image.BICUBIC))
            pairs.append((x, y))

        results = [
            {"lpips": math.nan, "ssim": ssim(x, y), "ms_ssim": math.nan, "psnr": psnr(x, y, self.psnr_cap)}
            for x, y in pairs
        ]
        # LPIPS and MS-SSIM run batched on the device, one group of equal sizes at a time.
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (x, _) in enumerate(pairs):
            groups.setdefault(x.shape[:2], []).append(i)
        for (h, w), indices in groups.items():
            betas = ms_ssim_settings(min(h, w))
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                xs = _to_tensor([pairs[i][0] for i in chunk], self.device)
                ys = _to_tensor([pairs[i][1] for i in chunk], self.device)
                # lpips expects [-1, 1] inputs.
                d = (self.lpips(xs / 127.5 - 1.0, ys / 127.5 - 1.0).flatten() if self.lpips is not None
                     else torch.full((len(chunk),), math.nan))
                m = multiscale_structural_similarity_index_measure(
                    xs, ys, kernel_size=MSSSIM_KERNEL, sigma=1.5, data_range=255.0, betas=betas, reduction="none"
                ).flatten()
                for j, i in enumerate(chunk):
                    results[i]["lpips"] = float(d[j])
                    results[i]["ms_ssim"] = float(m[j])
        return results
