"""DDSPure: diffusion denoised smoothing's one-shot denoiser used as a purifier.

Source: Carlini et al., "(Certified!!) Adversarial Robustness for Free!" (ICLR 2023), code
ethz-spylab/diffusion_denoised_smoothing (MIT), ``imagenet/DRM.py`` and ``imagenet/certify.py``, with the same
guided-diffusion 256x256 unconditional ImageNet model (``adm256-uncond``, fp32, no respacing). "DDSPure" is taken
to mean this denoiser applied as a purifier (no repository uses that name; see shared/reference/adm_notes.md §6).

Algorithm (paper, Algorithm 1), on images in [-1, 1] resized to the model side and back as ``pixel_diffpure``:
1. sigma_m = 2 * sigma: ``sigma`` is in [0, 1] pixel units (the paper's and certify.py's ``--sigma``), and the
   model's [-1, 1] range doubles it. Default sigma = 0.25 (sigma_m = 0.5), the smallest of the paper's ImageNet settings
   (0.25, 0.5, 1.0).
2. t* = the first index of the *sampling* schedule with sqrt((1 - abar_t) / abar_t) >= sigma_m (certify.py's
   loop), clipped to the last index when sigma_m is beyond the schedule. On the 1000-step schedule sigma = 0.12,
   0.25, 0.5, 1.0 give t* = 70, 145, 259, 396.
3. x_t* = sqrt(abar_t*) * (x + sigma_m * e), e ~ N(0, I).
4. One network call at t*; the output is the clipped x0 prediction, sqrt(1/abar) x_t - sqrt(1/abar - 1) eps
   (``p_sample(...)['pred_xstart']``; the variance channels are not needed).

Deliberate differences from public code:
- Step 3 follows the paper. ``DRM.denoise`` calls ``q_sample`` (sqrt(abar) x + sqrt(1 - abar) e), which adds
  noise of std sqrt((1 - abar_t*)/abar_t*) >= sigma_m, slightly more than sigma_m because t* is discrete.
- t* is computed on the schedule actually sampled: with ``respacing`` (e.g. "250") it is a respaced index, and the
  network sees its original step. Public code that indexes a respaced schedule with a 1000-step t* lands about 4x
  too deep.
- certify.py starts its search at t = 1; here at t = 0. They differ only for sigma_m <= 0.01 (below one grey level).
- Randomness: each image has its own generator seeded with ``seed``, so an image gets the same noise in any batch.
- ``dtype`` (GPU only; the CPU runs fp32) defaults to fp32 as DDS runs (``use_fp16=False``); fp16 converts the
  torso after loading.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from raypdm.diffusion.gaussian import randn_rows
from raypdm.purify.base import BuildContext, Purifier, PurifierOptions, register_purifier
from raypdm.purify.pixel_diffpure import (
    AdmBackbone,
    batched,
    check_finite,
    images_to_tensor,
    tensor_to_uint8,
    validate_respacing,
)

__all__ = ["DDSPureOptions", "DDSPurePurifier"]


class DDSPureOptions(PurifierOptions):
    sigma: float = Field(0.25, gt=0.0, le=10.0,
                         description="smoothing noise std in [0, 1] pixel units (the model sees 2*sigma)")
    respacing: str = Field("", description="schedule to sample on ('' = the 1000 steps, '250', 'ddim50', ...)")
    clip_denoised: bool = Field(True, description="clamp the x0 prediction to [-1, 1] (DDS: on)")
    antialias: bool = Field(False, description="antialias when shrinking to the model side")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="GPU torso dtype (DDS runs fp32); the CPU always runs float32")
    batch_size: int = Field(8, ge=1, le=1024, description="images per forward pass (bounds device memory)")
    seed: int = Field(0, ge=0, description="seeds each image's own noise generator")

    @field_validator("respacing")
    @classmethod
    def _known_respacing(cls, v: str) -> str:
        return validate_respacing(v)


@register_purifier("ddspure", DDSPureOptions)
class DDSPurePurifier(Purifier):
    name = "ddspure"
    uses_gpu = True

    def __init__(self, options: DDSPureOptions | None = None, context: BuildContext | None = None):
        self.options = options or DDSPureOptions()
        self.context = context or BuildContext()
        self.backbone = AdmBackbone(self.context, self.options.dtype, self.options.respacing)
        self.sigma_model = 2.0 * self.options.sigma
        diffusion = self.backbone.diffusion
        self.t_index = diffusion.index_for_noise_ratio(self.sigma_model)  # on the schedule we sample with
        self.t_step = int(diffusion.timestep_map[self.t_index])  # what the network sees

    def config_dict(self) -> dict[str, Any]:
        return {**super().config_dict(), "preset": self.context.preset, "weights": self.backbone.weights_id}

    def denoise(self, x: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """(N, 3, s, s) in [-1, 1] at the model side -> the one-shot x0 estimate; row r's noise from seeds[r]."""
        bb, diffusion = self.backbone, self.backbone.diffusion
        t = diffusion.timesteps(self.t_index, x.shape[0], x.device)
        noise = randn_rows(bb.generators(seeds), tuple(x.shape[1:]), bb.device)
        abar = float(diffusion.alphas_cumprod[self.t_index])
        x_t = abar**0.5 * (x + self.sigma_model * noise)
        eps = bb(x_t, diffusion.model_timesteps(t))[:, : x.shape[1]]
        return diffusion.predict_x0(x_t, t, eps, clip=self.options.clip_denoised)

    @torch.inference_mode()
    def purify(self, images: list[np.ndarray]) -> list[np.ndarray]:
        o, bb = self.options, self.backbone
        out: list[np.ndarray] = []
        for rows in batched(len(images), o.batch_size):
            chunk = [images[i] for i in rows]
            x = images_to_tensor(chunk, bb.size, bb.device, o.antialias)
            y = check_finite(self.denoise(x, [o.seed] * len(chunk)), self.name)
            out.extend(tensor_to_uint8(row[None], im.shape[:2], o.antialias) for im, row in zip(chunk, y))
        return out
