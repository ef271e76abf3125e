"""Latent DiffPure: SDEdit purification in Stable Diffusion 2.1-base's latent space, with a prompt
(``latent_diffpure``) or with the empty prompt (``latent_diffpure_null``).

Source: the latent DiffPure baselines of *Rethinking and Red-Teaming Protective Perturbation in
Personalized Diffusion Models* (Liu, Chen, Chen, Sun) and its public code (github.com/liuyixin-louis/
DiffShortcut: ``diffshortcut/defenses/diffpure_main.py``, run by ``scripts/sub/defense/ldiffp.sh`` and,
with ``--empty_condition``, ``eldiffp.sh``); the method is SDEdit (Meng et al., 2022) / DiffPure (Nie et
al., 2022) moved into a latent diffusion model. The image is encoded by the VAE, noised to step
t = strength x T with the model's own DDPM schedule, denoised back with the UNet, and decoded.
Here this is diffusers' ``StableDiffusionImg2ImgPipeline`` built from our SD 2.1-base parts.

Defaults:
- ``strength`` 0.3: the public code noises to ``--opt_t 300`` of T = 1000 for both variants
  (ldiffp.sh, eldiffp.sh).
- ``steps`` 1000 with the DDPM scheduler: img2img runs the last ``int(steps * strength)`` of ``steps``
  evenly spaced steps, so 1000 x 0.3 = 300 ancestral DDPM steps, one per timestep, after noising to
  t = 300, as the public code does (it also ran a last step at t = 0: 301 steps). Fewer steps stride
  through the same schedule (``steps=100``: 30 steps, 10x faster).
- ``guidance_scale`` 7.5 (the public code's classifier-free guidance), prompt template
  "a photo of {class_noun}, high quality, highres" with ``class_noun`` "person" (the baseline prompt
  raypdm's purification-baselines issue specifies; configurable, validated when the options are parsed).

Deliberate differences from the public code:
- Model: SD 2.1-base (the paper's fine-tuning model, and the rest of raypdm's); the code loaded
  CompVis/stable-diffusion-v1-4 for this baseline.
- Prompt: the code said "a photo of a {class}, clear, high resolution, high quality, noise-free";
  the default here is the wording above (``prompt_template`` restores the code's).
- Null variant: with the empty prompt in both classifier-free-guidance slots, guidance is the identity
  (uncond + w * (cond - uncond) = uncond for any w), so it runs without CFG: the same result with one
  UNet pass per step instead of two. It has no ``guidance_scale``/prompt options for that reason.
- Geometry: the code resized to 512 and centre-cropped; here the image keeps its size (the field's
  data are 512x512 already). Sides that are not multiples of 8 (the VAE's factor) are padded by
  edge replication and the padding is cropped off again, so no pixel is resampled.
- Randomness: the code drew from the global RNG; here each image has its own generator seeded with
  ``seed`` (VAE posterior sample, forward noise, DDPM noise), so an image gets the same noise whatever
  batch, worker or chain it arrives in. Same batch, same bits; in another batch composition, batched
  float kernels round differently (~1e-6) and a few pixels can land one grey level apart.
- Precision: the code ran float32; here fp32 on the CPU and, on a GPU, ``dtype`` (default float16,
  like ``sr``) with ``sr``'s guard: an image that comes out NaN or all black in half precision is re-run in fp32,
  never written.
- Output: [0, 1] -> uint8 by rounding (the code rounded as well).
"""

from __future__ import annotations

import abc
import logging
import string
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator

from raypdm.purify.base import (
    BuildContext,
    Purifier,
    PurifierOptions,
    float_to_uint8,
    group_indices_by_size,
    register_purifier,
)

__all__ = [
    "LatentDiffPureNullOptions",
    "LatentDiffPureNullPurifier",
    "LatentDiffPureOptions",
    "LatentDiffPurePurifier",
    "pad_to_multiple",
]

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
VAE_FACTOR = 8  # SD's VAE downsamples by 8: image sides must be multiples of it


def pad_to_multiple(x: torch.Tensor, multiple: int = VAE_FACTOR) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad an N x C x H x W batch on the bottom/right by edge replication to sides divisible by
    ``multiple``; returns the padded batch and the original (H, W) to crop back to."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x, (h, w)


class _SDEditOptions(PurifierOptions):
    strength: float = Field(
        0.3, gt=0.0, lt=1.0, description="SDEdit t/T: noise to this fraction of the schedule (public code: 300/1000)"
    )
    steps: int = Field(
        1000, ge=1, le=1000, description="DDPM schedule length; int(steps * strength) steps actually run"
    )
    seed: int = 0
    batch_size: int = Field(8, ge=1, le=1024, description="images per pipeline call on the device")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float16", description="GPU compute dtype")

    @model_validator(mode="after")
    def _at_least_one_step(self):
        # diffusers would fail inside an actor with an empty timestep list; say it here, with the fields.
        if int(self.steps * self.strength) < 1:
            raise ValueError(
                f"strength * steps must allow at least one denoising step: int({self.steps} * {self.strength}) = 0; "
                "raise strength or steps"
            )
        return self


class LatentDiffPureOptions(_SDEditOptions):
    class_noun: str = Field("person", min_length=1, description="fills the prompt template")
    prompt_template: str = Field(
        "a photo of {class_noun}, high quality, highres", description="must contain {class_noun}"
    )
    guidance_scale: float = Field(7.5, ge=0.0, description="classifier-free guidance (<= 1 turns CFG off)")

    @field_validator("prompt_template")
    @classmethod
    def _template_has_class_noun(cls, v: str) -> str:
        # Checked when the options are validated (config load, in the driver), not first in an actor.
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
        except ValueError as err:
            raise ValueError(f"prompt_template {v!r} is not a valid template: {err}") from None
        if fields != {"class_noun"}:
            raise ValueError(f"prompt_template must contain {{class_noun}} and no other placeholder, got {v!r}")
        return v

    def prompt(self) -> str:
        return self.prompt_template.format(class_noun=self.class_noun)


class LatentDiffPureNullOptions(_SDEditOptions):
    """No prompt and no guidance options: the empty prompt makes guidance the identity (module docstring)."""


class _LatentSDEditPurifier(Purifier):
    """SDEdit through ``StableDiffusionImg2ImgPipeline``; subclasses fix the prompt and the guidance."""

    uses_gpu = True
    options: _SDEditOptions

    def __init__(self, options: _SDEditOptions, context: BuildContext | None):

        self.options = options
        context = context or BuildContext()
        self.device = torch.device(context.device)
        self.preset = context.preset
        self.dtype = _DTYPES[options.dtype] if self.device.type == "cuda" else torch.float32
        parts = context.model("sd21-base", device=self.device)
        self.weights = context.weights_source()
        for module in (parts.unet, parts.vae, parts.text_encoder):
            module.requires_grad_(False)  # inference only: no autograd bookkeeping
        # Imported here, not at the top: diffusers' pipelines take ~4 s to import, and every process that
        # touches the purifier registry (the driver validating a JPEG config, each Ray Data task) would pay it.
        from diffusers import DDPMScheduler, StableDiffusionImg2ImgPipeline

        self.pipe = StableDiffusionImg2ImgPipeline(
            vae=parts.vae,
            text_encoder=parts.text_encoder,
            tokenizer=parts.tokenizer,
            unet=parts.unet,
            # The model's training schedule, as the public code sampled it (its own DDPMScheduler).
            scheduler=DDPMScheduler.from_config(parts.scheduler.config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        self.pipe.set_progress_bar_config(disable=True)
        self.pipe.to(self.device)
        if self.dtype != torch.float32:
            self.pipe.to(dtype=self.dtype)

    # -- what the variants differ in ------------------------------------------------------------
    @abc.abstractmethod
    def prompt(self) -> str:
        """The text condition of every image."""

    @abc.abstractmethod
    def guidance_scale(self) -> float:
        """diffusers' guidance scale (<= 1: no classifier-free guidance)."""

    def config_dict(self) -> dict:
        return {**super().config_dict(), "preset": self.preset, "weights": self.weights}

    # -- running --------------------------------------------------------------------------------
    def _run(self, x: torch.Tensor, seeds: list[int], dtype: torch.dtype) -> torch.Tensor:
        """x: N x 3 x H x W in [0, 1], sides multiples of 8. Returns the same shape in [0, 1] (float32)."""
        o = self.options
        if dtype != self.pipe.unet.dtype:
            self.pipe.to(dtype=dtype)
        gens = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]
        n = x.shape[0]
        out = self.pipe(
            prompt=[self.prompt()] * n,
            image=x.to(dtype),  # [0, 1]: the pipeline's image processor maps it to [-1, 1]
            strength=o.strength,
            num_inference_steps=o.steps,
            guidance_scale=self.guidance_scale(),
            generator=gens,
            output_type="pt",
        ).images
        return out.float()

    @staticmethod
    def _bad(images: torch.Tensor) -> torch.Tensor:
        flat = images.flatten(1)
        return torch.isnan(flat).any(1) | (flat.abs().amax(1) < 1e-3)

    def _guarded(self, x: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        out = self._run(x, seeds, self.dtype)
        if self.dtype != torch.float32:
            bad = self._bad(out)
            if bad.any():
                idx = bad.nonzero().flatten().tolist()
                log.warning(
                    "%s: %d image(s) came out NaN/black in %s; re-running in float32", self.name, len(idx), self.dtype
                )
                try:
                    out[idx] = self._run(x[idx], [seeds[i] for i in idx], torch.float32)
                finally:
                    self.pipe.to(dtype=self.dtype)
        nan = torch.isnan(out.flatten(1)).any(1)
        if nan.any():  # NaN would be written as garbage pixels: fail instead (one error row per image)
            raise RuntimeError(f"{self.name}: image(s) {nan.nonzero().flatten().tolist()} came out NaN even in float32")
        return out

    @torch.inference_mode()
    def purify(self, images: list[np.ndarray]) -> list[np.ndarray]:
        results: list[np.ndarray | None] = [None] * len(images)
        step = self.options.batch_size
        for group in group_indices_by_size(images).values():
            for start in range(0, len(group), step):
                idx = group[start : start + step]
                x = torch.from_numpy(np.stack([images[i] for i in idx])).to(self.device)
                x = x.permute(0, 3, 1, 2).float() / 255.0
                x, (h, w) = pad_to_multiple(x)
                out = self._guarded(x, [self.options.seed] * len(idx))[..., :h, :w]
                arr = (out.clamp(0, 1) * 255).permute(0, 2, 3, 1).cpu().numpy()
                for j, i in enumerate(idx):
                    results[i] = float_to_uint8(arr[j])
        return results  # type: ignore[return-value]


@register_purifier("latent_diffpure", LatentDiffPureOptions)
class LatentDiffPurePurifier(_LatentSDEditPurifier):
    name = "latent_diffpure"
    options: LatentDiffPureOptions

    def __init__(self, options: LatentDiffPureOptions | None = None, context: BuildContext | None = None):
        options = options or LatentDiffPureOptions()
        options.prompt()  # fail now on a bad template, not inside an actor
        super().__init__(options, context)

    def prompt(self) -> str:
        return self.options.prompt()

    def guidance_scale(self) -> float:
        return self.options.guidance_scale


@register_purifier("latent_diffpure_null", LatentDiffPureNullOptions)
class LatentDiffPureNullPurifier(_LatentSDEditPurifier):
    name = "latent_diffpure_null"
    options: LatentDiffPureNullOptions

    def __init__(self, options: LatentDiffPureNullOptions | None = None, context: BuildContext | None = None):
        super().__init__(options or LatentDiffPureNullOptions(), context)

    def prompt(self) -> str:
        return ""

    def guidance_scale(self) -> float:
        return 1.0  # diffusers runs no CFG at <= 1: identical to CFG with "" in both slots, at half the cost
