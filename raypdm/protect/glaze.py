"""Glaze-style cloak (Shan et al., USENIX Security 2023, "Glaze: Protecting Artists from Style Mimicry by
Text-to-Image Models"). Glaze's code is not public; this follows the paper's formulation.

    x_T = Ω(x, T)                                               (computed once per image, no grad)
    min_δ  ‖Φ(x + δ) − Φ(x_T)‖²  +  α · max(LPIPS(x + δ, x) − p, 0)     within ‖δ‖∞ ≤ r

- Ω, the style-transfer model: SD 2.1-base img2img of the photo with ``style_prompt`` (``strength``,
  ``diffusion_steps`` DDIM steps, guidance ``guidance_scale``), seeded by the image, as Glaze uses
  Stable Diffusion's img2img with the target style's prompt.
- Φ, the feature extractor: the SD VAE encoder (posterior mean), the image encoder of the mimicking
  model; the distance is the mean squared difference over latent elements.
- The perceptual budget: LPIPS (AlexNet, ``raypdm.metrics.faithfulness.load_lpips``) above the budget
  ``lpips_budget`` (p) is penalised with weight ``lpips_weight`` (α).

Deliberate differences: Glaze optimises an unconstrained δ (Adam) under the LPIPS penalty alone; here
the penalty is added to the ℓ∞ PGD of paper Eq. 4 (r = 11/255 by default), so both budgets hold and
the saved PNG still meets the ℓ∞ bound. The target style is one fixed prompt (Glaze picks a style far
from the artwork's own). ``lpips_backbone="auto"`` uses the ImageNet AlexNet trunk with the ``full``
preset and a random trunk (offline, values for tests only) with ``tiny``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from raypdm.protect.base import ImageProtectOptions, ProtectContext, register_protection
from raypdm.protect.diffusion import (
    decode_pixels,
    encode_pixels,
    img2img,
    load_model,
    prompt_embeddings,
    randn_per_sample,
)
from raypdm.protect.pgd import PGDImageProtection, generators_for

__all__ = ["Glaze", "GlazeOptions"]


class GlazeOptions(ImageProtectOptions, frozen=True):
    style_prompt: str = Field(
        "an oil painting of a person in the style of Vincent van Gogh", description="the target style T of Ω(x, T)"
    )
    strength: float = Field(0.5, gt=0.0, le=1.0, description="img2img strength of the style transfer")
    diffusion_steps: int = Field(20, ge=1, le=1000, description="DDIM steps of the style transfer schedule")
    guidance_scale: float = Field(7.5, ge=1.0, description="classifier-free guidance of the style transfer")
    lpips_budget: float = Field(0.07, ge=0.0, description="p: LPIPS(x, x+δ) allowed before the penalty starts")
    lpips_weight: float = Field(1.0, ge=0.0, description="α: weight of the LPIPS penalty")
    lpips_backbone: Literal["auto", "pretrained", "random"] = Field(
        "auto", description="LPIPS AlexNet trunk: auto = pretrained with preset 'full', random with 'tiny'"
    )


@register_protection("glaze", GlazeOptions)
class Glaze(PGDImageProtection):
    name = "glaze"
    STYLE_STREAM = 4

    def __init__(self, options: GlazeOptions | None = None, context: ProtectContext | None = None):
        from raypdm.metrics.faithfulness import load_lpips

        self.options = options or GlazeOptions()
        self.context = context or ProtectContext()
        self.device = torch.device(self.context.device)
        self.parts = load_model("sd21-base", self.context, self.device)
        self.cond = prompt_embeddings(self.parts, self.options.style_prompt)
        self.uncond = prompt_embeddings(self.parts, "") if self.options.guidance_scale != 1.0 else None
        self.pretrained_lpips = self.options.lpips_backbone == "pretrained" or (
            self.options.lpips_backbone == "auto" and self.context.preset == "full"
        )
        self.lpips = load_lpips(self.device, pretrained_backbone=self.pretrained_lpips,
                                weights_dir=self.context.weights_dir).requires_grad_(False)

    def config_dict(self) -> dict:
        return {**super().config_dict(), "lpips_pretrained": self.pretrained_lpips}

    @torch.no_grad()
    def style_target(self, x: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """Ω(x, T): the style-transferred images (B, 3, H, W) in [0, 1], each seeded by its image."""
        o = self.options
        z0 = encode_pixels(self.parts.vae, x)
        noise = randn_per_sample(generators_for(seeds, self.STYLE_STREAM), z0.shape[1:], z0.device)
        z = img2img(
            self.parts,
            z0,
            noise,
            cond=self.cond,
            uncond=self.uncond,
            strength=o.strength,
            steps=o.diffusion_steps,
            guidance=o.guidance_scale,
        )
        return decode_pixels(self.parts.vae, z, (int(x.shape[-2]), int(x.shape[-1])))

    def objectives(self, x, seeds):
        o = self.options
        with torch.no_grad():
            target = encode_pixels(self.parts.vae, self.style_target(x, seeds))
        clean = x.detach()

        def objective(x_adv: torch.Tensor) -> torch.Tensor:
            feature = (encode_pixels(self.parts.vae, x_adv) - target).pow(2).flatten(1).mean(1)
            perceptual = self.lpips(x_adv, clean, normalize=True).flatten()
            penalty = torch.clamp(perceptual - o.lpips_budget, min=0.0)
            return -(feature + o.lpips_weight * penalty)

        return objective, objective
