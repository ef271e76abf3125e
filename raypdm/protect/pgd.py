"""ℓ∞-bounded projected gradient ascent (paper Eq. 4) and the pixel plumbing every protection shares.

    δ_{k+1} = Π_{‖δ‖∞ ≤ r, x+δ ∈ [0,1]} ( δ_k + α · sign ∇_δ L(x + δ_k) ),   k = 0 … K−1

as in Anti-DreamBooth's ``pgd_attack`` and AdvDM/Mist (sign-gradient steps, projection onto the ball
and the valid pixel range after every step). Differences from those scripts, on purpose:

- The result is **quantised** (:func:`quantise`) onto the 1/255 grid with at most
  ``floor(255·r)`` levels of change per pixel, and ``loss_after`` is measured there. The scripts
  projected in float and then saved an 8-bit PNG, whose rounding could exceed the budget by half a
  level; here the saved file itself satisfies ‖δ‖∞ ≤ r.
- ``generator`` may be one generator per sample, so a batch's random start does not depend on which
  other images share the batch (the protections seed each image from its own bytes).
- ``eval_objective`` (optional) scores the clean and the final point, for objectives whose ascent
  steps are stochastic (Monte-Carlo over timesteps) and whose before/after comparison should not be.

The objective returns one loss per sample; its gradient is taken of the sum, so samples must not
interact (no batch statistics) — true of every model used here (eval mode, group norm).
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from raypdm.protect.base import ImageProtection, ProtectOptions, ProtectResult, image_seed

__all__ = [
    "PGDImageProtection",
    "PGDResult",
    "crop_to",
    "generators_for",
    "pad_to_multiple",
    "perturbation_norms",
    "pgd_linf",
    "protect_in_batches",
    "quantise",
    "to_tensor",
    "to_uint8",
]

Objective = Callable[[torch.Tensor], torch.Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None


@dataclasses.dataclass
class PGDResult:
    x_adv: torch.Tensor  # (B, 3, H, W) on the 1/255 grid, within the budget of quantise()
    loss_before: torch.Tensor  # (B,) objective at the clean x
    loss_after: torch.Tensor  # (B,) objective at the returned (quantised) x_adv


# ---------------------------------------------------------------------------------------- the budget


def budget_levels(radius: float) -> int:
    """The largest whole number of 8-bit levels within the radius (the epsilon absorbs 11/255·255 =
    10.999…)."""
    return math.floor(255.0 * radius + 1e-6)


def project(x_adv: torch.Tensor, x: torch.Tensor, radius: float) -> torch.Tensor:
    """Onto the ℓ∞ ball of ``radius`` around ``x``, then onto [0, 1] (both convex; the box of the
    ball clipped to [0, 1] is their intersection, so clamping in this order is the exact projection)."""
    return torch.clamp(torch.minimum(torch.maximum(x_adv, x - radius), x + radius), 0.0, 1.0)


def quantise(x_adv: torch.Tensor, x: torch.Tensor, radius: float) -> torch.Tensor:
    """``x_adv`` onto the 1/255 grid with |round(255·x_adv) − round(255·x)| ≤ floor(255·r + 1e-6)
    levels, in [0, 1]: the uint8 PNG written from it satisfies the ℓ∞ bound exactly."""
    levels = budget_levels(radius)
    q = torch.round(x_adv.detach() * 255.0)
    q0 = torch.round(x.detach() * 255.0)
    q = torch.minimum(torch.maximum(q, q0 - levels), q0 + levels).clamp(0.0, 255.0)
    return q / 255.0


# ------------------------------------------------------------------------------------------ the attack


def _per_sample_generators(generator: Generators, batch: int) -> list[torch.Generator | None]:
    if generator is None or isinstance(generator, torch.Generator):
        return [generator]
    gens = list(generator)
    if len(gens) != batch:
        raise ValueError(f"pgd_linf: {len(gens)} generators for a batch of {batch}")
    return gens


def _uniform_start(x: torch.Tensor, radius: float, generator: Generators) -> torch.Tensor:
    """δ ~ U[−r, r] per pixel, drawn on the CPU (same numbers on every device) from the generator(s)."""
    gens = _per_sample_generators(generator, len(x))
    if len(gens) == 1:
        noise = torch.rand(x.shape, generator=gens[0], dtype=torch.float32)
    else:
        noise = torch.stack([torch.rand(x.shape[1:], generator=g, dtype=torch.float32) for g in gens])
    return (noise.to(x.device, x.dtype) * 2.0 - 1.0) * radius


def _evaluate(objective: Objective, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        loss = objective(x)
    if loss.shape != (len(x),):
        raise ValueError(f"objective must return one loss per sample, shape ({len(x)},); got {tuple(loss.shape)}")
    return loss.detach().float()


def pgd_linf(
    x: torch.Tensor,
    objective: Objective,
    *,
    radius: float,
    step: float,
    steps: int,
    random_start: bool = False,
    generator: Generators = None,
    x_init: torch.Tensor | None = None,
    eval_objective: Objective | None = None,
) -> PGDResult:
    """Maximise ``objective`` over the ℓ∞ ball of ``radius`` around ``x`` by sign-gradient ascent.

    x: (B, 3, H, W) float in [0, 1], the clean images. objective(x_adv) -> (B,) losses to maximise.
    ``x_init`` continues from a previous perturbed point (bi-level methods alternate with training);
    it is projected first, and ``random_start`` then adds noise around it. ``generator`` (one, or one per
    sample) drives the random start. The returned ``x_adv`` is quantised (:func:`quantise`) and
    ``loss_after`` is ``eval_objective`` (default ``objective``) at that quantised point.
    """
    if x.ndim != 4:
        raise ValueError(f"pgd_linf: x must be (B, C, H, W), got {tuple(x.shape)}")
    if radius < 0 or step < 0 or steps < 0:
        raise ValueError(f"pgd_linf: radius, step and steps must be >= 0, got {radius}, {step}, {steps}")
    x = x.detach()
    score = eval_objective or objective
    loss_before = _evaluate(score, x)

    x_adv = x.clone() if x_init is None else project(x_init.detach().to(x.device, x.dtype), x, radius)
    if random_start:
        x_adv = project(x_adv + _uniform_start(x, radius, generator), x, radius)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = objective(x_adv)
        if loss.shape != (len(x),):
            raise ValueError(f"objective must return one loss per sample, shape ({len(x)},); got {tuple(loss.shape)}")
        if not loss.requires_grad:
            raise RuntimeError(
                "pgd_linf: the objective does not depend on x_adv (no gradient); was it run under no_grad?"
            )
        (grad,) = torch.autograd.grad(loss.sum(), x_adv)
        with torch.no_grad():
            x_adv = project(x_adv + step * grad.sign(), x, radius)
    x_adv = quantise(x_adv, x, radius)
    return PGDResult(x_adv=x_adv, loss_before=loss_before, loss_after=_evaluate(score, x_adv))


# ------------------------------------------------------------------------------------------ pixels


def to_tensor(images: list[np.ndarray], device: str | torch.device) -> torch.Tensor:
    """uint8 HxWx3 arrays of one size -> (B, 3, H, W) float32 in [0, 1] on ``device``."""
    if not images:
        raise ValueError("to_tensor: no images")
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise ValueError(f"to_tensor: images of different shapes {sorted(shapes)} cannot share a batch")
    batch = torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images]))
    return batch.to(device).permute(0, 3, 1, 2).float() / 255.0


def to_uint8(x: torch.Tensor) -> list[np.ndarray]:
    """(B, 3, H, W) in [0, 1] -> uint8 HxWx3 arrays (rounded, not truncated)."""
    arr = torch.round(x.detach().clamp(0, 1) * 255.0).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [np.ascontiguousarray(a) for a in arr]


def perturbation_norms(protected: np.ndarray, clean: np.ndarray) -> tuple[float, float]:
    """(ℓ∞, ℓ2) of ``protected − clean`` in [0, 1] pixel units, measured on the uint8 arrays."""
    if protected.shape != clean.shape:
        raise ValueError(f"perturbation_norms: shapes differ, {protected.shape} vs {clean.shape}")
    delta = protected.astype(np.int32) - clean.astype(np.int32)
    linf = float(np.abs(delta).max()) / 255.0 if delta.size else 0.0
    l2 = float(np.sqrt(np.sum(delta.astype(np.float64) ** 2))) / 255.0
    return linf, l2


def pad_to_multiple(x: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """Pad (B, C, H, W) at the bottom/right to multiples of ``multiple`` for the VAE (f = 8): reflect,
    or replicate where the image is too small to reflect. Differentiable; :func:`crop_to` undoes it."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def crop_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return x[..., : size[0], : size[1]]


def generators_for(seeds: Sequence[int], salt: int = 0) -> list[torch.Generator]:
    """One CPU generator per image seed (``salt`` separates streams, e.g. random start vs noise)."""
    return [torch.Generator().manual_seed((int(s) + salt * 0x9E3779B97F4A7C15) % (1 << 63)) for s in seeds]


# ------------------------------------------------------------------------------------------ batching

BatchAttack = Callable[[torch.Tensor, list[int]], PGDResult]


def protect_in_batches(
    images: list[np.ndarray], *, seed: int, batch_size: int, device: str | torch.device, attack: BatchAttack
) -> list[ProtectResult]:
    """Group equal-sized images into device batches of ``batch_size``, run ``attack(x, seeds)`` on each
    (x: (B, 3, H, W) in [0, 1]; seeds: each image's :func:`image_seed`), return results in input order."""
    from raypdm.purify.base import group_indices_by_size

    results: list[ProtectResult | None] = [None] * len(images)
    for idx in group_indices_by_size(images).values():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            x = to_tensor([images[i] for i in chunk], device)
            seeds = [image_seed(images[i], seed) for i in chunk]
            res = attack(x, seeds)
            out = to_uint8(res.x_adv)
            for j, i in enumerate(chunk):
                results[i] = ProtectResult(
                    image=out[j], loss_before=float(res.loss_before[j]), loss_after=float(res.loss_after[j])
                )
    return [r for r in results if r is not None]


class PGDImageProtection(ImageProtection):
    """An image protection that is one :func:`pgd_linf` run per device batch; subclasses supply the
    objectives. Randomness: the random start, the ascent's Monte-Carlo draws and the fixed evaluation
    draws each come from generators seeded with the image's :func:`image_seed` (separate streams), so
    an image gets the same perturbation in any batch. That is bit-exact on the CPU (tested); on a GPU,
    batched kernels of another batch size can round differently (~1e-6), which can flip the sign of a
    near-zero gradient entry and move a pixel by one step."""

    START_STREAM, ASCENT_STREAM, EVAL_STREAM = 1, 2, 3
    device: torch.device
    options: ProtectOptions

    @abc.abstractmethod
    def objectives(self, x: torch.Tensor, seeds: list[int]) -> tuple[Objective, Objective]:
        """(ascent objective, evaluation objective) for the clean batch ``x`` (B, 3, H, W) in [0, 1]
        and its images' seeds. Both map x_adv to (B,) losses to maximise; the evaluation one must be
        deterministic (it scores the clean and the final point)."""

    def attack(self, x: torch.Tensor, seeds: list[int]) -> PGDResult:
        o = self.options
        ascent, evaluate = self.objectives(x, seeds)
        return pgd_linf(
            x,
            ascent,
            radius=o.radius,
            step=o.step,
            steps=o.steps,
            random_start=o.random_start,
            generator=generators_for(seeds, self.START_STREAM),
            eval_objective=evaluate,
        )

    def protect(self, images: list[np.ndarray]) -> list[ProtectResult]:
        o = self.options
        return protect_in_batches(images, seed=o.seed, batch_size=o.batch_size, device=self.device, attack=self.attack)

    def score(self, clean: list[np.ndarray], candidates: list[np.ndarray]) -> list[float]:
        """The evaluation objective at ``candidates`` (e.g. protected images) for the ``clean`` images
        they came from: what ``loss_after`` reports, for any perturbation (baselines, other methods)."""
        if len(clean) != len(candidates):
            raise ValueError(f"score: {len(clean)} clean images for {len(candidates)} candidates")
        out = []
        for c, cand in zip(clean, candidates, strict=True):
            if c.shape != cand.shape:
                raise ValueError(f"score: clean {c.shape} and candidate {cand.shape} differ in shape")
            x = to_tensor([c], self.device)
            _, evaluate = self.objectives(x, [image_seed(c, self.options.seed)])
            with torch.no_grad():
                out.append(float(evaluate(to_tensor([cand], self.device))[0]))
        return out
