"""AdvDM: maximise the denoising loss of a fixed latent diffusion model (Liang et al., ICML 2023,
"Adversarial Example Does Good: Preventing Painting Imitation from Diffusion Models via Adversarial
Examples"; public code github.com/mist-project/mist and the `pgd_attack` of Anti-DreamBooth,
github.com/VinAIResearch/Anti-DreamBooth, which is ASPL without the surrogate training).

    max_{‖δ‖∞ ≤ r}  E_{t, ε} ‖ε_θ(z_t(E(x + δ)), t, τ(c)) − y‖²,   y = ε (or v for v-prediction)

with the frozen SD 2.1-base UNet, VAE encoder E and text encoder τ, by sign-gradient PGD (``pgd.py``).
Each step draws ``timesteps_per_step`` fresh (t, ε) pairs per image (Monte-Carlo over timesteps, as
AdvDM's one random t per step); ``loss_before``/``loss_after`` use ``eval_timesteps`` fixed pairs per
image so the two are comparable. ``resample=False`` makes every step reuse those fixed draws (common
random numbers): the attack then maximises exactly the reported objective, which matters for small
random-weight models whose per-draw gradients barely correlate (tests), less for the real SD.

Deliberate differences: the budget is in [0, 1] pixel units (r = 11/255, α = 1/255, paper Eq. 4) where
Anti-DreamBooth's script works in [−1, 1]; the conditioning prompt is configurable (default
Anti-DreamBooth's instance prompt "a photo of sks person"; AdvDM's LDM used the unconditional model);
images are attacked at their own resolution (padded to a multiple of 8) instead of being resized to 512.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from raypdm.protect.base import ImageProtectOptions, ProtectContext, register_protection
from raypdm.protect.diffusion import encode_pixels, load_model, mc_denoising_loss, prompt_embeddings
from raypdm.protect.pgd import Objective, PGDImageProtection, generators_for

__all__ = ["AdvDM", "AdvDMOptions"]

_TRAIN_TIMESTEPS = 1000  # SD 2.1-base's schedule; checked against the loaded scheduler


class AdvDMOptions(ImageProtectOptions, frozen=True):
    prompt: str = Field("a photo of sks person", description="text condition c of the denoising loss")
    timesteps_per_step: int = Field(1, ge=1, le=64, description="(t, ε) draws per image per PGD step")
    eval_timesteps: int = Field(8, ge=1, le=256, description="fixed (t, ε) draws per image for loss_before/after")
    min_timestep: int = Field(0, ge=0, description="t ~ U[min_timestep, max_timestep)")
    max_timestep: int = Field(_TRAIN_TIMESTEPS, ge=1, description="exclusive upper bound of t")
    latent_sample: bool = Field(True, description="posterior sample of the VAE (Anti-DreamBooth) instead of its mean")
    resample: bool = Field(
        True, description="fresh (t, ε) draws every step (AdvDM); False: every step reuses the evaluation draws"
    )

    @model_validator(mode="after")
    def _timestep_range(self) -> AdvDMOptions:
        if self.min_timestep >= self.max_timestep:
            raise ValueError(f"min_timestep ({self.min_timestep}) must be < max_timestep ({self.max_timestep})")
        return self


class DenoisingObjective:
    """E_{t,ε} of the denoising loss of SD at x (B, 3, H, W) in [0, 1]; per-image random streams.

    Shared by AdvDM and the adaptive CodeSR attack (which calls it on purified images)."""

    def __init__(self, parts, options: AdvDMOptions):
        self.parts = parts
        self.options = options
        n_train = parts.scheduler.config.num_train_timesteps
        if options.max_timestep > n_train:
            raise ValueError(f"max_timestep {options.max_timestep} exceeds the scheduler's {n_train} timesteps")
        self.hidden = prompt_embeddings(parts, options.prompt)

    def __call__(self, x, generators, samples: int):
        o = self.options
        z = encode_pixels(self.parts.vae, x, sample=o.latent_sample, generators=generators)
        return mc_denoising_loss(self.parts, z, self.hidden, generators, samples, (o.min_timestep, o.max_timestep))

    def pair(self, seeds: list[int], ascent_stream: int, eval_stream: int) -> tuple[Objective, Objective]:
        """(ascent objective with generators that advance each call, evaluation objective that redraws
        the same fixed pairs on every call)."""
        o = self.options
        ascent_gens = generators_for(seeds, ascent_stream)

        def ascent(x_adv):
            if not o.resample:
                return evaluate(x_adv)
            return self(x_adv, ascent_gens, o.timesteps_per_step)

        def evaluate(x_adv):
            return self(x_adv, generators_for(seeds, eval_stream), o.eval_timesteps)

        return ascent, evaluate


@register_protection("advdm", AdvDMOptions)
class AdvDM(PGDImageProtection):
    name = "advdm"

    def __init__(self, options: AdvDMOptions | None = None, context: ProtectContext | None = None):
        import torch

        self.options = options or AdvDMOptions()
        self.context = context or ProtectContext()
        self.device = torch.device(self.context.device)
        self.parts = load_model("sd21-base", self.context, self.device)
        self.loss = DenoisingObjective(self.parts, self.options)

    def objectives(self, x, seeds):
        return self.loss.pair(seeds, self.ASCENT_STREAM, self.EVAL_STREAM)
