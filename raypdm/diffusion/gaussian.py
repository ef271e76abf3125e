"""Discrete Gaussian diffusion as the ADM checkpoint was trained: linear betas, eps prediction, learned-range variance.

Source: Ho et al. 2020 (DDPM) and Nichol & Dhariwal 2021 (learned variances), following openai/guided-diffusion
(MIT) ``gaussian_diffusion.py`` and ``respace.py`` with ``model_mean_type=EPSILON``, ``model_var_type=LEARNED_RANGE``,
``noise_schedule="linear"``. All schedule arrays are float64 numpy (as upstream); values taken per timestep are
cast to float32 next to the data.

Indexing (the source of the "wrong schedule" bugs, see shared/reference/adm_notes.md §7):
- A respaced diffusion keeps original steps ``S = timestep_map`` and rebuilds its betas from ``alphas_cumprod`` so
  that ``alphas_cumprod'[k] == alphas_cumprod[S[k]]``; every array (posterior variance, the learned-range bounds)
  is recomputed from those betas.
- Every method here takes **respaced indices** k (0 .. num_timesteps-1). The network is always called with the
  original step ``timestep_map[k]`` (:meth:`GaussianDiffusion.model_timesteps`), as upstream's ``_WrappedModel``.
- :meth:`index_for_step` converts an original step to the nearest kept index, and :meth:`index_for_noise_ratio`
  finds the index for a noise-to-signal ratio on *this* (possibly respaced) schedule.

Deliberate differences from upstream: ``p_mean_variance`` is split so the learned-range formula can be applied to a
given model output (:meth:`p_mean_variance_from_output`); noise for ``p_sample``/``q_sample`` is passed in (so a
caller can draw it from per-image generators, :func:`randn_rows`) instead of drawn with ``randn_like``. The
variance value v is not clamped to [-1, 1], as upstream.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "GaussianDiffusion",
    "ModelFn",
    "linear_betas",
    "randn_rows",
    "sdedit",
    "space_timesteps",
]

# model(x, original_timesteps) -> (N, 2C, H, W): eps in the first C channels, v in the last C.
ModelFn = Callable[[Tensor, Tensor], Tensor]


def linear_betas(num_timesteps: int = 1000) -> np.ndarray:
    """Upstream's "linear" schedule for any T: scaled so T=1000 gives beta from 1e-4 to 0.02 (float64)."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    scale = 1000 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int] | None) -> list[int]:
    """The original steps to keep, sorted (upstream ``space_timesteps``).

    ``section_counts``: ``None``/``""`` keeps every step; ``"ddimN"`` takes an exact integer stride giving N steps
    from 0; otherwise a comma list (``"250"``, ``"10,10,10"``) of per-section counts: the steps are cut into equal
    sections (the first ``T % len`` one step longer) and each section is strided by ``(size-1)/(count-1)``, rounded
    with Python's ``round`` (half to even), exactly as upstream.
    """
    if section_counts is None or section_counts == "":
        return list(range(num_timesteps))
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    if isinstance(section_counts, str):
        text = section_counts.strip()
        if text.startswith("ddim"):
            try:
                desired = int(text[len("ddim"):])
            except ValueError:
                raise ValueError(f"respacing {section_counts!r}: expected 'ddim<N>'") from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"respacing {section_counts!r}: cannot take exactly {desired} of {num_timesteps} "
                             "steps with an integer stride")
        try:
            section_counts = [int(part) for part in text.split(",")]
        except ValueError:
            raise ValueError(f"respacing {section_counts!r}: expected 'ddimN' or comma-separated counts") from None
    counts = list(section_counts)
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"respacing {section_counts!r}: every section count must be >= 1")
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"respacing {section_counts!r}: cannot take {count} steps from a section of {size}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(steps))


def randn_rows(generators: Sequence[torch.Generator], shape: Sequence[int], device: torch.device | str,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal noise, row r drawn from ``generators[r]``: a row's noise never depends on its batch."""
    return torch.cat([torch.randn((1, *shape), generator=g, device=device, dtype=dtype) for g in generators])


class GaussianDiffusion:
    """Schedule arrays and the DDPM operations of a (possibly respaced) learned-range diffusion."""

    def __init__(self, betas: np.ndarray, timestep_map: Sequence[int] | None = None,
                 original_num_steps: int | None = None, rescale_timesteps: bool = False):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.betas = betas
        self.num_timesteps = len(betas)
        self.timestep_map = np.asarray(timestep_map if timestep_map is not None else range(len(betas)), dtype=np.int64)
        if len(self.timestep_map) != self.num_timesteps:
            raise ValueError("timestep_map must have one entry per beta")
        self.original_num_steps = original_num_steps or self.num_timesteps
        self.rescale_timesteps = rescale_timesteps

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # log of the posterior variance, "clipped": entry 0 is 0 (no noise at the last step), so use entry 1.
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:]) if self.num_timesteps > 1
            else self.betas
        )
        self.log_betas = np.log(betas)
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    # ------------------------------------------------------------------------------------ constructors

    @classmethod
    def linear(cls, num_timesteps: int = 1000, respacing: str | int | Sequence[int] | None = None,
               rescale_timesteps: bool = False) -> GaussianDiffusion:
        """The ADM schedule (linear betas, T steps), respaced as upstream's ``SpacedDiffusion`` when asked."""
        base = linear_betas(num_timesteps)
        keep = space_timesteps(num_timesteps, respacing)
        if len(keep) == num_timesteps:
            return cls(base, None, num_timesteps, rescale_timesteps)
        return cls.respaced(base, keep, rescale_timesteps)

    @classmethod
    def respaced(cls, base_betas: np.ndarray, use_timesteps: Sequence[int],
                 rescale_timesteps: bool = False) -> GaussianDiffusion:
        """Keep ``use_timesteps`` of a base schedule: beta'_k = 1 - abar[s_k] / abar[s_{k-1}] (abar[s_-1] = 1)."""
        base_abar = np.cumprod(1.0 - np.asarray(base_betas, dtype=np.float64))
        keep = sorted({int(s) for s in use_timesteps})
        if not keep or keep[0] < 0 or keep[-1] >= len(base_abar):
            raise ValueError(f"use_timesteps must lie in [0, {len(base_abar)})")
        last, betas = 1.0, []
        for s in keep:
            betas.append(1.0 - base_abar[s] / last)
            last = base_abar[s]
        return cls(np.array(betas), keep, len(base_abar), rescale_timesteps)

    # ------------------------------------------------------------------------------------ indexing

    def _extract(self, arr: np.ndarray, t: Tensor, like: Tensor) -> Tensor:
        values = torch.from_numpy(arr[t.detach().cpu().numpy()]).to(device=like.device, dtype=torch.float32)
        return values.view(-1, *([1] * (like.ndim - 1)))

    def timesteps(self, k: int, batch: int, device: torch.device | str) -> Tensor:
        """A batch of respaced index ``k`` (checked against the schedule)."""
        if not 0 <= k < self.num_timesteps:
            raise ValueError(f"timestep index {k} is outside this schedule's 0..{self.num_timesteps - 1}")
        return torch.full((batch,), k, dtype=torch.long, device=device)

    def model_timesteps(self, t: Tensor) -> Tensor:
        """What the network sees for respaced indices t: the original steps (scaled to 1000 when asked)."""
        steps = torch.from_numpy(self.timestep_map[t.detach().cpu().numpy()]).to(t.device)
        if self.rescale_timesteps:
            return steps.float() * (1000.0 / self.original_num_steps)
        return steps

    def index_for_step(self, step: int) -> int:
        """The respaced index whose original step is nearest to ``step`` (ties go to the smaller step)."""
        if not 0 <= step < self.original_num_steps:
            raise ValueError(f"step {step} is outside the original schedule's 0..{self.original_num_steps - 1}")
        return int(np.argmin(np.abs(self.timestep_map - step)))

    def noise_ratio(self) -> np.ndarray:
        """sqrt((1 - abar_k) / abar_k) per index: the noise std relative to the signal at each index."""
        return self.sqrt_one_minus_alphas_cumprod / self.sqrt_alphas_cumprod

    def index_for_noise_ratio(self, sigma: float) -> int:
        """The first index k with sqrt((1 - abar_k) / abar_k) >= sigma (DDS's rule), clipped to the last index."""
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        above = np.nonzero(self.noise_ratio() >= sigma)[0]
        return int(above[0]) if len(above) else self.num_timesteps - 1

    # ------------------------------------------------------------------------------------ q and p

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        return self._extract(self.sqrt_alphas_cumprod, t, x0) * x0 + \
            self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def predict_x0(self, x_t: Tensor, t: Tensor, eps: Tensor, clip: bool = True) -> Tensor:
        """x0 = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps, clamped to [-1, 1] when ``clip``."""
        x0 = self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - \
            self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        return x0.clamp(-1.0, 1.0) if clip else x0

    def q_posterior_mean(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Mean of q(x_{t-1} | x_t, x0): coef1_t x0 + coef2_t x_t."""
        return self._extract(self.posterior_mean_coef1, t, x_t) * x0 + \
            self._extract(self.posterior_mean_coef2, t, x_t) * x_t

    def p_mean_variance_from_output(self, output: Tensor, x_t: Tensor, t: Tensor, clip_denoised: bool = True
                                    ) -> dict[str, Tensor]:
        """Mean, variance, log-variance and x0 of p(x_{t-1} | x_t) from the network's (eps, v) output.

        Learned range: frac = (v + 1) / 2, log var = frac * log beta_t + (1 - frac) * log posterior_var_t (clipped),
        with this schedule's (respaced) betas.
        """
        c = x_t.shape[1]
        if output.shape[1] != 2 * c:
            raise ValueError(f"model output has {output.shape[1]} channels; learned sigma needs {2 * c}")
        eps, v = output.float().split(c, dim=1)
        frac = (v + 1) / 2
        log_variance = frac * self._extract(self.log_betas, t, x_t) + \
            (1 - frac) * self._extract(self.posterior_log_variance_clipped, t, x_t)
        pred_x0 = self.predict_x0(x_t, t, eps, clip=clip_denoised)
        return {
            "mean": self.q_posterior_mean(pred_x0, x_t, t),
            "variance": torch.exp(log_variance),
            "log_variance": log_variance,
            "pred_xstart": pred_x0,
            "eps": eps,
        }

    def p_mean_variance(self, model: ModelFn, x_t: Tensor, t: Tensor, clip_denoised: bool = True) -> dict[str, Tensor]:
        return self.p_mean_variance_from_output(model(x_t, self.model_timesteps(t)), x_t, t, clip_denoised)

    def p_sample(self, model: ModelFn, x_t: Tensor, t: Tensor, noise: Tensor, clip_denoised: bool = True
                 ) -> dict[str, Tensor]:
        """One ancestral step: mean + 1[t != 0] * exp(log_var / 2) * noise."""
        out = self.p_mean_variance(model, x_t, t, clip_denoised)
        nonzero = (t != 0).float().view(-1, *([1] * (x_t.ndim - 1)))
        return {"sample": out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise,
                "pred_xstart": out["pred_xstart"]}


def sdedit(model: ModelFn, diffusion: GaussianDiffusion, x0: Tensor, start: int, noise: Callable[[], Tensor],
           clip_denoised: bool = True) -> Tensor:
    """Diffuse x0 to index ``start`` and run ancestral sampling down to index 0 (start + 1 model calls).

    This is DiffPure's DDPM runner (``image_editing_sample``) on a consistent schedule: noise and sampling both use
    ``diffusion``'s (respaced) arrays. ``noise()`` returns a fresh N(0, 1) tensor shaped like x0 per call: one for
    the forward diffusion, then one per reverse step (drawn at index 0 too, where it is masked, as upstream).
    """
    t = diffusion.timesteps(start, x0.shape[0], x0.device)
    x = diffusion.q_sample(x0, t, noise())
    for k in range(start, -1, -1):
        t = diffusion.timesteps(k, x0.shape[0], x0.device)
        x = diffusion.p_sample(model, x, t, noise(), clip_denoised)["sample"]
    return x
