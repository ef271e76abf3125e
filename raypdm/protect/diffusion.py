"""Differentiable Stable Diffusion pieces the protections attack through.

The training-side helpers of ``raypdm.train.dreambooth`` (``encode_prompts``, ``training_target``) are
reused; what differs here is that gradients must reach the *pixels*: ``encode_latents`` there runs
under ``no_grad`` on numpy images, so :func:`encode_pixels` is its differentiable twin (same scaling,
mean or a posterior sample). :func:`img2img` is a short DDIM img2img loop with classifier-free guidance
whose steps can be checkpointed, used by PhotoGuard's diffusion attack and Glaze's style transfer.

Models are loaded once per protection (one per Ray actor): ``preset="tiny"`` gives seeded random
weights, ``preset="full"`` with a ``weights_dir`` the real SD 2.1-base files (``raypdm.models.load``),
``preset="full"`` without one random full-size weights (benchmarks). Every module is frozen: attacks
only differentiate with respect to the image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from raypdm.protect.base import ProtectContext
from raypdm.protect.pgd import crop_to, pad_to_multiple
from raypdm.train.dreambooth import encode_prompts, training_target

__all__ = [
    "decode_pixels",
    "denoising_loss",
    "encode_pixels",
    "freeze",
    "img2img",
    "load_model",
    "mc_denoising_loss",
    "prompt_embeddings",
    "randn_per_sample",
    "resize",
]


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    return module.requires_grad_(False).eval()


def load_model(name: str, context: ProtectContext, device: torch.device):
    """A registered model bundle from the context (real weights at ``full`` with a weights dir, else the
    preset's seeded random weights; once per context), frozen. Float32: sign gradients of half-precision
    attacks are noisy, and attack cost is dominated by model size, not dtype, at the batch sizes used here."""
    parts = context.model(name, device=device)
    for part in vars(parts).values():
        if isinstance(part, torch.nn.Module):
            freeze(part)
    return parts


# ------------------------------------------------------------------------------------------ pixels


def encode_pixels(
    vae, x: torch.Tensor, *, sample: bool = False, generators: Sequence[torch.Generator] | None = None
) -> torch.Tensor:
    """Differentiable VAE latents × scaling_factor of images ``x`` (B, 3, H, W) in [0, 1].

    Sides that are not multiples of 8 are padded (reflect) for the f=8 VAE. ``sample=True`` draws from
    the posterior (as Anti-DreamBooth's attack does) with one generator per image, so an image's
    noise does not depend on its batch; otherwise the posterior mean (``encode_latents``' choice).
    """
    dtype = next(vae.parameters()).dtype
    dist = vae.encode(pad_to_multiple(x, 8).to(dtype) * 2.0 - 1.0).latent_dist
    z = dist.mean
    if sample:
        if generators is None:
            raise ValueError("encode_pixels(sample=True) needs one generator per image")
        z = z + dist.std * randn_per_sample(generators, z.shape[1:], z.device)
    return z.float() * vae.config.scaling_factor


def decode_pixels(vae, z: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Latents (scaled) -> images in [0, 1] (clamped), cropped to ``size`` (undoing the padding)."""
    dtype = next(vae.parameters()).dtype
    x = vae.decode((z / vae.config.scaling_factor).to(dtype)).sample.float()
    x = (x.clamp(-1.0, 1.0) + 1.0) / 2.0
    return crop_to(x, size) if size is not None else x


def randn_per_sample(generators: Sequence[torch.Generator], shape: Sequence[int], device) -> torch.Tensor:
    """(B, *shape) standard normal noise, sample i from generator i (on the CPU: the same everywhere)."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators]).to(device)


@torch.no_grad()
def prompt_embeddings(parts, prompt: str) -> torch.Tensor:
    """τ(prompt), (1, L, D), computed once; callers expand it to their batch."""
    return encode_prompts(parts.text_encoder, parts.tokenizer, [prompt]).float()


# -------------------------------------------------------------------------- the denoising loss


def denoising_loss(
    unet, scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, hidden: torch.Tensor
) -> torch.Tensor:
    """Per-sample ‖ε_θ(z_t, t, c) − y‖² (mean over latent elements), y = ε or v as the scheduler says:
    the instance term of DreamBooth's Eq. 2, without the batch mean."""
    dtype = next(unet.parameters()).dtype
    noisy = scheduler.add_noise(latents, noise, timesteps)
    hidden = hidden.expand(len(latents), -1, -1) if hidden.shape[0] == 1 else hidden
    pred = unet(noisy.to(dtype), timesteps, encoder_hidden_states=hidden.to(dtype)).sample.float()
    target = training_target(scheduler, latents, noise, timesteps).float()
    return (pred - target).pow(2).flatten(1).mean(1)


def mc_denoising_loss(
    parts,
    latents: torch.Tensor,
    hidden: torch.Tensor,
    generators: Sequence[torch.Generator],
    samples: int,
    t_range: tuple[int, int],
) -> torch.Tensor:
    """Monte-Carlo estimate over ``samples`` (t, ε) pairs per image of :func:`denoising_loss`, (B,).

    Image i draws its timesteps (uniform in [t_min, t_max)) and noise from generator i, so its
    estimate does not depend on the rest of the batch. All B·samples pairs go through one UNet call.
    """
    b = len(latents)
    lo, hi = t_range
    ts, noises = [], []
    for g in generators:
        ts.append(torch.randint(lo, hi, (samples,), generator=g))
        noises.append(torch.randn((samples, *latents.shape[1:]), generator=g))
    t = torch.cat(ts).to(latents.device)
    noise = torch.cat(noises).to(latents.device)
    z = latents.repeat_interleave(samples, dim=0)
    loss = denoising_loss(parts.unet, parts.scheduler, z, noise, t, hidden)
    return loss.view(b, samples).mean(1)


# ------------------------------------------------------------------------------------------ img2img


def _guided_eps(unet, z, t, cond, uncond, guidance: float) -> torch.Tensor:
    dtype = next(unet.parameters()).dtype
    b = len(z)
    if guidance == 1.0 or uncond is None:
        hidden = cond.expand(b, -1, -1)
        return unet(z.to(dtype), t, encoder_hidden_states=hidden.to(dtype)).sample.float()
    hidden = torch.cat([uncond.expand(b, -1, -1), cond.expand(b, -1, -1)])
    out = unet(torch.cat([z, z]).to(dtype), t, encoder_hidden_states=hidden.to(dtype)).sample.float()
    eps_u, eps_c = out.chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


def img2img(
    parts,
    z0: torch.Tensor,
    noise: torch.Tensor,
    *,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    strength: float,
    steps: int,
    guidance: float,
    checkpoint_steps: bool = False,
) -> torch.Tensor:
    """SDEdit/img2img in latent space with a deterministic DDIM sampler (η = 0), as diffusers'
    ``StableDiffusionImg2ImgPipeline`` schedules it: ``steps`` inference steps, of which the last
    ``int(steps·strength)`` run, starting from z0 noised to the first of them with ``noise``.

    Differentiable in ``z0``; ``checkpoint_steps`` recomputes each UNet step in the backward pass
    instead of storing its activations (PhotoGuard's diffusion attack backpropagates through all of
    them). Returns the final latents (scaled, like ``z0``).
    """
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(parts.scheduler.config)
    sched.set_timesteps(steps, device=z0.device)
    run = min(max(int(steps * strength), 1), steps)
    timesteps = sched.timesteps[steps - run :]
    z = sched.add_noise(z0, noise, timesteps[:1].repeat(len(z0)))

    def one_step(z_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = _guided_eps(parts.unet, z_in, t, cond, uncond, guidance)
        return sched.step(eps, t, z_in, eta=0.0).prev_sample

    for t in timesteps:
        if checkpoint_steps and torch.is_grad_enabled():
            z = checkpoint(one_step, z, t, use_reentrant=False)
        else:
            z = one_step(z, t)
    return z


def resize(x: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Differentiable resize (antialiased when shrinking); a no-op at the same size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=shrink and mode != "nearest")
