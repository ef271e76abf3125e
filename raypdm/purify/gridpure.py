"""GrIDPure: iterative DiffPure on overlapping 256x256 grids of a 512x512 image, blended with the input.

Source: Zhao et al., "Can Protective Perturbation Safeguard Personal Data from Being Exploited by Stable
Diffusion?" (CVPR 2024), code ZhengyueZhao/GrIDPure (504ff46) ``gridpure.py``, whose per-grid purifier is
DiffPure's DDPM runner (``runners/diffpure_guided.py``) with DiffPure's ImageNet config: the guided-diffusion
256x256 unconditional model (``adm256-uncond``), T = 1000, no respacing, fp16. Settings from the red-teaming
paper's baseline (DESIGN.md): 256 grids, stride 128, t = 10, 10 iterations, gamma = 0.1 (the upstream script's
own defaults are ``--pure_steps 100 --pure_iter_num 1 --gamma 0.1``).

One iteration on x (N, 3, 512, 512) in [-1, 1]:
1. cut 256x256 grids with stride 128 (origins 0, 128, 256 per axis, plus ``size - grid`` if the stride misses
   it: 9 grids) and, with ``corner_composite`` (upstream always adds it), one more grid assembled from the four
   128x128 image corners in their natural arrangement;
2. purify every grid with DiffPure at t = 10 (diffuse to step 9, ten ancestral DDPM steps with the learned
   variance; :class:`raypdm.purify.pixel_diffpure.AdmBackbone`);
3. merge: average every pixel over the grids that cover it (float64 sums, so identical grids merge exactly);
   the composite's quarters go back to their corners;
4. x <- (1 - gamma) * merged + gamma * x, computed as ``merged + gamma * (x - merged)``.

Corner composite: kept (default on). Without it the four 128x128 corners are covered by one grid each while the
edges are covered by two and the interior by four; the composite gives each corner a second, independent
purification, so every border pixel is averaged over two. The composite's content is discontinuous at its
seams, which the diffusion model sees; ``corner_composite=False`` drops it.

Deliberate differences from public code:
- the model gets [-1, 1] inputs. The issue reports public baseline code feeding [0, 1] tensors; GrIDPure's own
  ``gridpure.py`` maps (x - 0.5) * 2, as here;
- the iterate stays in float between iterations; upstream converts to a PIL image after every iteration
  (``ToPILImage``: multiply by 255 and truncate), which loses up to one grey level per iteration, 10 times;
- images that are not 512x512 (``canvas_size``) are resized to it (bilinear, half-pixel centres) and the result
  back to their own size; upstream grids any size >= 256 directly. Grid, stride and canvas sizes are options and
  do not depend on the preset: with the tiny model (32x32) each 256 grid is resized to 32 and back;
- randomness: each grid of each iteration has its own generator, seeded from (seed, iteration, grid index), so an
  image gets the same noise whatever batch it arrives in; upstream draws from one global stream;
- all grids of an image are denoised in batches (``batch_size`` grids per forward pass); upstream runs one grid
  at a time. ``dtype`` (GPU only) defaults to fp16 as DiffPure's config; the torso is converted after loading.

The grid, merge and blend arithmetic (:func:`gridpure`) takes the per-grid denoiser as an argument, and the
purifier accepts one (``grid_denoiser=``), so both can be tested with an identity denoiser.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from raypdm.purify.base import BuildContext, Purifier, PurifierOptions, register_purifier
from raypdm.purify.pixel_diffpure import (
    NUM_TIMESTEPS,
    AdmBackbone,
    batched,
    check_finite,
    images_to_tensor,
    resize,
    tensor_to_uint8,
    validate_respacing,
)

__all__ = [
    "GridDenoiser",
    "GridPureOptions",
    "GridPurePurifier",
    "grid_boxes",
    "grid_origins",
    "gridpure",
]

# denoiser(grids (M, 3, g, g) in [-1, 1], keys) -> (M, 3, g, g); keys[r] = (iteration, grid index) of row r.
GridDenoiser = Callable[[torch.Tensor, list[tuple[int, int]]], torch.Tensor]


def grid_origins(size: int, grid: int, stride: int) -> list[int]:
    """Grid start offsets along one axis: 0, stride, ... while the grid fits, plus ``size - grid`` (upstream)."""
    if grid > size:
        raise ValueError(f"grid {grid} is larger than the image side {size}")
    origins = list(range(0, size - grid + 1, stride))
    if origins[-1] != size - grid:
        origins.append(size - grid)
    return origins


def grid_boxes(size: int, grid: int, stride: int) -> list[tuple[int, int]]:
    """(top, left) of every grid of a size x size image, row by row."""
    origins = grid_origins(size, grid, stride)
    return [(top, left) for top in origins for left in origins]


def _corner_slices(size: int, grid: int) -> list[tuple[tuple[slice, slice], tuple[slice, slice]]]:
    """(image region, composite region) for the four corners: TL, TR, BL, BR, each grid/2 square."""
    h = grid // 2
    near, far = slice(0, h), slice(size - h, size)
    first, second = slice(0, h), slice(h, grid)
    return [((near, near), (first, first)), ((near, far), (first, second)),
            ((far, near), (second, first)), ((far, far), (second, second))]


def gridpure(x: torch.Tensor, denoise: GridDenoiser, *, grid: int = 256, stride: int = 128, gamma: float = 0.1,
             iterations: int = 10, corner_composite: bool = True) -> torch.Tensor:
    """GrIDPure on a batch of square images x (N, 3, S, S) in [-1, 1]; returns the final iterate (float32).

    Each iteration denoises all N * G grids in one ``denoise`` call (rows image-major: the grids of image 0,
    then of image 1, ...; the corner composite last), merges by averaging, and blends with gamma.
    """
    n, c, size, width = x.shape
    if size != width:
        raise ValueError(f"gridpure expects square images, got {size}x{width}")
    boxes = grid_boxes(size, grid, stride)
    corners = _corner_slices(size, grid) if corner_composite else []
    per_image = len(boxes) + (1 if corner_composite else 0)
    x = x.float()
    count = torch.zeros(1, 1, size, size, dtype=torch.float64, device=x.device)
    for top, left in boxes:
        count[..., top:top + grid, left:left + grid] += 1
    for (rows, cols), _ in corners:
        count[..., rows, cols] += 1
    for it in range(iterations):
        parts = [x[:, :, top:top + grid, left:left + grid] for top, left in boxes]
        if corner_composite:
            composite = torch.empty(n, c, grid, grid, dtype=x.dtype, device=x.device)
            for (rows, cols), (crows, ccols) in corners:
                composite[:, :, crows, ccols] = x[:, :, rows, cols]
            parts.append(composite)
        grids = torch.stack(parts, dim=1).reshape(n * per_image, c, grid, grid)  # image-major rows
        keys = [(it, g) for _ in range(n) for g in range(per_image)]
        out = denoise(grids, keys)
        if out.shape != grids.shape:
            raise ValueError(f"grid denoiser returned {tuple(out.shape)} for grids of {tuple(grids.shape)}")
        out = out.to(torch.float64).reshape(n, per_image, c, grid, grid)
        acc = torch.zeros(n, c, size, size, dtype=torch.float64, device=x.device)
        for j, (top, left) in enumerate(boxes):
            acc[:, :, top:top + grid, left:left + grid] += out[:, j]
        for (rows, cols), (crows, ccols) in corners:
            acc[:, :, rows, cols] += out[:, -1, :, crows, ccols]
        merged = (acc / count).to(torch.float32)
        x = merged + gamma * (x - merged)  # = (1 - gamma) * merged + gamma * x, exact when merged == x
    return x


class GridPureOptions(PurifierOptions):
    t: int = Field(10, ge=1, le=NUM_TIMESTEPS, description="DiffPure steps per grid (diffuse to step t-1)")
    iterations: int = Field(10, ge=1, le=1000, description="GrIDPure iterations")
    gamma: float = Field(0.1, ge=0.0, le=1.0, description="blend: x <- (1-gamma)*purified + gamma*x")
    grid_size: int = Field(256, ge=2, description="grid side in canvas pixels (the model's native 256)")
    stride: int = Field(128, ge=1, description="grid stride in canvas pixels")
    canvas_size: int = Field(512, ge=2, description="images are resized to this square first (GrIDPure: 512)")
    corner_composite: bool = Field(True, description="also purify the four corners assembled into one grid")
    respacing: str = Field("", description="per-grid DiffPure respacing ('' = none; t counts original steps)")
    clip_denoised: bool = True
    antialias: bool = Field(False, description="antialias when shrinking (canvas, grids to the model side)")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float16", description="GPU torso dtype (DiffPure's config: fp16); the CPU always runs float32")
    batch_size: int = Field(10, ge=1, le=1024, description="grids per forward pass (10 = one 512 image's grids)")
    seed: int = Field(0, ge=0, description="seeds each (iteration, grid) generator")

    @field_validator("respacing")
    @classmethod
    def _known_respacing(cls, v: str) -> str:
        return validate_respacing(v)

    @model_validator(mode="after")
    def _sizes_fit(self) -> GridPureOptions:
        if self.grid_size > self.canvas_size:
            raise ValueError(f"grid_size {self.grid_size} is larger than canvas_size {self.canvas_size}")
        if self.corner_composite and self.grid_size % 2:
            raise ValueError(f"corner_composite needs an even grid_size, got {self.grid_size}")
        return self


def _grid_seed(seed: int, iteration: int, grid: int) -> int:
    """A well-mixed 63-bit seed per (seed, iteration, grid): neighbouring grids get unrelated streams."""
    return int(np.random.SeedSequence([seed, iteration, grid]).generate_state(1, np.uint64)[0] >> np.uint64(1))


@register_purifier("gridpure", GridPureOptions)
class GridPurePurifier(Purifier):
    name = "gridpure"
    uses_gpu = True

    def __init__(self, options: GridPureOptions | None = None, context: BuildContext | None = None,
                 grid_denoiser: GridDenoiser | None = None):
        """``grid_denoiser`` replaces the per-grid DiffPure (tests); then no model is built."""
        self.options = options or GridPureOptions()
        self.context = context or BuildContext()
        self.device = torch.device(self.context.device)
        self.backbone: AdmBackbone | None = None
        if grid_denoiser is None:
            self.backbone = AdmBackbone(self.context, self.options.dtype, self.options.respacing)
            self.start = self.backbone.diffusion.index_for_step(self.options.t - 1)
        self.grid_denoiser: GridDenoiser = grid_denoiser or self._diffpure_grids
        self.grids_per_image = len(grid_boxes(self.options.canvas_size, self.options.grid_size, self.options.stride)) \
            + (1 if self.options.corner_composite else 0)

    def config_dict(self) -> dict[str, Any]:
        weights = self.backbone.weights_id if self.backbone is not None else f"custom:{self.grid_denoiser!r}"
        return {**super().config_dict(), "preset": self.context.preset, "weights": weights}

    def _diffpure_grids(self, grids: torch.Tensor, keys: Sequence[tuple[int, int]]) -> torch.Tensor:
        """DiffPure at t on every grid, ``batch_size`` grids per forward pass, at the model's side."""
        o, bb = self.options, self.backbone
        assert bb is not None
        out = torch.empty_like(grids)
        for rows in batched(grids.shape[0], o.batch_size):
            x0 = resize(grids[rows.start:rows.stop], (bb.size, bb.size), o.antialias)
            seeds = [_grid_seed(o.seed, *keys[r]) for r in rows]
            y = check_finite(bb.sdedit(x0, self.start, seeds, o.clip_denoised), self.name)
            out[rows.start:rows.stop] = resize(y, tuple(grids.shape[-2:]), o.antialias)
        return out

    @torch.inference_mode()
    def purify(self, images: list[np.ndarray]) -> list[np.ndarray]:
        o = self.options
        out: list[np.ndarray] = []
        # Every image becomes one canvas, so any mix of sizes batches together.
        per_chunk = max(1, o.batch_size // self.grids_per_image)
        for rows in batched(len(images), per_chunk):
            chunk = [images[i] for i in rows]
            x = images_to_tensor(chunk, o.canvas_size, self.device, o.antialias)
            y = gridpure(x, self.grid_denoiser, grid=o.grid_size, stride=o.stride, gamma=o.gamma,
                         iterations=o.iterations, corner_composite=o.corner_composite)
            out.extend(tensor_to_uint8(row[None], im.shape[:2], o.antialias) for im, row in zip(chunk, y))
        return out
