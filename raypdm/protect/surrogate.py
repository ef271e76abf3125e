"""Surrogate Stable Diffusion models for the per-identity (bi-level) protections: FSMG, ASPL, E-ASPL, MetaCloak.

Anti-DreamBooth (Van Le et al., ICCV 2023, github.com/VinAIResearch/Anti-DreamBooth) and MetaCloak (Liu et
al., CVPR 2024, github.com/liuyixin-louis/MetaCloak) protect one identity's photos by ascending the
DreamBooth *instance* loss of a surrogate that is itself DreamBooth-fine-tuned on that identity:

    max_{‖δ‖∞ ≤ r}  E_{t, ε} ‖ε_θ*(z_t(E(x + δ)), t, τ("a photo of sks person")) − y‖²,
    θ* = DreamBooth(θ_base; some images of the identity)

This module holds what the four methods share:

- :class:`SurrogateOptions`: the options every bi-level method has (training, prompts, class priors,
  Monte-Carlo draws), defaults from the Anti-DreamBooth release scripts (``scripts/attack_with_aspl.sh``:
  lr 5e-7, batch 1 + 1 prior image, prior weight 1, "a photo of sks person" / "a photo of person",
  200 class images, text encoder trained).
- :class:`SurrogateModel`: a base model kept pristine on the CPU and copied onto the device per identity
  (fine-tuning changes weights in place; the next identity must start from the base again).
- :func:`finetune`: a short DreamBooth fine-tune — the project's :class:`DreamBoothTrainer`, not a second
  training loop. Like the release's ``train_one_epoch``, every call starts a fresh AdamW.
- :class:`InstanceLoss`: the attack objective, the per-image instance term of Eq. 2 under the surrogate,
  Monte-Carlo over (t, ε) with per-image generators (an image's draws do not depend on its batch).
- :class:`IdentityImages`: an identity's images as same-size device chunks with their PGD state.
- :class:`BiLevelProtection`: the shared ``IdentityProtection`` plumbing (seeds, class priors, scoring).

Deliberate differences from the release scripts (each documented where it acts):

- Budgets are in [0, 1] pixel units with the project default r = 11/255, α = 1/255 (paper Eq. 4); the
  Anti-DreamBooth scripts pass ``--pgd_eps 5e-2 --pgd_alpha 5e-3`` in [−1, 1] units (≈ 6.4/255 and
  0.64/255): ``radius="0.025" step="0.0025"`` reproduces them.
- Images go to the surrogate the way the trainer feeds them (shorter side resized to ``resolution``,
  centre crop; bicubic, antialiased), and the perturbation lives at the image's own size.
- The surrogate trains on the uint8 protected images (what is published); the scripts trained on the
  float tensors before the final 8-bit rounding. Mixed precision is bf16 autocast over fp32 weights
  (the trainer's), where the scripts cast whole models to bf16.
- Class-prior images: read from ``class_images`` (a folder, e.g. the shared cache ``raypdm train``
  writes) or generated once per process from the base model (PNDM, 50 steps, guidance 7.5, as
  diffusers' DreamBooth script). Each fine-tune draws the class images it needs without replacement
  from that pool (the scripts cycled through the folder from index 0 on every call).
- ``loss_before`` / ``loss_after`` are the instance loss of the clean and the protected (uint8) images
  under the final surrogate with ``eval_timesteps`` fixed (t, ε) draws per image; the scripts logged
  the stochastic per-step loss only.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager as ContextManager
from contextlib import contextmanager, nullcontext
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from raypdm.protect.base import IdentityProtection, ProtectContext, ProtectOptions, ProtectResult, image_seed
from raypdm.protect.diffusion import encode_pixels, mc_denoising_loss, prompt_embeddings, resize
from raypdm.protect.pgd import generators_for, pgd_linf, quantise, to_tensor, to_uint8
from raypdm.train.dreambooth import DreamBoothTrainer, StepLosses, TrainConfig
from raypdm.train.prompts import CDLPrompts

log = logging.getLogger(__name__)

__all__ = [
    "BiLevelProtection",
    "IdentityAttack",
    "IdentityImages",
    "InstanceLoss",
    "SurrogateModel",
    "SurrogateOptions",
    "derive_seed",
    "finetune",
    "frozen",
    "identity_seed",
    "load_class_images",
    "model_input",
]

Transform = Callable[[torch.Tensor, Sequence[torch.Generator]], torch.Tensor]
_SEED_MASK = (1 << 63) - 1
_TRAIN_SEED_BITS = 31  # TrainConfig seeds are multiplied by ~1e6 inside the trainer: keep them small
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# --------------------------------------------------------------------------------------------- options


class SurrogateOptions(ProtectOptions, frozen=True):
    """Options every bi-level protection shares; defaults are the Anti-DreamBooth release's."""

    resolution: int = Field(512, ge=8, le=2048, description="surrogate training/attack size (a multiple of 8)")
    lr: float = Field(5e-7, gt=0, le=1, description="surrogate AdamW learning rate (release scripts: 5e-7)")
    train_batch_size: int = Field(1, ge=1, le=64, description="instance (and as many class) images per step")
    prior_weight: float = Field(1.0, ge=0, description="λ of the prior-preservation term")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping of surrogate training")
    train_text_encoder: bool = Field(True, description="fine-tune the text encoder too (release: on)")
    gradient_checkpointing: bool = Field(True, description="recompute UNet activations in backward passes")
    mixed_precision: Literal["auto", "no", "bf16"] = Field("auto", description="auto: bf16 on CUDA, no on CPU")
    identifier: str = Field("sks", description="the rare token of the instance prompt")
    class_noun: str = Field("person")
    instance_template: str = Field("a photo of {identifier} {class_noun}", description="release: 'a photo of sks person'")
    class_template: str = Field("a photo of {class_noun}", description="release: 'a photo of person'")
    num_class_images: int = Field(200, ge=1, le=100_000, description="class-prior pool size (release: 200)")
    class_images: str | None = Field(None, description="folder (fsspec URI) of class-prior images; None: generate")
    class_prior_steps: int = Field(50, ge=1, le=1000, description="sampling steps when generating class images")
    class_prior_guidance: float = Field(7.5, ge=0, description="guidance scale when generating class images")
    timesteps_per_step: int = Field(1, ge=1, le=64, description="(t, ε) draws per image per PGD step (release: 1)")
    eval_timesteps: int = Field(8, ge=1, le=256, description="fixed (t, ε) draws per image for loss_before/after")
    latent_sample: bool = Field(True, description="VAE posterior sample in the attack (release) instead of its mean")

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"resolution: {value} is not a multiple of 8 (the VAE downsamples by 8)")
        return value

    @model_validator(mode="after")
    def _valid_prompts(self) -> SurrogateOptions:
        self.prompts()  # CDLPrompts names the offending template field
        return self

    def prompts(self) -> CDLPrompts:
        """Vanilla DreamBooth prompts (no CDL suffix): what a protection anticipates the attacker trains."""
        return CDLPrompts(
            identifier=self.identifier,
            class_noun=self.class_noun,
            instance_template=self.instance_template,
            class_template=self.class_template,
            cdl=False,
        )

    def train_config(self, steps: int, seed: int) -> TrainConfig:
        return TrainConfig(
            steps=steps,
            lr=self.lr,
            instance_batch_size=self.train_batch_size,
            class_batch_size=self.train_batch_size,
            prior_weight=self.prior_weight,
            train_text_encoder=self.train_text_encoder,
            gradient_checkpointing=self.gradient_checkpointing,
            mixed_precision=self.mixed_precision,
            optimizer="adamw",  # the release's torch AdamW; 8-bit moments would change the surrogate
            max_grad_norm=self.max_grad_norm,
            seed=seed,
            resolution=self.resolution,
        )


# ------------------------------------------------------------------------------------------- seeds


def identity_seed(identity: str, seed: int) -> int:
    """A 63-bit seed from the run's seed and the identity's name: an identity gets the same streams in
    any actor, order or run, and two identities never share them."""
    digest = hashlib.sha256(f"raypdm.protect.identity/{int(seed)}/{identity}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & _SEED_MASK


def derive_seed(base: int, *labels: Any, bits: int = 63) -> int:
    """A seed for one phase of an attack (``derive_seed(s, "surrogate", i)``), ``bits`` wide."""
    text = "/".join(str(label) for label in (base, *labels))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << bits) - 1)


# ---------------------------------------------------------------------------------------- surrogates


def _trainable(parts) -> list[torch.nn.Module]:
    return [parts.unet, parts.text_encoder]


@contextmanager
def frozen(parts) -> Iterator[None]:
    """Surrogate weights without gradients while the attack differentiates w.r.t. the pixels only
    (saves the weight-gradient work and memory); the previous flags come back afterwards."""
    saved = [(p, p.requires_grad) for m in _trainable(parts) for p in m.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def clone_parts(parts, device: torch.device | str | None = None):
    """A copy of a Stable Diffusion bundle whose modules can be trained and moved independently (the
    tokenizer and scheduler hold no weights and are shared)."""
    modules = {name: copy.deepcopy(getattr(parts, name)) for name in ("unet", "text_encoder", "vae")}
    if device is not None:
        # Module by module: the bundle's `to(device, dtype=None)` makes diffusers warn about dtypes.
        modules = {name: m.to(device) for name, m in modules.items()}
    return dataclasses.replace(parts, **modules)


def trainable_state(parts) -> dict[str, dict[str, torch.Tensor]]:
    """UNet and text-encoder weights as CPU copies (a parked surrogate, a MetaCloak pool member)."""
    return {
        name: {k: v.detach().to("cpu", copy=True) for k, v in getattr(parts, name).state_dict().items()}
        for name in ("unet", "text_encoder")
    }


def load_trainable_state(parts, state: dict[str, dict[str, torch.Tensor]]) -> None:
    parts.unet.load_state_dict(state["unet"])
    parts.text_encoder.load_state_dict(state["text_encoder"])


class SurrogateModel:
    """A base Stable Diffusion bundle kept pristine on the CPU; :meth:`instantiate` copies it to a device.

    ``loader(device)`` returns the bundle (``raypdm.models.load``/``build`` or a folder loader); it runs once.
    ``key`` names the weights (for caches of what is generated from them, never for outputs' identity).
    """

    def __init__(self, key: str, loader: Callable[[torch.device], Any]):
        self.key = key
        self.base = loader(torch.device("cpu"))
        missing = [n for n in ("unet", "text_encoder", "vae", "tokenizer", "scheduler") if not hasattr(self.base, n)]
        if missing or self.base.unet.config.in_channels != self.base.vae.config.latent_channels:
            raise ValueError(f"surrogate {key.split(':')[0]!r} is not a text-to-image Stable Diffusion model")
        for module in (self.base.unet, self.base.text_encoder, self.base.vae):
            module.requires_grad_(False).eval()

    def instantiate(self, device: torch.device):
        """A trainable copy on ``device`` (gradients on, as ``from_pretrained`` gives them)."""
        parts = clone_parts(self.base, device)
        for module in _trainable(parts):
            module.requires_grad_(True)
        return parts


def load_sd_bundle(model: str, context: ProtectContext, device: torch.device):
    """A registered SD bundle from the context, a private copy (``fresh``): surrogates are trained, so they
    never share the context's cached, frozen models."""
    return context.model(model, device=device, fresh=True)


# ---------------------------------------------------------------------------------- class priors


def _decode_folder(uri: str, count: int) -> list[np.ndarray]:
    from raypdm.data.decode import decode_image
    from raypdm.data.uri import fs_and_path, read_bytes, to_uri

    fs, path = fs_and_path(uri)
    if not fs.isdir(path):
        raise FileNotFoundError(f"class_images: {uri} is not a folder")
    files = sorted(p for p in fs.ls(path, detail=False) if p.lower().endswith(_IMAGE_SUFFIXES))
    if len(files) < count:
        raise ValueError(f"class_images: {uri} holds {len(files)} images, num_class_images asks for {count}")
    return [decode_image(read_bytes(to_uri(fs, p))) for p in files[:count]]


_PRIOR_CACHE: OrderedDict[tuple, list[np.ndarray]] = OrderedDict()
_PRIOR_LOCK = threading.Lock()
_PRIOR_CACHE_SIZE = 4


@torch.no_grad()
def _generate_priors(parts, opts: SurrogateOptions, seed: int) -> list[np.ndarray]:
    """Class images from the base model, one CPU generator per image (``prior_seed``, as the shared
    class-prior cache of ``raypdm.train.priors`` seeds them): image i is the same in any batch."""
    from raypdm.sample.decoupled import SCHEDULERS
    from raypdm.train.priors import prior_seed

    pipe = parts.to_pipeline()
    pipe.scheduler = SCHEDULERS["pndm"].from_config(parts.scheduler.config, skip_prk_steps=True)
    pipe.set_progress_bar_config(disable=True)
    prompt = opts.prompts().prior_generation_prompt()
    out: list[np.ndarray] = []
    for start in range(0, opts.num_class_images, opts.batch_size):
        idx = range(start, min(start + opts.batch_size, opts.num_class_images))
        images = pipe(
            prompt=[prompt] * len(idx),
            guidance_scale=opts.class_prior_guidance,
            num_inference_steps=opts.class_prior_steps,
            height=opts.resolution,
            width=opts.resolution,
            generator=[torch.Generator().manual_seed(prior_seed(seed, i)) for i in idx],
            output_type="np",
        ).images
        out += [np.clip(np.rint(np.asarray(im) * 255.0), 0, 255).astype(np.uint8) for im in images]
    return out


def load_class_images(model: SurrogateModel, opts: SurrogateOptions, device: torch.device) -> list[np.ndarray]:
    """The class-prior pool: ``opts.class_images`` if set, else generated from ``model`` once per process
    (every identity an actor protects shares it). Depends on the options and weights, never on an identity."""
    if opts.class_images:
        return _decode_folder(opts.class_images, opts.num_class_images)
    key = (
        model.key,
        opts.prompts().prior_generation_prompt(),
        opts.num_class_images,
        opts.class_prior_steps,
        opts.class_prior_guidance,
        opts.resolution,
        opts.seed,
    )
    with _PRIOR_LOCK:
        if key in _PRIOR_CACHE:
            _PRIOR_CACHE.move_to_end(key)
            return _PRIOR_CACHE[key]
    log.info("generating %d class-prior images with %s", opts.num_class_images, model.key)
    parts = clone_parts(model.base, device)
    try:
        images = _generate_priors(parts, opts, opts.seed)
    finally:
        del parts
        _empty_cache(device)
    with _PRIOR_LOCK:
        _PRIOR_CACHE[key] = images
        while len(_PRIOR_CACHE) > _PRIOR_CACHE_SIZE:
            _PRIOR_CACHE.popitem(last=False)
    return images


def _empty_cache(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ training


def finetune(
    parts,
    instance_images: Sequence[np.ndarray],
    class_pool: Sequence[np.ndarray],
    opts: SurrogateOptions,
    *,
    steps: int,
    seed: int,
    on_step: Callable[[int, StepLosses], None] | None = None,
) -> list[StepLosses]:
    """``steps`` DreamBooth steps on ``parts`` in place (the project's trainer, a fresh AdamW per call as
    the release's ``train_one_epoch``). The class images come from ``class_pool`` without replacement:
    only as many as the steps use are encoded, so short alternating fine-tunes cost no VAE passes over
    the whole pool. ``on_step(step, losses)`` runs after every step (MetaCloak snapshots its pool there)."""
    if steps <= 0:
        return []
    seed = seed & ((1 << _TRAIN_SEED_BITS) - 1)
    need = steps * opts.train_batch_size
    if need < len(class_pool):
        pick = np.random.default_rng(seed).choice(len(class_pool), size=need, replace=False)
        classes = [class_pool[int(i)] for i in np.sort(pick)]
    else:
        classes = list(class_pool)
    trainer = DreamBoothTrainer(parts, opts.train_config(steps, seed), opts.prompts())
    return trainer.fit(list(instance_images), classes, on_step=on_step)


# ------------------------------------------------------------------------------------------ the objective


def model_input(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 3, size, size): shorter side resized to ``size`` (bicubic,
    antialiased when shrinking, like the trainer's PIL resize), then the centre crop. Differentiable."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    scale = size / min(h, w)
    rh, rw = max(size, round(h * scale)), max(size, round(w * scale))
    x = resize(x, (rh, rw), mode="bicubic").clamp(0.0, 1.0)
    top, left = (rh - size) // 2, (rw - size) // 2
    return x[..., top : top + size, left : left + size]


class InstanceLoss:
    """The DreamBooth instance loss of x (B, 3, H, W) in [0, 1] under a surrogate, per image:
    E_{t, ε} ‖ε_θ(z_t(E(T(x'))), t, τ(c_inst)) − y‖², x' = x resized as the trainer feeds it, T an optional
    random transformation (MetaCloak's expectation over transformation, ``transform_samples`` draws of T
    per call, each with its own (t, ε) draws).

    Image i draws its transformations, VAE samples, timesteps and noise from generator i.
    """

    def __init__(
        self, parts, opts: SurrogateOptions, transform: Transform | None = None, transform_samples: int = 1
    ):
        if transform_samples < 1:
            raise ValueError(f"transform_samples must be >= 1, got {transform_samples}")
        self.parts = parts
        self.opts = opts
        self.transform = transform
        self.transform_samples = transform_samples if transform is not None else 1
        self.hidden = prompt_embeddings(parts, opts.prompts().instance_prompt())
        self.device = next(parts.unet.parameters()).device
        self.n_train = int(parts.scheduler.config.num_train_timesteps)
        precision = opts.train_config(1, 0).resolved_mixed_precision(self.device)
        self.bf16 = precision == "bf16"

    def _autocast(self):
        if self.bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def __call__(self, x: torch.Tensor, generators: Sequence[torch.Generator], samples: int) -> torch.Tensor:
        x = model_input(x, self.opts.resolution)
        total = torch.zeros(len(x), device=x.device)
        for _ in range(self.transform_samples):
            xt = self.transform(x, generators) if self.transform is not None else x
            with self._autocast():
                z = encode_pixels(self.parts.vae, xt, sample=self.opts.latent_sample, generators=generators)
                loss = mc_denoising_loss(self.parts, z, self.hidden, generators, samples, (0, self.n_train))
            total = total + loss.float()
        return total / self.transform_samples


# ------------------------------------------------------------------------------------------ the images


class IdentityImages:
    """One identity's images as device chunks of equal size (≤ ``batch_size`` each) with PGD state.

    Per-image seeds (``image_seed(image, identity seed)``) drive three separate streams: the random
    start, the ascent's Monte-Carlo draws (advancing over the whole attack) and the fixed evaluation draws.
    """

    START_STREAM, ASCENT_STREAM, EVAL_STREAM = 1, 2, 3

    def __init__(
        self, images: Sequence[np.ndarray], device: torch.device, *, batch_size: int, seed: int, radius: float
    ):
        from raypdm.purify.base import group_indices_by_size

        self.images = list(images)
        self.device = device
        self.radius = radius
        self.seeds = [image_seed(im, seed) for im in self.images]
        self.chunks: list[list[int]] = []
        for idx in group_indices_by_size(self.images).values():
            self.chunks += [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
        self.clean = [to_tensor([self.images[i] for i in c], device) for c in self.chunks]
        self.adv: list[torch.Tensor | None] = [None] * len(self.chunks)
        self.ascent_generators = [generators_for([self.seeds[i] for i in c], self.ASCENT_STREAM) for c in self.chunks]

    def current(self, k: int) -> torch.Tensor:
        """Chunk k's perturbed images (float, possibly between grid points after E-ASPL's averaging)."""
        adv = self.adv[k]
        return self.clean[k] if adv is None else adv

    def pgd(self, objective: InstanceLoss, opts: ProtectOptions, steps: int, samples: int) -> list[torch.Tensor]:
        """``steps`` PGD steps on every chunk from its current point; returns the new points (the state
        is left to the caller, so E-ASPL can average members' points before storing them)."""
        out = []
        for k, x in enumerate(self.clean):
            gens = self.ascent_generators[k]
            first = self.adv[k] is None
            res = pgd_linf(
                x,
                lambda x_adv, gens=gens: objective(x_adv, gens, samples),
                radius=opts.radius,
                step=opts.step,
                steps=steps,
                random_start=opts.random_start and first,
                generator=generators_for([self.seeds[i] for i in self.chunks[k]], self.START_STREAM),
                x_init=None if first else self.adv[k],
                # The bi-level methods score once, at the end, under the final surrogate: skip pgd_linf's
                # before/after evaluations of every round (two extra forward passes each).
                eval_objective=_no_score,
            )
            out.append(res.x_adv)
        return out

    def set_adv(self, points: Sequence[torch.Tensor]) -> None:
        self.adv = [p.detach() for p in points]

    def protected_tensors(self) -> list[torch.Tensor]:
        """Every chunk on the 1/255 grid within the budget (a no-op for pgd_linf's own outputs)."""
        return [quantise(self.current(k), self.clean[k], self.radius) for k in range(len(self.chunks))]

    def uint8(self, tensors: Sequence[torch.Tensor] | None = None) -> list[np.ndarray]:
        """Chunk tensors (default: the current points) as uint8 images in the input order."""
        tensors = list(tensors) if tensors is not None else [self.current(k) for k in range(len(self.chunks))]
        out: list[np.ndarray | None] = [None] * len(self.images)
        for chunk, t in zip(self.chunks, tensors, strict=True):
            for i, arr in zip(chunk, to_uint8(t), strict=True):
                out[i] = arr
        return [a for a in out if a is not None]


def _no_score(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros(len(x), device=x.device)


# ------------------------------------------------------------------------------------------ protections


@dataclasses.dataclass
class IdentityAttack:
    """What one identity's attack produced: the results, and ``score(candidates)``, the evaluation
    objective (``loss_after``'s) at any images of the identity's shapes under the final surrogate(s),
    e.g. to compare the protection with random noise of the same budget."""

    results: list[ProtectResult]
    score: Callable[[Sequence[np.ndarray]], list[float]]


class BiLevelProtection(IdentityProtection):
    """Shared plumbing of FSMG, ASPL, E-ASPL and MetaCloak. Subclasses implement :meth:`attack`.

    Everything an identity's result depends on is its images, its clean references, its name, the
    options and the weights: no state survives from one identity to the next (surrogates are fresh copies
    of the base; the only cache, the class-prior pool, depends on the options and weights alone).
    """

    uses_gpu = True
    options: SurrogateOptions

    def __init__(self, options: SurrogateOptions, context: ProtectContext | None):
        from raypdm.runtime import default_device

        self.options = options
        self.context = context or ProtectContext()
        self.device = torch.device(default_device(self.context.device))

    # -- the interface

    def protect_identity(
        self, images: list[np.ndarray], clean_reference: list[np.ndarray], identity: str
    ) -> list[ProtectResult]:
        return self.attack(images, clean_reference, identity).results

    @abc.abstractmethod
    def attack(self, images: Sequence[np.ndarray], clean_reference: Sequence[np.ndarray], identity: str) -> IdentityAttack:
        """Protect one identity's images; also returns the scorer of the final surrogate(s)."""

    # -- helpers for subclasses

    def seed_for(self, identity: str) -> int:
        return identity_seed(identity, self.options.seed)

    def image_set(self, images: Sequence[np.ndarray], identity: str) -> IdentityImages:
        o = self.options
        return IdentityImages(images, self.device, batch_size=o.batch_size, seed=self.seed_for(identity), radius=o.radius)

    def surrogate_data(self, images: Sequence[np.ndarray], clean_reference: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The clean photos a surrogate learns the identity from: the references (set_B), or, when an
        identity has none, the clean originals of the images being protected."""
        return list(clean_reference) if len(clean_reference) else list(images)

    def scorer(self, image_set: IdentityImages, surrogates: Sequence[Callable[[], ContextManager[InstanceLoss]]]):
        """``score(candidates)``: the mean over the final surrogates of the fixed-draw instance loss, per
        image. Each entry of ``surrogates`` opens one objective (e.g. moving a parked E-ASPL member onto
        the device for the duration and back afterwards)."""
        o = self.options

        def score(candidates: Sequence[np.ndarray]) -> list[float]:
            candidates = list(candidates)
            if len(candidates) != len(image_set.images):
                raise ValueError(f"score: {len(candidates)} candidates for {len(image_set.images)} images")
            for i, (cand, image) in enumerate(zip(candidates, image_set.images, strict=True)):
                if cand.shape != image.shape:
                    raise ValueError(f"score: candidate {i} has shape {cand.shape}, image {image.shape}")
            total = np.zeros(len(candidates))
            for open_objective in surrogates:
                with open_objective() as objective, frozen(objective.parts), torch.no_grad():
                    for chunk in image_set.chunks:
                        x = to_tensor([candidates[i] for i in chunk], self.device)
                        gens = generators_for([image_set.seeds[i] for i in chunk], IdentityImages.EVAL_STREAM)
                        total[chunk] += objective(x, gens, o.eval_timesteps).cpu().numpy()
            return [float(v) for v in total / max(1, len(surrogates))]

        return score

    def finish(self, image_set: IdentityImages, score) -> IdentityAttack:
        """Quantise, score the clean and the protected images under the final surrogate(s)."""
        protected = image_set.uint8(image_set.protected_tensors())
        before = score(image_set.images)
        after = score(protected)
        results = [
            ProtectResult(image=im, loss_before=b, loss_after=a) for im, b, a in zip(protected, before, after, strict=True)
        ]
        return IdentityAttack(results=results, score=score)

    @staticmethod
    def release(device: torch.device) -> None:
        _empty_cache(device)
