"""A few images from the model being trained, for the loggers: cheap, fixed seeds, same prompt each time.

Decoupled sampling (Eq. 6) is ε̃ = (1 + w)·ε(c) − w·ε(c_neg); that is classifier-free guidance with the
negative prompt in the unconditional slot and guidance_scale = 1 + w, so diffusers' pipeline draws it with a
DDIM scheduler at a small step count. The full sampler (many seeds, Parquet outputs) is `raypdm sample`.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch

from raypdm.train.prompts import CDLPrompts

__all__ = ["validation_images"]


@torch.no_grad()
def validation_images(parts, prompts: CDLPrompts, *, count: int, steps: int, resolution: int, seed: int,
                      w: float = 7.5) -> list[np.ndarray]:
    """`count` uint8 HWC images of `prompts.sampling_prompt()` from the parts' current weights; the modules'
    train/eval modes are restored afterwards."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    modules = (parts.unet, parts.text_encoder)
    modes = [m.training for m in modules]
    device = next(parts.unet.parameters()).device
    pipe = StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
        scheduler=DDIMScheduler.from_config(parts.scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    # DeepSpeed's bf16 engine holds bf16 weights beside the fp32 VAE: autocast reconciles them on CUDA.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    try:
        for m in modules:
            m.eval()
        with autocast:
            out = pipe(
                prompts.sampling_prompt(), negative_prompt=prompts.negative(), num_images_per_prompt=count,
                num_inference_steps=steps, guidance_scale=1.0 + w, height=resolution, width=resolution,
                generator=torch.Generator().manual_seed(seed), output_type="np",
            ).images  # fmt: skip
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)
    return [np.clip(np.rint(im * 255), 0, 255).astype(np.uint8) for im in out]
