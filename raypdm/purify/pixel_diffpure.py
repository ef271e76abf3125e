"""Pixel-space DiffPure: diffuse the image to t* with the ADM ImageNet model's schedule, then denoise it back.

Source: Nie et al., "Diffusion Models for Adversarial Purification" (ICML 2022), code NVlabs/DiffPure (985703f),
``runners/diffpure_guided.py`` (the DDPM runner) with ``configs/imagenet.yml``: the guided-diffusion 256x256
unconditional model (``adm256-uncond``), linear schedule, T = 1000, no respacing, fp16 torso. It is SDEdit
(Meng et al. 2022): ``x_t* = sqrt(abar) x0 + sqrt(1 - abar) e``, then ancestral DDPM sampling with the model's
learned-range variance from t*-1 down to 0 (t* model calls), ``clip_denoised=True``.

Pre/post-processing: uint8 RGB -> [-1, 1], bilinearly resized (half-pixel centres, no antialias, as DiffPure's
``F.interpolate``) to the model's side (256; 32 for the tiny preset) and back to the image's own size afterwards;
pixels are rounded once, at the end.

Defaults and deliberate differences from public code:
- ``t = 150`` (t* = 0.15), the paper's ImageNet setting (``--t 150``). The paper's ImageNet numbers integrate the
  VP-SDE with ``torchsde`` (``--diffusion_type sde``, Euler-Maruyama, eps channels only); here, as in DiffPure's
  ``--diffusion_type ddpm`` runner (which GrIDPure reuses), the reverse process is the discrete DDPM sampler with
  the learned variance. Both use the same linear betas.
- ``respacing`` (upstream ``timestep_respacing``, e.g. "250", "ddim50", "10,10,10"): ``t`` always counts original
  steps. With respacing the start index is the kept step nearest to t*-1, and noising and sampling both use the
  respaced schedule. DiffPure's runner instead copies ``diffusion.betas`` and treats ``--t`` as a respaced index,
  so ``t = 100`` with respacing 250 noises to original step 397 (about 4x the noise): not reproduced.
- Randomness: every image has its own generator seeded with ``seed``, drawn in a fixed order (the forward noise,
  then one draw per reverse step). An image therefore gets the same noise whatever batch, worker or chain layout
  it arrives in (same reasoning as ``sr``: content seeding would make a one-level change upstream pick entirely
  different noise). DiffPure seeds the global RNG once per run.
- Precision: ``dtype`` applies on a GPU only (the CPU runs fp32). fp16 converts the torso *after* loading, as
  upstream; the schedule arithmetic stays fp32. A non-finite result raises (one error row), never gets written.

This module also holds what the three pixel-space purifiers share (:class:`AdmBackbone`, the image <-> tensor
helpers); ``ddspure`` and ``gridpure`` import them.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from raypdm.diffusion.gaussian import GaussianDiffusion, randn_rows, sdedit, space_timesteps
from raypdm.models.adm import NAME as ADM_NAME
from raypdm.models.adm import ADMUNet, adm_weight_path
from raypdm.models.registry import get as get_model_spec
from raypdm.models.weights import sha256_file
from raypdm.purify.base import (
    BuildContext,
    Purifier,
    PurifierOptions,
    float_to_uint8,
    group_indices_by_size,
    register_purifier,
)

__all__ = [
    "AdmBackbone",
    "PixelDiffPureOptions",
    "PixelDiffPurePurifier",
    "check_finite",
    "images_to_tensor",
    "resize",
    "tensor_to_uint8",
    "validate_respacing",
]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NUM_TIMESTEPS = 1000  # the checkpoint's training schedule length


def validate_respacing(value: str) -> str:
    """Options validator: fail at config time on a respacing the 1000-step schedule cannot take."""
    space_timesteps(NUM_TIMESTEPS, value)  # raises ValueError naming the string
    return value


# ------------------------------------------------------------------------------------------ pixels


def resize(x: torch.Tensor, size: tuple[int, int], antialias: bool = False) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=antialias)


def images_to_tensor(images: Sequence[np.ndarray], side: int, device: torch.device, antialias: bool = False
                     ) -> torch.Tensor:
    """uint8 HxWx3 images -> (N, 3, side, side) float32 in [-1, 1] on ``device`` (each size group resized once)."""
    out = torch.empty(len(images), 3, side, side, device=device)
    for idx in group_indices_by_size(images).values():
        x = torch.from_numpy(np.stack([images[i] for i in idx])).to(device).permute(0, 3, 1, 2).float()
        out[idx] = resize(x / 127.5 - 1.0, (side, side), antialias)
    return out


def tensor_to_uint8(y: torch.Tensor, size: tuple[int, int], antialias: bool = False) -> np.ndarray:
    """(1, 3, h, w) in [-1, 1] -> uint8 HxWx3 at ``size`` (resized in float, rounded once)."""
    y = resize(y, size, antialias).clamp(-1.0, 1.0)
    return float_to_uint8(((y[0] + 1.0) * 127.5).permute(1, 2, 0).cpu().numpy())


def check_finite(x: torch.Tensor, who: str) -> torch.Tensor:
    bad = ~torch.isfinite(x.flatten(1)).all(1)
    if bad.any():  # NaN/inf would be written as garbage pixels: fail the batch instead
        raise RuntimeError(f"{who}: rows {bad.nonzero().flatten().tolist()} came out non-finite")
    return x


# ------------------------------------------------------------------------------------------ backbone


class AdmBackbone:
    """The ADM UNet (random preset or released weights) and its diffusion schedule, on one device.

    ``BuildContext.preset`` "tiny"/"full" gives seeded random weights; ``preset="full"`` with a ``weights_dir``
    loads ``<weights_dir>/adm256-uncond/256x256_diffusion_uncond.pt`` (``MissingWeightsError`` names the file
    and the fetch command when it is absent).
    """

    def __init__(self, context: BuildContext, dtype: str, respacing: str = ""):
        self.context = context
        self.device = torch.device(context.device)
        # Half precision on a CPU is slow and poorly supported: there the dtype option is a no-op.
        self.dtype = _DTYPES[dtype] if self.device.type != "cpu" else torch.float32
        self.weights_path: Path | None = None
        if context.real_weights:
            self.weights_path = adm_weight_path(get_model_spec(ADM_NAME).model_dir(context.weights_dir))  # weights_id
        self.net: ADMUNet = context.model(ADM_NAME, device=self.device, dtype=self.dtype)
        self.net.requires_grad_(False)
        self.size = self.net.config.image_size
        self.diffusion = GaussianDiffusion.linear(NUM_TIMESTEPS, respacing or None)

    @cached_property
    def weights_id(self) -> str:
        """What identifies the weights in a stage key: the file's sha256, or the random preset."""
        if self.weights_path is None:
            return f"random:{self.context.preset}"
        return f"sha256:{sha256_file(self.weights_path)}"

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.net(x, timesteps).float()

    def generators(self, seeds: Sequence[int]) -> list[torch.Generator]:
        return [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]

    def sdedit(self, x0: torch.Tensor, start: int, seeds: Sequence[int], clip_denoised: bool = True) -> torch.Tensor:
        """SDEdit rows of x0 (model side) from respaced index ``start``; row r's noise comes from ``seeds[r]``."""
        gens = self.generators(seeds)
        shape = tuple(x0.shape[1:])
        return sdedit(self, self.diffusion, x0, start, lambda: randn_rows(gens, shape, self.device), clip_denoised)


def batched(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


# ------------------------------------------------------------------------------------------ purifier


class PixelDiffPureOptions(PurifierOptions):
    t: int = Field(150, ge=1, le=NUM_TIMESTEPS,
                   description="t*: diffuse to original step t-1 and denoise back (DiffPure ImageNet: 150)")
    respacing: str = Field("", description="upstream timestep_respacing ('' = none, '250', 'ddim50', '10,10,10')")
    clip_denoised: bool = Field(True, description="clamp predicted x0 to [-1, 1] at every step (DiffPure: on)")
    antialias: bool = Field(False, description="antialias when shrinking to the model side (DiffPure: off)")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float16", description="GPU torso dtype (DiffPure's config: fp16); the CPU always runs float32")
    batch_size: int = Field(8, ge=1, le=1024, description="images per forward pass (bounds device memory)")
    seed: int = Field(0, ge=0, description="seeds each image's own noise generator")

    @field_validator("respacing")
    @classmethod
    def _known_respacing(cls, v: str) -> str:
        return validate_respacing(v)


@register_purifier("pixel_diffpure", PixelDiffPureOptions)
class PixelDiffPurePurifier(Purifier):
    name = "pixel_diffpure"
    uses_gpu = True

    def __init__(self, options: PixelDiffPureOptions | None = None, context: BuildContext | None = None):
        self.options = options or PixelDiffPureOptions()
        self.context = context or BuildContext()
        self.backbone = AdmBackbone(self.context, self.options.dtype, self.options.respacing)
        # t counts original steps; DiffPure noises to abar[t-1] and samples t-1 .. 0.
        self.start = self.backbone.diffusion.index_for_step(self.options.t - 1)

    def config_dict(self) -> dict[str, Any]:
        return {**super().config_dict(), "preset": self.context.preset, "weights": self.backbone.weights_id}

    @torch.inference_mode()
    def purify(self, images: list[np.ndarray]) -> list[np.ndarray]:
        o, bb = self.options, self.backbone
        out: list[np.ndarray] = []
        for rows in batched(len(images), o.batch_size):
            chunk = [images[i] for i in rows]
            x0 = images_to_tensor(chunk, bb.size, bb.device, o.antialias)
            x = check_finite(bb.sdedit(x0, self.start, [o.seed] * len(chunk), o.clip_denoised), self.name)
            out.extend(tensor_to_uint8(y[None], im.shape[:2], o.antialias) for im, y in zip(chunk, x))
        return out

