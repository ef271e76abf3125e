"""Stable Diffusion x4 super-resolution purifier: the second half of the paper's CodeSR ("codeformer+sr").

Recipe (paper §5, DESIGN.md): resize the image to 128x128, upscale x4 with the SD x4 upscaler
(diffusers `StableDiffusionUpscalePipeline`) to 512x512, prompt "a photo of a {class_noun}",
noise_level 20. The paper's public code always said "person", even for other classes: here the class
noun comes from the options. Fewer `steps` is the paper's skip-step speed-up. The low-resolution
bottleneck is what removes the perturbation; the diffusion upscaler puts plausible detail back.

- Output size: the upscaler's 512x512, resized back to the input's size when `keep_input_size` (the
  default; a no-op for the usual 512x512 inputs) so a purifier maps a batch to a same-shaped batch.
- Precision: fp32 on the CPU; fp16/bf16 on a GPU when `dtype` says so. Half precision can overflow to
  NaN or decode an all-black image: such images are re-run in fp32 (the guard), never written.
- Determinism: each image's noise comes from its own generator seeded with the options' seed, as a
  script that seeds every call does; so an image gets the same noise whatever batch, worker or chain
  layout it arrives in. (Seeding by content was tried and dropped: a one-grey-level change upstream,
  e.g. CodeFormer on another thread count, then picked entirely different noise.) The same batch gives
  bit-identical outputs; in a batch of another size, batched float kernels round differently (~1e-6)
  and a few pixels can land one grey level apart.
"""

from __future__ import annotations

import logging
import string
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from raypdm.purify.base import BuildContext, Purifier, PurifierOptions, float_to_uint8, group_indices_by_size, register_purifier

__all__ = ["SROptions", "SRPurifier"]

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class SROptions(PurifierOptions):
    class_noun: str = Field("person", min_length=1, description="fills the prompt template")
    prompt_template: str = Field("a photo of a {class_noun}", description="must contain {class_noun}")
    negative_prompt: str | None = None
    noise_level: int = Field(20, ge=0, le=350, description="low-res noise augmentation level (max 350)")
    steps: int = Field(75, ge=1, le=1000, description="denoising steps (diffusers default 75; fewer = skip-step)")
    guidance_scale: float = Field(9.0, ge=0.0, description="classifier-free guidance (diffusers default 9)")
    low_res: int = Field(128, ge=8, le=1024, description="side of the low-resolution bottleneck")
    keep_input_size: bool = Field(True, description="resize the x4 output back to the input size")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float16", description="GPU compute dtype")
    seed: int = 0

    @field_validator("prompt_template")
    @classmethod
    def _template_has_class_noun(cls, v: str) -> str:
        # Checked when the options are validated (config load, in the driver), not first in an actor.
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
        except ValueError as err:
            raise ValueError(f"prompt_template {v!r} is not a valid template: {err}") from None
        if "class_noun" not in fields:
            raise ValueError(f"prompt_template must contain {{class_noun}}, got {v!r}")
        if fields != {"class_noun"}:
            raise ValueError(f"prompt_template may only use the {{class_noun}} placeholder, got {v!r}")
        return v

    def prompt(self) -> str:
        return self.prompt_template.format(class_noun=self.class_noun)  # the template is checked above


@register_purifier("sr", SROptions)
class SRPurifier(Purifier):
    name = "sr"
    uses_gpu = True

    def __init__(self, options: SROptions | None = None, context: BuildContext | None = None):

        self.options = options or SROptions()
        self.options.prompt()  # fail now on a bad template, not inside an actor
        context = context or BuildContext()
        self.device = torch.device(context.device)
        self.preset = context.preset
        on_gpu = self.device.type == "cuda"
        self.dtype = _DTYPES[self.options.dtype] if on_gpu else torch.float32
        # In the dtype it will run in: the context caches per dtype, so converting after would change a
        # model someone else holds.
        parts = context.model("sd-x4-upscaler", device=self.device, dtype=self.dtype)
        self.weights = context.weights_source()
        self.pipe = parts.to_pipeline()
        self.pipe.set_progress_bar_config(disable=True)
        self.pipe.to(self.device)
        if self.dtype != torch.float32:
            self.pipe.to(dtype=self.dtype)

    def config_dict(self) -> dict:
        return {**super().config_dict(), "preset": self.preset, "weights": self.weights}

    # -- tensors ----------------------------------------------------------------------------------
    def _to_tensor(self, images: list[np.ndarray], side: int) -> torch.Tensor:
        """All images, each size group resized on the device, as one N x 3 x side x side batch in [0, 1]."""
        low = torch.empty(len(images), 3, side, side, device=self.device)
        for size, idx in group_indices_by_size(images).items():
            x = torch.from_numpy(np.stack([images[i] for i in idx])).to(self.device).permute(0, 3, 1, 2).float() / 255.0
            if size != (side, side):
                x = F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False, antialias=True)
            low[idx] = x
        return low.clamp(0, 1)  # the pipeline maps [0, 1] tensors to [-1, 1] itself

    def _run(self, low: torch.Tensor, seeds: list[int], dtype: torch.dtype) -> torch.Tensor:
        o = self.options
        if dtype != self.pipe.unet.dtype:
            self.pipe.to(dtype=dtype)
        gens = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]
        n = low.shape[0]
        out = self.pipe(
            prompt=[o.prompt()] * n,
            negative_prompt=[o.negative_prompt] * n if o.negative_prompt else None,
            image=low.to(dtype),
            num_inference_steps=o.steps,
            guidance_scale=o.guidance_scale,
            noise_level=o.noise_level,
            generator=gens,
            output_type="pt",
        ).images
        return out.float()  # [0, 1], N x 3 x 4h x 4w

    @staticmethod
    def _bad(images: torch.Tensor) -> torch.Tensor:
        flat = images.flatten(1)
        return torch.isnan(flat).any(1) | (flat.abs().amax(1) < 1e-3)

    @torch.inference_mode()
    def purify(self, images: list[np.ndarray]) -> list[np.ndarray]:
        results: list[np.ndarray | None] = [None] * len(images)
        o = self.options
        seeds = [o.seed] * len(images)
        # One upscaler call per batch: everything is resized to the same low-res square first.
        low = self._to_tensor(images, o.low_res)
        up = self._run(low, seeds, self.dtype)
        if self.dtype != torch.float32:
            bad = self._bad(up)
            if bad.any():
                idx = bad.nonzero().flatten().tolist()
                log.warning("sr: %d image(s) came out NaN/black in %s; re-running in float32", len(idx), self.dtype)
                try:
                    up[idx] = self._run(low[idx], [seeds[i] for i in idx], torch.float32)
                finally:
                    self.pipe.to(dtype=self.dtype)
        nan = torch.isnan(up.flatten(1)).any(1)
        if nan.any():  # NaN would be written as garbage pixels: fail instead (one error row per image)
            raise RuntimeError(f"sr: image(s) {nan.nonzero().flatten().tolist()} came out NaN even in float32")
        for size, idx in group_indices_by_size(images).items():
            batch = up[idx]
            if o.keep_input_size and tuple(batch.shape[-2:]) != size:
                batch = F.interpolate(batch, size=size, mode="bicubic", align_corners=False, antialias=True)
            arr = (batch.clamp(0, 1) * 255).permute(0, 2, 3, 1).cpu().numpy()
            for j, i in enumerate(idx):
                results[i] = float_to_uint8(arr[j])
        return results  # type: ignore[return-value]
