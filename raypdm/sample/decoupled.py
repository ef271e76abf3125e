"""Decoupled negative guidance (paper Eq. 6): sample a CDL-trained model away from its noise pattern.

    ε̃ = (1 + w)·ε(z, c_pos) − w·ε(z, c_neg)

c_pos is the generation prompt plus the CDL class suffix ("a photo of sks person without t@j noisy
pattern"), c_neg the negative prompt ("noisy, abstract, pattern, low quality"), w = 7.5.

Mapping to classifier-free guidance: diffusers computes ε_u + s·(ε_c − ε_u) = s·ε_c − (s − 1)·ε_u, so
Eq. 6 is CFG with s = 1 + w and c_neg in the unconditional slot (`cfg_scale_for`). w = 0 is plain
conditional sampling: s = 1 turns guidance off in diffusers and the negative prompt is never encoded.
The paper's App. A.2 ("CFG 7.5") and its public code call the pipeline with `guidance_scale=7.5`, which is
Eq. 6 with w = 6.5 — the default of both protocols (raypdm/protocols.py). Eq. 6's "w = 7.5", read
literally, would be s = 8.5 (`--set sampling.w=7.5`). Tested in tests/unit/test_protocols.py.

The sampler calls the diffusers pipeline with exactly those arguments rather than re-implementing the
loop; the unit tests record one denoising step and check the guided noise is Eq. 6 of the per-prompt
predictions.

Determinism: every image's initial latents (and any scheduler noise, e.g. DDPM's) come from its own
`torch.Generator` seeded with the image's seed, so a seed regenerates its image alone or in any batch.
Generators live on the pipeline's device by default (`noise_device="device"`): the same seed gives the
same image on the same kind of device; `noise_device="cpu"` draws the noise on the CPU, the same on
every device. Between batches of different sizes, batched float kernels can round differently (~1e-6),
which can move a pixel by one grey level; the same batch is bit-identical.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from raypdm.config import StrictModel
from raypdm.train.prompts import CDLPrompts

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

__all__ = [
    "DEFAULT_PROMPTS",
    "DecoupledSampler",
    "SamplingConfig",
    "cfg_scale_for",
    "decoupled_noise_pred",
    "positive_prompt",
    "seeds_for",
    "w_for_cfg_scale",
]

DEFAULT_PROMPTS = ("a photo of sks person", "a smiling photo of sks person")


class _Schedulers(Mapping[str, type]):
    """Scheduler name -> diffusers class, imported on first lookup: importing diffusers takes seconds, and
    a driver that only validates a sampling config (or a Ray worker that only unpickles one) never needs it."""

    _CLASSES = {"ddim": "DDIMScheduler", "dpm": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler",
                "pndm": "PNDMScheduler"}

    def __getitem__(self, name: str) -> type:
        import diffusers

        return getattr(diffusers, self._CLASSES[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._CLASSES)

    def __len__(self) -> int:
        return len(self._CLASSES)


SCHEDULERS: Mapping[str, type] = _Schedulers()
# PNDM as the SD hub configures it: its Runge-Kutta warm-up breaks below ~4 steps and SD never used it.
_SCHEDULER_OVERRIDES: dict[str, dict[str, Any]] = {"pndm": {"skip_prk_steps": True}}
_SEED_BITS = 63  # fits Parquet int64 and torch.Generator.manual_seed


# --------------------------------------------------------------------------------- the formula


def decoupled_noise_pred(eps_pos: torch.Tensor, eps_neg: torch.Tensor, w: float) -> torch.Tensor:
    """Eq. 6: (1 + w)·ε(z, c_pos) − w·ε(z, c_neg). w = 0 returns ε(z, c_pos)."""
    if eps_pos.shape != eps_neg.shape:
        raise ValueError(f"eps_pos {tuple(eps_pos.shape)} and eps_neg {tuple(eps_neg.shape)} differ in shape")
    return (1.0 + w) * eps_pos - w * eps_neg


def cfg_scale_for(w: float) -> float:
    """The diffusers `guidance_scale` s that computes Eq. 6 with weight w: s = 1 + w."""
    if not math.isfinite(w) or w < 0:
        raise ValueError(f"w must be a finite number ≥ 0, got {w!r}")
    return 1.0 + w


def w_for_cfg_scale(scale: float) -> float:
    """The Eq. 6 weight w of a diffusers `guidance_scale` s ≥ 1: w = s − 1."""
    if not math.isfinite(scale) or scale < 1:
        raise ValueError(f"guidance scale must be a finite number ≥ 1 (1 = no guidance), got {scale!r}")
    return scale - 1.0


def positive_prompt(base: str, token: str = "t@j", cdl: bool = True, templates: CDLPrompts | None = None) -> str:
    """c_pos: `base` plus the CDL class suffix (" without {token} noisy pattern") under CDL, else `base`.

    `templates` carries the suffix template (e.g. the `official-code` preset's); its token and cdl flag
    are replaced by the arguments.
    """
    fields = (templates or CDLPrompts()).model_dump()
    return CDLPrompts(**{**fields, "token": token, "cdl": cdl}).sampling_prompt(base)  # validates the token


def seeds_for(base_seed: int, identity: str, prompt_index: int, n: int) -> list[int]:
    """n seeds for one identity's prompt, each a hash of (base_seed, identity, prompt_index, image index).

    Deterministic and independent of how the work is split, so a manifest row's seed regenerates exactly
    that image; different identities, prompts and images get unrelated seeds.
    """
    if n < 0:
        raise ValueError(f"n must be ≥ 0, got {n}")
    seeds = []
    for i in range(n):
        key = f"raypdm.sample/{int(base_seed)}/{identity}/{int(prompt_index)}/{i}".encode()
        seeds.append(int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> (64 - _SEED_BITS))
    return seeds


# ------------------------------------------------------------------------------------------ config


class SamplingConfig(StrictModel):
    """How to sample one personalized model. Defaults are the paper's evaluation (DESIGN.md)."""

    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS), min_length=1)
    num_images: int = Field(16, ge=1, description="images per prompt")
    steps: int = Field(100, ge=1, le=1000, description="denoising steps")
    w: float = Field(6.5, ge=0.0, allow_inf_nan=False,
                     description="Eq. 6 weight; diffusers guidance_scale = 1 + w (6.5: the paper's CFG 7.5)")
    cdl_prompts: CDLPrompts = Field(
        default_factory=CDLPrompts,
        description="token, CDL flag, suffix and negative-prompt templates (must match the training run)",
    )
    height: int = Field(512, ge=8, le=2048)
    width: int = Field(512, ge=8, le=2048)
    seed: int = Field(0, ge=0, description="base seed; each image's seed is seeds_for(seed, identity, prompt, i)")
    scheduler: Literal["model", "ddim", "dpm", "euler", "pndm"] = Field(
        "pndm", description="pndm: SD 2.1-base's own sampler (the paper's); 'model' = the export's scheduler (the "
                            "training DDPM schedule); others are built from its config"
    )
    batch_size: int = Field(8, ge=1, description="images per pipeline call")
    noise_device: Literal["device", "cpu"] = Field("device", description="where the per-image generators live")

    @field_validator("prompts")
    @classmethod
    def _prompts_not_blank(cls, prompts: list[str]) -> list[str]:
        for i, p in enumerate(prompts):
            if not p.strip():
                raise ValueError(f"prompt {i} is empty")
        return prompts

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_8(cls, v: int, info) -> int:
        if v % 8:
            raise ValueError(f"{info.field_name} must be a multiple of 8 (the VAE's downsampling), got {v}")
        return v

    @property
    def cfg_scale(self) -> float:
        return cfg_scale_for(self.w)

    def positive(self, base: str) -> str:
        return self.cdl_prompts.sampling_prompt(base)

    def negative(self) -> str | None:
        """c_neg, or None at w = 0, where it has no effect (and diffusers does not encode it)."""
        return self.cdl_prompts.negative() if self.w > 0 else None


# ----------------------------------------------------------------------------------------- sampler


class DecoupledSampler:
    """Eq. 6 sampling through a diffusers `StableDiffusionPipeline` (guidance_scale = 1 + w, c_neg as
    the negative prompt). The given pipeline is not modified: the sampler shares its modules and uses
    its own scheduler instance."""

    def __init__(self, pipeline: StableDiffusionPipeline, cfg: SamplingConfig | None = None):
        self.cfg = cfg or SamplingConfig()
        base = pipeline.scheduler
        name = self.cfg.scheduler
        cls = type(base) if name == "model" else SCHEDULERS[name]
        scheduler = cls.from_config(base.config, **_SCHEDULER_OVERRIDES.get(name, {}))
        components = {**pipeline.components, "scheduler": scheduler}
        self.pipeline = type(pipeline)(**components, requires_safety_checker=False)
        self.pipeline.set_progress_bar_config(disable=True)

    @property
    def device(self) -> torch.device:
        return self.pipeline._execution_device

    def _generators(self, seeds: Sequence[int]) -> list[torch.Generator]:
        device = torch.device("cpu") if self.cfg.noise_device == "cpu" else self.device
        return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    @torch.no_grad()
    def sample(self, prompt: str, seeds: Sequence[int]) -> list[np.ndarray]:
        """One image (uint8, H×W×3, RGB) per seed for the generation prompt `prompt` (before the CDL suffix)."""
        cfg = self.cfg
        positive, negative = cfg.positive(prompt), cfg.negative()
        images: list[np.ndarray] = []
        for start in range(0, len(seeds), cfg.batch_size):
            chunk = list(seeds[start : start + cfg.batch_size])
            out = self.pipeline(
                prompt=[positive] * len(chunk),
                negative_prompt=[negative] * len(chunk) if negative is not None else None,
                guidance_scale=cfg.cfg_scale,
                num_inference_steps=cfg.steps,
                height=cfg.height,
                width=cfg.width,
                generator=self._generators(chunk),
                output_type="np",
            ).images
            images.extend(np.clip(np.rint(np.asarray(x) * 255.0), 0, 255).astype(np.uint8) for x in out)
        return images

    def records(self, prompt: str, seeds: Sequence[int], identity: str | None = None) -> list[dict[str, Any]]:
        """Metadata per image of `sample(prompt, seeds)`, in the same order: what regenerates it."""
        cfg = self.cfg
        token = cfg.cdl_prompts.token if cfg.cdl_prompts.cdl else None
        common = {
            "identity": identity,
            "prompt": prompt,
            "positive_prompt": cfg.positive(prompt),
            "negative_prompt": cfg.negative(),
            "w": float(cfg.w),
            "cfg_scale": cfg.cfg_scale,
            "steps": cfg.steps,
            "token": token,
            "scheduler": type(self.pipeline.scheduler).__name__,
            "height": cfg.height,
            "width": cfg.width,
            "noise_device": cfg.noise_device,
        }
        return [{**common, "seed": int(s)} for s in seeds]

    def sample_identity(self, identity: str) -> list[tuple[np.ndarray, dict[str, Any]]]:
        """Every prompt × num_images for one identity, with the record of each image."""
        out: list[tuple[np.ndarray, dict[str, Any]]] = []
        for index, prompt in enumerate(self.cfg.prompts):
            seeds = seeds_for(self.cfg.seed, identity, index, self.cfg.num_images)
            recs = self.records(prompt, seeds, identity=identity)
            for rec in recs:
                rec["prompt_index"] = index
            out.extend(zip(self.sample(prompt, seeds), recs, strict=True))
        return out
