"""IMPRESS purification: make the image consistent under the VAE while staying LPIPS-close to the input.

Source: Cao, Li, Wang, Jia, Li, Chen, *IMPRESS: Evaluating the Resilience of Imperceptible Perturbations
Against Unauthorized Data Usage in Diffusion-Based Generative AI* (NeurIPS 2023), public code
github.com/AAAAAAsuka/Impress (``impress.py``, ``main.py``), as the *Rethinking and Red-Teaming
Protective Perturbation* paper ran it (github.com/liuyixin-louis/DiffShortcut,
``diffshortcut/defenses/impress.py``). Starting from the protected image x_ptb, Adam minimises, per image,

    ||x - D(E(x))||^2  +  alpha * max(LPIPS(x, x_ptb) - delta, 0)

with E/D the SD 2.1-base VAE encoder/decoder (posterior mean, no latent scaling: ``vae(x).sample``), the
squared error averaged over pixels, all in the VAE's [-1, 1] range, and x clamped to [-1, 1] after
every step. A perturbation that fools the encoder is not a fixed point of D(E(.)); the consistency term
pulls it out while the hinge keeps the image within LPIPS delta of what was published.

Settings, as the public code ran them (``impress(x, model=vae, clamp_min=-1, clamp_max=1, eps=0.1,
iters=3000, lr=0.01, pur_alpha=0.1, noise=0.1)``):
- ``iterations`` 3000, ``alpha`` 0.1, ``lpips_budget`` (delta, the code's ``eps``/``--pur_eps``) 0.1.
- ``lr`` 0.01: IMPRESS's ``main.py`` default ``--pur_lr`` and the Rethinking code's call; the
  ``impress()`` function's own default (and, as raypdm's issue reads it, the IMPRESS paper) say 1e-3. Adam with eps 1e-5, the learning
  rate cosine-annealed over the iterations down to 1e-5 (``CosineAnnealingLR(eta_min=1e-5)``; never
  above ``lr`` when ``lr`` < 1e-5).
- ``init_noise`` 0.1: the code starts from x_ptb + N(0, 0.1^2) in [-1, 1] units, not from x_ptb
  itself (set 0 for that). The first step sees the unclamped start, as in the code.
- LPIPS with the VGG trunk (``lpips.LPIPS(net='vgg')`` in the code; the 0.1 budget was set on that
  scale); ``lpips_net="alex"`` uses ``raypdm.metrics.faithfulness.load_lpips``, the metric the
  pipeline reports. ``lpips_backbone="pretrained"`` needs torchvision's ImageNet file in its cache
  (an error names it otherwise); ``"random"`` is a seeded random trunk, for tests and smoke runs only.

Deliberate differences from the public code:
- Batching: the code purified one image per call; here a batch is optimised jointly on the device.
  The loss is the *sum* of per-image objectives, so each image gets exactly the gradient (and, Adam
  being per-element, exactly the update) it would get alone.
- Precision: the code ran everything in float16, the optimised image and Adam's state included, where
  the gradient of a pixel-averaged MSE (~1e-7) sits at fp16's underflow limit. Here x and Adam's
  state stay float32 and only the VAE and LPIPS run in ``dtype`` (autocast, GPU only; the CPU always
  runs float32). The loss is scaled by the number of elements per image (a sum instead of a mean) and
  Adam's eps by the same factor: Adam's update is then exactly the code's, but half-precision
  gradients no longer underflow. An image whose objective ends non-finite in half precision is
  re-run in float32 (like ``sr``'s guard); NaN is never written.
- Randomness: each image's start noise comes from its own CPU generator seeded with ``seed`` (the
  code drew from the global RNG), so an image gets the same start whatever batch or device.
- Geometry: the code resized each image down to sides divisible by 32 (Lanczos) and saved that size;
  here sides that are not multiples of 8 (the VAE's factor) are padded by edge replication and
  cropped back, so the output has the input's size and no pixel is resampled. The objective is
  taken on the padded image.
- Output: [-1, 1] -> [0, 1] -> uint8 by rounding (the code's ``ToPILImage`` truncated).
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from raypdm.purify.base import (
    BuildContext,
    Purifier,
    PurifierOptions,
    float_to_uint8,
    group_indices_by_size,
    register_purifier,
)

__all__ = ["ImpressOptions", "ImpressPurifier", "load_lpips_vgg", "vgg16_weights_path"]

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
VAE_FACTOR = 8
ADAM_EPS = 1e-5  # the code's torch.optim.Adam(..., eps=1e-5)
ETA_MIN = 1e-5  # the code's CosineAnnealingLR(..., eta_min=1e-5)
LPIPS_RANDOM_SEED = 0  # the same seed raypdm.metrics.faithfulness uses for its random trunk


class ImpressOptions(PurifierOptions):
    iterations: int = Field(3000, ge=1, le=100_000, description="Adam steps (public code: 3000)")
    lr: float = Field(0.01, gt=0.0, le=1.0, description="Adam learning rate (public code 0.01; IMPRESS paper 1e-3)")
    alpha: float = Field(0.1, ge=0.0, description="weight of the LPIPS hinge (pur_alpha)")
    lpips_budget: float = Field(
        0.1, ge=0.0, description="delta: LPIPS(x, x_ptb) allowed before the hinge acts (pur_eps)"
    )
    init_noise: float = Field(0.1, ge=0.0, le=2.0, description="std of the start noise in [-1, 1] units (pur_noise)")
    lpips_net: Literal["vgg", "alex"] = Field("vgg", description="LPIPS trunk; the public code used VGG")
    lpips_backbone: Literal["pretrained", "random"] = Field(
        "pretrained", description="'random' needs no download but suits only tests and smoke runs"
    )
    seed: int = 0
    batch_size: int = Field(8, ge=1, le=1024, description="images optimised together on the device")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float16", description="GPU dtype of the VAE and LPIPS passes (x and Adam stay float32)"
    )


def vgg16_weights_path(weights_dir: str | None = None) -> str:
    """Where LPIPS-VGG's ImageNet VGG16 trunk is read from: ``<weights_dir>/lpips-vgg/`` when that holds it
    (or when torchvision's cache does not), else torchvision's cache under ``TORCH_HOME``."""
    from raypdm.models.lpips_trunks import find_trunk, trunk_candidates

    found = find_trunk("vgg", weights_dir)
    return str(found if found is not None else trunk_candidates("vgg", weights_dir)[0])


def load_lpips_vgg(
    device: str | torch.device = "cpu", pretrained_backbone: bool = False, weights_dir: str | None = None
) -> torch.nn.Module:
    """LPIPS-VGG (v0.1 linear layers, shipped with ``lpips``) in eval mode; never touches the network.

    Mirrors ``raypdm.metrics.faithfulness.load_lpips``: the ImageNet VGG16 file comes from
    ``<weights_dir>/lpips-vgg/`` or torchvision's cache, sha256-checked (a missing one is a
    ``MissingWeightsError`` naming both places and the fetch command); a random trunk is seeded without
    disturbing the caller's RNG.
    """
    from raypdm.models.lpips_trunks import build_lpips, load_lpips_net

    if pretrained_backbone:
        return load_lpips_net("vgg", device, weights_dir)
    return build_lpips("vgg", device)


def _load_vae(context: BuildContext, device: torch.device):
    """The SD 2.1-base VAE alone: real weights for ``full`` + ``weights_dir``, else the bundle's seeded
    random VAE (the same weights ``latent_diffpure`` and training see)."""
    from raypdm import models

    if context.weights_dir and context.preset == "full":
        from diffusers import AutoencoderKL

        from raypdm.models.stable_diffusion import DIFFUSERS_WEIGHTS, SD2_VAE_FULL, load_diffusers_model
        from raypdm.models.weights import require_files

        spec = models.get("sd21-base")
        require_files(spec, context.weights_dir)  # MissingWeightsError naming each file and its fetch command
        vae_dir = spec.model_dir(context.weights_dir) / "vae"
        vae = load_diffusers_model(AutoencoderKL, vae_dir, DIFFUSERS_WEIGHTS, SD2_VAE_FULL, device, None)
        return vae, "weights"
    return models.build("sd21-base", preset=context.preset, device=device).vae, "random"


@register_purifier("impress", ImpressOptions)
class ImpressPurifier(Purifier):
    name = "impress"
    uses_gpu = True

    def __init__(self, options: ImpressOptions | None = None, context: BuildContext | None = None):
        from raypdm.metrics.faithfulness import load_lpips

        self.options = o = options or ImpressOptions()
        context = context or BuildContext()
        self.device = torch.device(context.device)
        self.preset = context.preset
        self.dtype = _DTYPES[o.dtype] if self.device.type == "cuda" else torch.float32
        pretrained = o.lpips_backbone == "pretrained"
        # LPIPS first: a missing ImageNet file should fail before the VAE is loaded.
        if o.lpips_net == "vgg":
            self.lpips = load_lpips_vgg(self.device, pretrained_backbone=pretrained, weights_dir=context.weights_dir)
        else:
            self.lpips = load_lpips(self.device, pretrained_backbone=pretrained, weights_dir=context.weights_dir)
        self.lpips.requires_grad_(False)
        self.vae, self.weights = _load_vae(context, self.device)
        self.vae.requires_grad_(False)  # only x is optimised
        self.vae.eval()

    def config_dict(self) -> dict:
        return {**super().config_dict(), "preset": self.preset, "weights": self.weights}

    # -- the objective --------------------------------------------------------------------------
    def objective(self, x: torch.Tensor, x_ptb: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-image terms (float32, shape N) at x, both N x 3 x H x W in [-1, 1] on the device:
        ``consistency`` = mean((D(E(x)) - x)^2), ``lpips`` = LPIPS(x, x_ptb),
        ``hinge`` = max(lpips - delta, 0), ``loss`` = consistency + alpha * hinge."""
        o = self.options
        latent = self.vae.encode(x).latent_dist.mode()
        recon = self.vae.decode(latent).sample
        consistency = (recon.float() - x.float()).pow(2).flatten(1).mean(1)
        lpips = self.lpips(x, x_ptb).float().flatten()
        hinge = torch.relu(lpips - o.lpips_budget)
        return {"consistency": consistency, "lpips": lpips, "hinge": hinge, "loss": consistency + o.alpha * hinge}

    def _autocast(self, dtype: torch.dtype):
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def optimise(self, x_ptb: torch.Tensor, seeds: list[int], dtype: torch.dtype | None = None) -> torch.Tensor:
        """Purify N x 3 x H x W images in [-1, 1] (sides multiples of 8) on the device; returns x in [-1, 1]."""
        # Callers may hold no_grad/inference_mode (a chain, a notebook): this optimisation needs autograd.
        with torch.inference_mode(False), torch.enable_grad():
            return self._optimise(x_ptb.detach().float().clone(), seeds, self.dtype if dtype is None else dtype)

    def _optimise(self, x_ptb: torch.Tensor, seeds: list[int], dtype: torch.dtype) -> torch.Tensor:
        o = self.options
        noise = torch.stack([torch.randn(x_ptb.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds])
        x = (x_ptb + o.init_noise * noise.to(x_ptb.device)).requires_grad_(True)
        # Sum of per-image *sums* (elements x mean): per-image gradients, scaled out of fp16's underflow.
        # Adam is invariant to a constant gradient scale except for eps, so eps is scaled to match.
        scale = float(x_ptb[0].numel())
        optimizer = torch.optim.Adam([x], lr=o.lr, eps=ADAM_EPS * scale)
        eta_min = min(ETA_MIN, o.lr)
        for i in range(o.iterations):
            # CosineAnnealingLR(T_max=iterations, eta_min) in closed form: the lr of step i.
            for group in optimizer.param_groups:
                group["lr"] = eta_min + (o.lr - eta_min) * (1 + math.cos(math.pi * i / o.iterations)) / 2
            optimizer.zero_grad(set_to_none=True)
            with self._autocast(dtype):
                loss = self.objective(x, x_ptb)["loss"]
            (loss.sum() * scale).backward()
            optimizer.step()
            with torch.no_grad():
                x.clamp_(-1.0, 1.0)
        return x.detach()

    def _guarded(self, x_ptb: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        x = self.optimise(x_ptb, seeds, self.dtype)
        if self.dtype != torch.float32:
            with torch.no_grad(), self._autocast(self.dtype):
                final = self.objective(x, x_ptb)["loss"]
            bad = ~torch.isfinite(final) | ~torch.isfinite(x.flatten(1)).all(1)
            if bad.any():
                idx = bad.nonzero().flatten().tolist()
                log.warning("impress: %d image(s) ended non-finite in %s; re-running in float32", len(idx), self.dtype)
                x[idx] = self.optimise(x_ptb[idx], [seeds[i] for i in idx], torch.float32)
        nan = ~torch.isfinite(x.flatten(1)).all(1)
        if nan.any():  # never write garbage pixels: one error row per image instead
            bad_idx = nan.nonzero().flatten().tolist()
            raise RuntimeError(f"impress: image(s) {bad_idx} came out non-finite even in float32")
        return x

    def purify(self, images: list[np.ndarray]) -> list[np.ndarray]:
        results: list[np.ndarray | None] = [None] * len(images)
        step = self.options.batch_size
        for group in group_indices_by_size(images).values():
            for start in range(0, len(group), step):
                idx = group[start : start + step]
                x = torch.from_numpy(np.stack([images[i] for i in idx])).to(self.device)
                x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
                h, w = x.shape[-2:]
                ph, pw = (-h) % VAE_FACTOR, (-w) % VAE_FACTOR
                if ph or pw:
                    x = torch.nn.functional.pad(x, (0, pw, 0, ph), mode="replicate")
                out = self._guarded(x, [self.options.seed] * len(idx))[..., :h, :w]
                arr = ((out + 1.0) * 127.5).clamp(0, 255).permute(0, 2, 3, 1).cpu().numpy()
                for j, i in enumerate(idx):
                    results[i] = float_to_uint8(arr[j])
        return results  # type: ignore[return-value]
