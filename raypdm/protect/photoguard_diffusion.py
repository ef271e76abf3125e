"""PhotoGuard, diffusion attack (Salman et al., ICML 2023, "Raising the Cost of Malicious AI-Powered Image
Editing"; public code github.com/MadryLab/photoguard, notebook ``demo_complex_attack_inpainting``).

    min_{‖δ‖∞ ≤ r}  E_ε ‖ D( img2img(E(x + δ), ε, c) ) − x_target ‖₂

The whole editing process is differentiated: VAE encoder, a short img2img run of SD 2.1-base
(``steps`` DDIM steps at ``strength``, classifier-free guidance ``guidance_scale`` with ``prompt``
against the empty prompt), and the VAE decoder; the edit of the protected photo is pushed toward the
target pattern (``grey``/``checkerboard``, see ``photoguard_encoder.py``; with ``zero_latent`` the final
latent is pushed toward zero instead). Each UNet step and the decoder are gradient-checkpointed
(recomputed in the backward pass), as the official notebook needs on a 40 GB GPU.

``grad_reps`` noise draws per PGD step are averaged (the notebook's ``grad_reps``); each step draws
fresh noise from the image's own generator, and ``loss_before``/``loss_after`` use one fixed draw per
image (``resample=False`` makes every step use that draw too).

Deliberate differences: SD 2.1-base img2img (the paper's base model) instead of the SD 1.5 inpainting
pipeline with a mask; a deterministic DDIM sampler (η = 0) instead of η = 1, so the only randomness is
the starting noise; ℓ∞ sign-gradient steps of constant size (paper Eq. 4); budget in [0, 1] pixels.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch.utils.checkpoint import checkpoint

from raypdm.protect.base import ProtectContext, register_protection
from raypdm.protect.diffusion import (
    decode_pixels,
    encode_pixels,
    img2img,
    load_model,
    prompt_embeddings,
    randn_per_sample,
)
from raypdm.protect.pgd import PGDImageProtection, generators_for
from raypdm.protect.photoguard_encoder import TargetOptions, target_image

__all__ = ["PhotoGuardDiffusion", "PhotoGuardDiffusionOptions"]


class PhotoGuardDiffusionOptions(TargetOptions, frozen=True):
    prompt: str = Field("a photo of a person", description="the editing prompt of the attacked img2img run")
    guidance_scale: float = Field(7.5, ge=1.0, description="classifier-free guidance of the img2img run")
    diffusion_steps: int = Field(8, ge=1, le=1000, description="DDIM inference steps of the img2img schedule")
    strength: float = Field(0.5, gt=0.0, le=1.0, description="img2img strength: the last steps·strength steps run")
    grad_reps: int = Field(1, ge=1, le=64, description="noise draws averaged per PGD step")
    resample: bool = Field(True, description="fresh noise every step; False: every step uses the evaluation draw")
    gradient_checkpointing: bool = Field(True, description="recompute UNet steps and the decoder in the backward")


@register_protection("photoguard_diffusion", PhotoGuardDiffusionOptions)
class PhotoGuardDiffusion(PGDImageProtection):
    name = "photoguard_diffusion"

    def __init__(self, options: PhotoGuardDiffusionOptions | None = None, context: ProtectContext | None = None):
        self.options = options or PhotoGuardDiffusionOptions()
        self.context = context or ProtectContext()
        self.device = torch.device(self.context.device)
        self.parts = load_model("sd21-base", self.context, self.device)
        self.cond = prompt_embeddings(self.parts, self.options.prompt)
        self.uncond = prompt_embeddings(self.parts, "") if self.options.guidance_scale != 1.0 else None

    def edit(self, x: torch.Tensor, generators) -> torch.Tensor:
        """The attacked editing process: latents after img2img (scaled), for x (B, 3, H, W) in [0, 1]."""
        o = self.options
        z0 = encode_pixels(self.parts.vae, x)
        noise = randn_per_sample(generators, z0.shape[1:], z0.device)
        return img2img(
            self.parts,
            z0,
            noise,
            cond=self.cond,
            uncond=self.uncond,
            strength=o.strength,
            steps=o.diffusion_steps,
            guidance=o.guidance_scale,
            checkpoint_steps=o.gradient_checkpointing,
        )

    def _distance(self, z: torch.Tensor, target: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
        if target is None:  # zero_latent: the edit's latent toward 0
            return z.flatten(1).norm(dim=1)
        vae = self.parts.vae
        if self.options.gradient_checkpointing and torch.is_grad_enabled():
            image = checkpoint(decode_pixels, vae, z, size, use_reentrant=False)
        else:
            image = decode_pixels(vae, z, size)
        return (image - target).flatten(1).norm(dim=1)

    def objectives(self, x, seeds):
        o = self.options
        size = (int(x.shape[-2]), int(x.shape[-1]))
        target = None if o.target == "zero_latent" else target_image(o, size, self.device)
        ascent_gens = generators_for(seeds, self.ASCENT_STREAM)

        def loss(x_adv, gens, reps):
            total = 0.0
            for _ in range(reps):
                total = total + self._distance(self.edit(x_adv, gens), target, size)
            return -total / reps

        def evaluate(x_adv):
            return loss(x_adv, generators_for(seeds, self.EVAL_STREAM), 1)

        def ascent(x_adv):
            return loss(x_adv, ascent_gens, o.grad_reps) if o.resample else evaluate(x_adv)

        return ascent, evaluate
