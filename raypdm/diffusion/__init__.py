"""Pixel-space diffusion schedules and samplers (guided-diffusion's discrete Gaussian diffusion).

    from raypdm.diffusion import GaussianDiffusion
    diffusion = GaussianDiffusion.linear(1000, respacing="250")   # ADM's linear schedule, respaced
"""

from __future__ import annotations

from raypdm.diffusion.gaussian import (
    GaussianDiffusion,
    ModelFn,
    linear_betas,
    randn_rows,
    sdedit,
    space_timesteps,
)

__all__ = ["GaussianDiffusion", "ModelFn", "linear_betas", "randn_rows", "sdedit", "space_timesteps"]
