"""PhotoGuard, encoder attack (Salman et al., ICML 2023, "Raising the Cost of Malicious AI-Powered Image
Editing"; public code github.com/MadryLab/photoguard, ``demo/app.py`` and the "simple attack" notebooks).

    min_{‖δ‖∞ ≤ r}  ‖E(x + δ) − E(x_target)‖₂

with E the mean of SD's VAE posterior: the perturbed photo encodes like the target, so anything built
on its latent (img2img, inpainting, fine-tuning on it) starts from the target's content. PGD maximises
the negated distance (``pgd.py``); it is deterministic, so the ascent and the reported losses are the
same function.

Target (``target``): a fixed pattern generated here, never downloaded, at the image's own size.
- ``grey`` (default): a uniform grey of ``target_level`` (128). PhotoGuard's public demo fetches a
  "gray uniformity" test picture (a flat mid-grey screen-test image) as its target; a flat grey at
  level 128 is our deterministic stand-in for it.
- ``checkerboard``: black/white squares of ``checker_cell`` pixels (a high-contrast pattern target).
- ``zero_latent``: the zero latent, i.e. minimise ‖E(x + δ)‖₂ (the notebooks' first variant).

Deliberate differences: a constant step α (paper Eq. 4) instead of the demo's linearly decaying step;
the budget in [0, 1] pixel units (r = 11/255) instead of the demo's eps = 0.06 on [−1, 1] pixels;
SD 2.1-base's VAE instead of the SD 1.5 inpainting model's (same VAE architecture); no mask.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from raypdm.protect.base import ImageProtectOptions, ProtectContext, register_protection
from raypdm.protect.diffusion import encode_pixels, load_model
from raypdm.protect.pgd import PGDImageProtection

__all__ = ["PhotoGuardEncoder", "PhotoGuardEncoderOptions", "TargetOptions", "target_image"]

TargetKind = Literal["grey", "checkerboard", "zero_latent"]


class TargetOptions(ImageProtectOptions, frozen=True):
    """The target pattern shared by both PhotoGuard attacks."""

    target: TargetKind = Field("grey", description="grey | checkerboard | zero_latent (see the module docstring)")
    target_level: int = Field(128, ge=0, le=255, description="grey level of the 'grey' target")
    checker_cell: int = Field(32, ge=1, le=4096, description="square side in pixels of the 'checkerboard' target")


def target_image(options: TargetOptions, shape: tuple[int, int], device) -> torch.Tensor:
    """The target pattern as (1, 3, H, W) in [0, 1], a pure function of the options and the size
    (``zero_latent`` has no image: callers use a zero latent instead)."""
    h, w = shape
    if options.target == "grey":
        return torch.full((1, 3, h, w), options.target_level / 255.0, device=device)
    if options.target == "checkerboard":
        ys = torch.arange(h, device=device) // options.checker_cell
        xs = torch.arange(w, device=device) // options.checker_cell
        board = ((ys[:, None] + xs[None, :]) % 2).float()
        return board.expand(1, 3, h, w).clone()
    raise ValueError(f"target {options.target!r} has no target image")


class PhotoGuardEncoderOptions(TargetOptions, frozen=True):
    pass


@register_protection("photoguard_encoder", PhotoGuardEncoderOptions)
class PhotoGuardEncoder(PGDImageProtection):
    name = "photoguard_encoder"

    def __init__(self, options: PhotoGuardEncoderOptions | None = None, context: ProtectContext | None = None):
        self.options = options or PhotoGuardEncoderOptions()
        self.context = context or ProtectContext()
        self.device = torch.device(self.context.device)
        self.parts = load_model("sd21-base", self.context, self.device)
        self.vae = self.parts.vae
        self._targets: dict[tuple[int, int], torch.Tensor] = {}

    @torch.no_grad()
    def target_latent(self, shape: tuple[int, int]) -> torch.Tensor:
        """E(x_target) at this image size, (1, 4, h, w), cached per size."""
        if shape not in self._targets:
            if self.options.target == "zero_latent":
                probe = encode_pixels(self.vae, torch.zeros(1, 3, *shape, device=self.device))
                self._targets[shape] = torch.zeros_like(probe)
            else:
                self._targets[shape] = encode_pixels(self.vae, target_image(self.options, shape, self.device))
        return self._targets[shape]

    def objectives(self, x, seeds):
        target = self.target_latent(tuple(x.shape[-2:]))

        def objective(x_adv: torch.Tensor) -> torch.Tensor:
            z = encode_pixels(self.vae, x_adv)
            return -(z - target).flatten(1).norm(dim=1)

        return objective, objective
