"""Total-variation minimisation (TVM) purifier.

Source: the TVM baseline of the paper (after Guo et al., "Countering Adversarial Images using Input
Transformations", ICLR 2018): resize to 64 x 64, keep a random 98% of the pixels (2% dropout), and
reconstruct the image of least total variation that agrees with the kept pixels, then resize back.

Choices (ours, the paper gives no solver):
- Objective, per image and channel, intensities in [0, 1]:
  ``min_x 0.5 * ||M * (x - y)||^2 + weight * TV(x)`` with isotropic TV on forward differences
  (Neumann boundary), so with ``drop=0`` it is exactly the ROF problem that skimage's
  ``denoise_tv_chambolle(y, weight)`` solves per channel.
- Solver: Chambolle-Pock primal-dual (PDHG, step sizes sigma = tau = 1/sqrt(8), since ||grad||^2 <= 8),
  ``iterations`` steps, in numpy and vectorised over the batch (every image is 64 x 64 by then).
- The dropout mask drops whole pixels (all three channels) and is seeded from the image's content
  (BLAKE2b of its bytes and shape), so a given input always gets the same output, in any batch, on any
  worker, which the stage's content-hash keys rely on.
- Resizing, both ways: torch bicubic with ``antialias=True``, which is PIL's bicubic (a = -0.5, filter
  support widened when shrinking); plain torch bicubic would use a = -0.75 and alias when shrinking.
  Only the final image is rounded to uint8.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from raypdm.purify.base import (
    BuildContext,
    Purifier,
    PurifierOptions,
    float_to_uint8,
    group_indices_by_size,
    register_purifier,
)


class TvmOptions(PurifierOptions):
    size: int = Field(64, ge=8, description="side of the square working resolution")
    drop: float = Field(0.02, ge=0, lt=1, description="share of pixels dropped before reconstruction")
    weight: float = Field(0.03, gt=0, description="TV weight (lambda), intensities in [0, 1]")
    iterations: int = Field(300, ge=1, description="primal-dual iterations")


def content_seed(image: np.ndarray) -> int:
    digest = hashlib.blake2b(image.tobytes(), digest_size=8, person=b"raypdm-tvm")
    digest.update(repr(image.shape).encode())
    return int.from_bytes(digest.digest(), "little")


def _grad(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Forward differences, zero across the last row/column (Neumann boundary)."""
    gy = np.zeros_like(x)
    gx = np.zeros_like(x)
    np.subtract(x[..., 1:, :], x[..., :-1, :], out=gy[..., :-1, :])
    np.subtract(x[..., :, 1:], x[..., :, :-1], out=gx[..., :, :-1])
    return gy, gx


def _div(py: np.ndarray, px: np.ndarray) -> np.ndarray:
    """Negative adjoint of :func:`_grad` (so ``<grad x, p> = -<x, div p>``)."""
    d = np.zeros_like(py)
    d[..., :-1, :] += py[..., :-1, :]
    d[..., 1:, :] -= py[..., :-1, :]
    d[..., :, :-1] += px[..., :, :-1]
    d[..., :, 1:] -= px[..., :, :-1]
    return d


def masked_tv_reconstruct(y: np.ndarray, mask: np.ndarray, weight: float, iterations: int) -> np.ndarray:
    """Solve ``min_x 0.5 ||mask * (x - y)||^2 + weight * TV_iso(x)`` per channel over (..., H, W) arrays.

    numpy rather than torch: at 64 x 64 every step is a tiny elementwise op, where torch's thread pool
    costs more than it gains and stalls badly when Ray packs CPU tasks onto busy cores.
    """
    tau = sigma = 1.0 / math.sqrt(8.0)
    y = np.asarray(y)
    mask = np.broadcast_to(np.asarray(mask, dtype=y.dtype), y.shape)
    # Prox of the masked data term, (v + tau*m*y) / (1 + tau*m): a pull towards y where the pixel was
    # kept, none where it was dropped. Precompute its constant parts.
    pull = tau * mask * y
    shrink = 1.0 / (1.0 + tau * mask)
    x = y.copy()
    x_bar = x.copy()
    py = np.zeros_like(y)
    px = np.zeros_like(y)
    for _ in range(iterations):
        gy, gx = _grad(x_bar)
        py += sigma * gy
        px += sigma * gx
        # Project the dual onto the ball of radius `weight` (per pixel and channel: isotropic TV).
        scale = np.maximum(np.sqrt(py * py + px * px) / weight, 1.0)
        py /= scale
        px /= scale
        x_new = (x + tau * _div(py, px) + pull) * shrink
        x_bar = 2.0 * x_new - x
        x = x_new
    return x


@register_purifier("tvm", TvmOptions)
class TvmPurifier(Purifier):
    name = "tvm"
    uses_gpu = False

    def __init__(self, options: TvmOptions | None = None, context: BuildContext | None = None):
        self.options = options or TvmOptions()

    def _mask(self, image: np.ndarray) -> np.ndarray:
        size = self.options.size
        rng = np.random.default_rng(content_seed(image))
        return (rng.random((size, size)) >= self.options.drop).astype(np.float32)

    @torch.no_grad()
    def purify(self, images: list[np.ndarray]) -> list[np.ndarray]:
        size = self.options.size
        small = torch.empty(len(images), 3, size, size)
        for idx in group_indices_by_size(images).values():
            batch = torch.from_numpy(np.stack([images[i] for i in idx])).permute(0, 3, 1, 2).float() / 255.0
            small[idx] = F.interpolate(batch, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        small = small.clamp(0.0, 1.0).numpy()
        mask = np.stack([self._mask(im) for im in images])[:, None]
        recon = masked_tv_reconstruct(small, mask, self.options.weight, self.options.iterations)
        recon = torch.from_numpy(np.clip(recon, 0.0, 1.0))

        out: list[np.ndarray] = [None] * len(images)  # type: ignore[list-item]
        for (h, w), idx in group_indices_by_size(images).items():
            big = F.interpolate(recon[idx], size=(h, w), mode="bicubic", align_corners=False, antialias=True)
            big = big.permute(0, 2, 3, 1).numpy() * 255.0
            for j, i in enumerate(idx):
                out[i] = float_to_uint8(big[j])
        return out
