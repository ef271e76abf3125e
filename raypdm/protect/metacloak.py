"""MetaCloak: meta-learned, transformation-robust perturbations against DreamBooth (Liu, Fan, Chen, Sun,
"MetaCloak: Preventing Unauthorized Subject-driven Text-to-image Diffusion-based Synthesis via
Meta-learning", CVPR 2024; github.com/liuyixin-louis/MetaCloak, ``robust_facecloak/attacks/algs/metacloak.py``,
``attacks/worker/robust_pgd_worker.py``, ``script/gen_and_eval.sh``, ``script/methods_config.sh``).

1. A pool of surrogate *training trajectories*: DreamBooth on the identity's images for
   ``pool_train_steps`` = 1000 steps, keeping a snapshot every ``pool_interval`` = 200 steps (and the base):
   6 surrogates at different stages of fine-tuning, parked on the CPU.
2. ``rounds`` = 4 times over the pool, for each snapshot θ_k: repeat ``pool_interval // advance_steps``
   = 100 times: ``steps`` = 6 PGD steps (r = 11/255, α = r/10) against θ_k on the expectation over
   random transformations T of the instance loss, E_T E_{t,ε} ‖ε_θk(z_t(E(T(x + δ))), t, c) − ε‖²; then
   θ_k ← ``advance_steps`` = 2 DreamBooth steps on the current protected images (the "unroll": the
   perturbation is fitted to surrogates that keep training on it, across the pool's training stages).

The expectation over transformation (EOT) is what makes the noise survive simple purification. Each draw
applies, per image, in this order: horizontal flip (p = 0.5), random crop (side ×U(0.8, 1), resized back),
resize round trip (×U(0.5, 1) down, back up), Gaussian blur (kernel 7, σ ~ U(0.1, 2), always: the
release's ``--transform_gau --gau_kernel_size 7``), JPEG (quality U[50, 90]). Crop, resize and JPEG fire
with ``eot_probability`` = 0.5. Flip, crop, resize and blur are differentiable; JPEG is straight-through
(the forward pass is a real PIL JPEG round trip, the backward pass the identity, i.e. BPDA).

Deliberate differences from the release, besides those all bi-level protections share (``surrogate.py``):
- The release's transformation pool is blur + flip (its defaults ``--transform_gau --transform_hflip``);
  JPEG, resize and crop are added here because the red-teamed purifiers include JPEG and resizing
  (``eot_transforms=["hflip", "blur"]`` is the release's pool).
- Its ``--unroll_steps 1`` flag is parsed but unused; the unroll is ``--advance_steps 2``, here
  ``advance_steps``. Its inner min-max attacker is off in the release (``--attack_pgd_radius 0``) and is
  not implemented. Snapshots are taken after 0, 200, …, 1000 steps (the release: 0, 199, …, 999).
- Like the release, the pool trains on the images being protected (clean at that point), not on the
  references; ``loss_before``/``loss_after`` use the last surrogate and the same EOT, with fixed draws.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field, model_validator

from raypdm.protect.base import ProtectContext, register_protection
from raypdm.protect.diffusion import resize
from raypdm.protect.surrogate import (
    BiLevelProtection,
    IdentityAttack,
    InstanceLoss,
    SurrogateModel,
    SurrogateOptions,
    derive_seed,
    finetune,
    frozen,
    load_class_images,
    load_sd_bundle,
    load_trainable_state,
    trainable_state,
)

__all__ = [
    "EOT_TRANSFORMS",
    "EOTTransform",
    "MetaCloak",
    "MetaCloakOptions",
    "crop_resize",
    "gaussian_blur",
    "hflip",
    "jpeg_straight_through",
    "resize_roundtrip",
]

EOT_TRANSFORMS = ("hflip", "crop", "resize", "blur", "jpeg")
TransformName = Literal["hflip", "crop", "resize", "blur", "jpeg"]
_DRAWS = 10  # uniform numbers drawn per image per transformation, whichever transforms fire


class MetaCloakOptions(SurrogateOptions, frozen=True):
    """MetaCloak's options; defaults from the release's ``gen_and_eval.sh`` / ``methods_config.sh``."""

    model: str = Field("sd21-base", description="registered base model of the surrogates")
    step: float = Field(11 / 2550, gt=0, le=1, description="PGD step α (release: r/10)")
    steps: int = Field(6, ge=0, le=100_000, description="PGD steps per round (--defense_pgd_step_num 6)")
    pool_train_steps: int = Field(1000, ge=0, le=1_000_000, description="length of the pool's trajectory")
    pool_interval: int = Field(200, ge=1, le=1_000_000, description="steps between pool snapshots (--interval)")
    advance_steps: int = Field(2, ge=1, le=100_000, description="surrogate steps between PGD rounds (the unroll)")
    rounds: int = Field(4, ge=1, le=100_000, description="passes over the pool (--total_trail_num 4)")
    eot_samples: int = Field(1, ge=1, le=64, description="transformations per image per PGD step (--defense_sample_num)")
    eot_transforms: tuple[TransformName, ...] = Field(EOT_TRANSFORMS, description="the transformation pool")
    eot_probability: float = Field(0.5, ge=0, le=1, description="chance that crop, resize and JPEG each fire")
    blur_kernel_size: int = Field(7, ge=1, le=63, description="Gaussian kernel (release: --gau_kernel_size 7)")
    blur_sigma: tuple[float, float] = Field((0.1, 2.0), description="σ ~ U(lo, hi) (torchvision's default)")
    crop_scale: tuple[float, float] = Field((0.8, 1.0), description="crop side as a fraction of the image")
    resize_scale: tuple[float, float] = Field((0.5, 1.0), description="intermediate size as a fraction")
    jpeg_quality: tuple[int, int] = Field((50, 90), description="JPEG quality ~ U[lo, hi]")

    @model_validator(mode="after")
    def _consistent(self) -> MetaCloakOptions:
        if self.blur_kernel_size % 2 == 0:
            raise ValueError(f"blur_kernel_size: {self.blur_kernel_size} must be odd")
        if self.pool_interval > max(self.pool_train_steps, 1) and self.pool_train_steps > 0:
            raise ValueError(f"pool_interval ({self.pool_interval}) exceeds pool_train_steps ({self.pool_train_steps})")
        if self.advance_steps > self.pool_interval:
            raise ValueError(f"advance_steps ({self.advance_steps}) exceeds pool_interval ({self.pool_interval})")
        for field, (lo, hi), bounds in (
            ("blur_sigma", self.blur_sigma, (1e-3, 100.0)),
            ("crop_scale", self.crop_scale, (0.05, 1.0)),
            ("resize_scale", self.resize_scale, (0.05, 1.0)),
            ("jpeg_quality", self.jpeg_quality, (1, 100)),
        ):
            if not bounds[0] <= lo <= hi <= bounds[1]:
                raise ValueError(f"{field}: need {bounds[0]} <= lo <= hi <= {bounds[1]}, got ({lo}, {hi})")
        if len(set(self.eot_transforms)) != len(self.eot_transforms):
            raise ValueError(f"eot_transforms: duplicate entries in {list(self.eot_transforms)}")
        return self

    @property
    def pool_size(self) -> int:
        return 1 + self.pool_train_steps // self.pool_interval


# ------------------------------------------------------------------------------------ transformations


def hflip(x: torch.Tensor) -> torch.Tensor:
    return torch.flip(x, dims=(-1,))


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding (torchvision's ``GaussianBlur``). Differentiable."""
    if kernel_size == 1:
        return x
    half = (kernel_size - 1) / 2
    grid = torch.linspace(-half, half, kernel_size, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (grid / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    pad = kernel_size // 2
    mode = "reflect" if pad < min(x.shape[-2:]) else "replicate"
    x = F.pad(x, (pad, pad, pad, pad), mode=mode)
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, kernel_size), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, kernel_size, 1), groups=c)


def crop_resize(x: torch.Tensor, top: int, left: int, height: int, width: int) -> torch.Tensor:
    """Crop the box and resize it back to the input's size (bilinear). Differentiable."""
    size = tuple(x.shape[-2:])
    return resize(x[..., top : top + height, left : left + width], size, mode="bilinear")


def resize_roundtrip(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Down to ``scale`` of the size (antialiased) and back up (bilinear): resize purification. Differentiable."""
    h, w = x.shape[-2:]
    small = (max(1, round(h * scale)), max(1, round(w * scale)))
    return resize(resize(x, small, mode="bilinear"), (h, w), mode="bilinear")


def _jpeg(image: torch.Tensor, quality: int) -> torch.Tensor:
    arr = torch.round(image.detach().clamp(0, 1) * 255.0).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=int(quality))
    out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(out).permute(2, 0, 1).to(image.device, image.dtype)


def jpeg_straight_through(x: torch.Tensor, quality: int | Sequence[int]) -> torch.Tensor:
    """JPEG round trip (PIL, 4:2:0 as PIL saves by default) in the forward pass, identity in the backward
    pass (straight-through / BPDA): the codec is not differentiable, its effect is near-identity."""
    qualities = [int(quality)] * len(x) if isinstance(quality, int) else [int(q) for q in quality]
    if len(qualities) != len(x):
        raise ValueError(f"jpeg_straight_through: {len(qualities)} qualities for {len(x)} images")
    coded = torch.stack([_jpeg(im, q) for im, q in zip(x, qualities, strict=True)])
    return x + (coded - x).detach()


class EOTTransform:
    """A random transformation per image, drawn from the image's generator (``_DRAWS`` numbers per call,
    whichever transforms fire, so an image's stream does not depend on the others or on the options)."""

    def __init__(self, opts: MetaCloakOptions):
        self.opts = opts
        self.enabled = set(opts.eot_transforms)

    def __call__(self, x: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        if len(generators) != len(x):
            raise ValueError(f"EOTTransform: {len(generators)} generators for {len(x)} images")
        return torch.cat([self.one(x[i : i + 1], torch.rand(_DRAWS, generator=g)) for i, g in enumerate(generators)])

    def one(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        o, on = self.opts, self.enabled
        u = [float(v) for v in u]
        h, w = x.shape[-2:]
        if "hflip" in on and u[0] < 0.5:
            x = hflip(x)
        if "crop" in on and u[1] < o.eot_probability:
            s = o.crop_scale[0] + u[2] * (o.crop_scale[1] - o.crop_scale[0])
            ch, cw = max(1, round(h * s)), max(1, round(w * s))
            top, left = int(u[3] * (h - ch + 1)), int(u[4] * (w - cw + 1))
            x = crop_resize(x, min(top, h - ch), min(left, w - cw), ch, cw)
        if "resize" in on and u[5] < o.eot_probability:
            x = resize_roundtrip(x, o.resize_scale[0] + u[6] * (o.resize_scale[1] - o.resize_scale[0]))
        if "blur" in on:
            x = gaussian_blur(x, o.blur_kernel_size, o.blur_sigma[0] + u[7] * (o.blur_sigma[1] - o.blur_sigma[0]))
        if "jpeg" in on and u[8] < o.eot_probability:
            lo, hi = o.jpeg_quality
            x = jpeg_straight_through(x, min(hi, lo + int(u[9] * (hi - lo + 1))))
        return x


# ------------------------------------------------------------------------------------------ the method


@register_protection("metacloak", MetaCloakOptions)
class MetaCloak(BiLevelProtection):
    name = "metacloak"
    options: MetaCloakOptions

    def __init__(self, options: MetaCloakOptions | None = None, context: ProtectContext | None = None):
        super().__init__(options or MetaCloakOptions(), context)
        self.weight_models = (self.options.model,)
        ctx = self.context
        self.model = SurrogateModel(
            f"{self.options.model}:{ctx.preset}:{ctx.weights_dir}", lambda d: load_sd_bundle(self.options.model, ctx, d)
        )
        self.eot = EOTTransform(self.options) if self.options.eot_transforms else None

    def objective(self, parts) -> InstanceLoss:
        return InstanceLoss(parts, self.options, transform=self.eot, transform_samples=self.options.eot_samples)

    def build_pool(self, parts, images: Sequence[np.ndarray], class_pool, seed: int) -> list[dict]:
        """Snapshots (CPU) of one DreamBooth trajectory on ``images``: the start and every ``pool_interval``
        steps. One trainer for the whole trajectory, as the release (one AdamW over 1000 steps)."""
        o = self.options
        pool = [trainable_state(parts)]

        def snapshot(step: int, _losses) -> None:
            if (step + 1) % o.pool_interval == 0:
                pool.append(trainable_state(parts))

        finetune(parts, images, class_pool, o, steps=o.pool_train_steps, seed=derive_seed(seed, "pool"), on_step=snapshot)
        return pool

    def attack(self, images: Sequence[np.ndarray], clean_reference: Sequence[np.ndarray], identity: str) -> IdentityAttack:
        o = self.options
        seed = self.seed_for(identity)
        class_pool = load_class_images(self.model, o, self.device)
        parts = self.model.instantiate(self.device)
        # The release trains its pool on the images it protects (still clean here), not on references.
        pool = self.build_pool(parts, images, class_pool, seed)
        image_set = self.image_set(images, identity)
        for r in range(o.rounds):
            for k, state in enumerate(pool):
                load_trainable_state(parts, state)
                for j in range(o.pool_interval // o.advance_steps):
                    with frozen(parts):
                        image_set.set_adv(image_set.pgd(self.objective(parts), o, o.steps, o.timesteps_per_step))
                    finetune(
                        parts, image_set.uint8(), class_pool, o,
                        steps=o.advance_steps, seed=derive_seed(seed, "advance", r, k, j),
                    )  # fmt: skip
        del pool
        self.release(self.device)
        last = self.objective(parts)
        return self.finish(image_set, self.scorer(image_set, [lambda: nullcontext(last)]))
