"""The protection interface, the protection registry, and what every protection shares.

A protection adds an ℓ∞-bounded perturbation δ to a user's photos before they are published (paper
§3, Eq. 4): x' = x + δ with ‖δ‖∞ ≤ r, found by projected gradient ascent on some objective of a fixed
or co-trained diffusion model (``pgd.py``). Two kinds:

- :class:`ImageProtection` (AdvDM, PhotoGuard, Glaze, the adaptive CodeSR attack): each image alone,
  against fixed models. ``protect(images)`` takes a batch of uint8 ``H x W x 3`` arrays (sizes may
  differ) and returns one :class:`ProtectResult` per image, same order and shape. All randomness of an
  image comes from :func:`image_seed` (its bytes and ``options.seed``), so an image gets the same
  result in any batch, actor or run.
- :class:`IdentityProtection` (FSMG, ASPL, EASPL, MetaCloak): all images of one identity together,
  because the bi-level methods fine-tune a surrogate model on them while they perturb them.

Writing one (one module per protection)::

    class AdvDMOptions(ProtectOptions):          # extra="forbid": a misspelt option names the field
        timesteps_per_step: int = Field(1, ge=1)

    @register_protection("advdm", AdvDMOptions)
    class AdvDM(ImageProtection):
        name = "advdm"

        def __init__(self, options: AdvDMOptions, context: ProtectContext):
            ...

        def protect(self, images: list[np.ndarray]) -> list[ProtectResult]:
            ...

The registry calls ``factory(options, context)``. ``config_dict()`` lists every setting that changes
outputs (name, options, preset, weights identity, never the device): the pipeline hashes it into the
stage key, so a changed option re-runs the stage and an unchanged one resumes.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import math
import re
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pydantic import Field, ValidationError, field_validator, model_validator

from raypdm.config import StrictModel
from raypdm.models.context import ModelContext
from raypdm.purify.base import check_image, default_device

__all__ = [
    "IdentityProtection",
    "ImageProtectOptions",
    "ImageProtection",
    "ProtectContext",
    "ProtectOptions",
    "ProtectResult",
    "Protection",
    "budget_steps",
    "reaches_budget",
    "build_protection",
    "check_results",
    "image_seed",
    "is_per_identity",
    "list_protections",
    "normalise_name",
    "parse_fraction",
    "protection_options_model",
    "register_protection",
    "weights_identity",
]


# --------------------------------------------------------------------------------------------- options


def parse_fraction(value: str | float | int) -> float:
    """``"11/255"`` -> 11/255, ``"0.05"`` -> 0.05, ``8`` -> 8.0. Budgets are written as fractions of the
    pixel range in the field's papers, so configs may use either form. Errors name the value."""
    if isinstance(value, bool):  # bool is an int subclass; True/False as a radius is a config mistake
        raise ValueError(f"expected a number or a fraction like '11/255', got {value!r}")
    if isinstance(value, (int, float)):
        out = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            if "/" in text:
                num, _, den = text.partition("/")
                den_f = float(den)
                if den_f == 0:
                    raise ZeroDivisionError
                out = float(num) / den_f
            else:
                out = float(Fraction(text)) if text else float("nan")
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"expected a number or a fraction like '11/255', got {value!r}") from None
    else:
        raise ValueError(f"expected a number or a fraction like '11/255', got {value!r} ({type(value).__name__})")
    if not np.isfinite(out):
        raise ValueError(f"expected a finite number, got {value!r}")
    return out


class ProtectOptions(StrictModel, frozen=True):
    """PGD settings every protection shares (paper Eq. 4). ``radius`` and ``step`` accept "11/255"."""

    radius: float = Field(11 / 255, gt=0, le=1, description="ℓ∞ radius r in [0, 1] pixel units")
    step: float = Field(1 / 255, gt=0, le=1, description="PGD step size α in [0, 1] pixel units")
    steps: int = Field(6, ge=0, le=100_000, description="PGD iterations K")
    random_start: bool = Field(False, description="start from a uniform point of the ball instead of x")
    seed: int = Field(0, ge=0, description="mixed with each image's bytes into its own seed")
    batch_size: int = Field(4, ge=1, le=1024, description="images of equal size per device batch")

    @field_validator("radius", "step", mode="before")
    @classmethod
    def _fraction(cls, value: Any) -> float:
        return parse_fraction(value)


# Sign steps of α reach the ball's face in ⌈r/α⌉ steps only if no pixel's gradient sign ever flips;
# on the diffusion objectives they flip often (AdvDM with 6 × 1/255 measured 6.5/255 of 11/255). Twice the
# straight-line count reaches ≥ 0.9·r on every per-image method (tests/unit/test_protect_budget.py).
BUDGET_MARGIN = 2


def budget_steps(radius: float, step: float) -> int:
    """The default PGD iterations of a per-image method: ``BUDGET_MARGIN · ⌈r/α⌉`` (22 for 11/255 in
    steps of 1/255, 32 for the adaptive attack's 16/255)."""
    return BUDGET_MARGIN * math.ceil(radius / step - 1e-9)


def reaches_budget(radius: float, step: float, steps: int) -> bool:
    """Whether K sign steps of α can reach the radius at all (K·α ≥ r); False means the saved ‖δ‖∞ will
    fall short of r whatever the objective."""
    return steps * step >= radius - 1e-9


class ImageProtectOptions(ProtectOptions, frozen=True):
    """A per-image method's PGD settings. Unlike the bi-level methods, which run ``steps`` PGD steps per
    outer round over many rounds, a per-image attack is one PGD run: its ``steps`` must let K·α reach r.
    Left out, ``steps`` is :func:`budget_steps` of the radius and step given (so ``radius: 16/255`` alone
    also scales the steps); an explicit ``steps`` is kept, and the run warns if K·α < r."""

    steps: int = Field(0, ge=0, le=100_000, description="PGD iterations K (default: 2·⌈r/α⌉, enough to reach r)")

    @model_validator(mode="before")
    @classmethod
    def _steps_reach_radius(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("steps") is not None:
            return data
        try:
            radius = parse_fraction(data.get("radius", cls.model_fields["radius"].default))
            step = parse_fraction(data.get("step", cls.model_fields["step"].default))
        except ValueError:
            return data  # the field's own validator names the bad radius or step
        if radius <= 0 or step <= 0:
            return data
        return {**data, "steps": budget_steps(radius, step)}


# What a protection may need besides its options: the one model context every stage shares.
ProtectContext = ModelContext


@dataclasses.dataclass
class ProtectResult:
    """One protected image (uint8 HxWx3, the input's shape) and the objective before/after the attack."""

    image: np.ndarray
    loss_before: float
    loss_after: float


# ----------------------------------------------------------------------------------------- randomness


def image_seed(image: np.ndarray, seed: int) -> int:
    """A 63-bit seed from an image's shape and bytes and the run's seed: the same image and seed always
    give the same seed, whatever batch, actor or node it lands in."""
    arr = np.ascontiguousarray(image)
    h = hashlib.sha256()
    h.update(f"{arr.dtype.str}:{arr.shape}:{int(seed)}".encode())
    h.update(arr.tobytes())
    return int.from_bytes(h.digest()[:8], "little") & ((1 << 63) - 1)


# --------------------------------------------------------------------------------------------- weights


def weights_identity(model: str, context: ProtectContext) -> str:
    """What identifies a model's weights in the stage key: ``random:<preset>`` for seeded random
    weights, else a fingerprint of the files ``load`` reads.

    Hashing multi-GB checkpoints on every actor start would cost minutes, so a file whose sha256 the
    registry pins contributes that hash, a small file (configs, tokenizer) its bytes, and a large
    unpinned file its size plus its first and last MiB (enough to tell two checkpoints apart).
    """
    if not context.real_weights:
        return f"random:{context.preset}"
    from raypdm.models.registry import get

    spec = get(model)
    model_dir = spec.model_dir(context.weights_dir)
    h = hashlib.sha256(model.encode())
    for wf in spec.files:
        path = Path(model_dir) / wf.path
        if not path.is_file():
            h.update(f"{wf.path}:absent".encode())
            continue
        size = path.stat().st_size
        h.update(f"{wf.path}:{size}:".encode())
        if wf.sha256:
            h.update(wf.sha256.encode())
        else:
            with path.open("rb") as f:
                if size <= 2 << 20:
                    h.update(f.read())
                else:
                    h.update(f.read(1 << 20))
                    f.seek(size - (1 << 20))
                    h.update(f.read())
    return f"files:{h.hexdigest()[:32]}"


# ------------------------------------------------------------------------------------------ interface


class Protection(abc.ABC):
    """Common part of both kinds. Subclasses set ``name`` and ``options`` (and ``context``)."""

    name: str = ""
    per_identity: bool = False
    uses_gpu: bool = True
    options: ProtectOptions
    context: ProtectContext = ProtectContext()
    # Models whose weights change the output: their identity goes into config_dict().
    weight_models: tuple[str, ...] = ("sd21-base",)

    def config_dict(self) -> dict[str, Any]:
        """Every setting that changes outputs (hashed into the stage key); never the device."""
        return {
            "name": self.name,
            **self.options.model_dump(mode="json"),
            "preset": self.context.preset,
            "weights": {m: weights_identity(m, self.context) for m in self.weight_models},
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config_dict()})"


def check_results(name: str, images: Sequence[np.ndarray], results: Sequence[ProtectResult]) -> list[ProtectResult]:
    """A protection must return one uint8 result of its input's shape per input, in order."""
    results = list(results)
    if len(results) != len(images):
        raise RuntimeError(f"protection {name!r} returned {len(results)} results for {len(images)} images")
    for i, (image, res) in enumerate(zip(images, results, strict=True)):
        check_image(res.image, f"{name} output {i}")
        if res.image.shape != image.shape:
            raise RuntimeError(f"protection {name!r} output {i} has shape {res.image.shape}, input {image.shape}")
    return results


class ImageProtection(Protection):
    """Protects each image alone against fixed models (see the module docstring)."""

    per_identity = False

    @abc.abstractmethod
    def protect(self, images: list[np.ndarray]) -> list[ProtectResult]:
        """Protect already-checked images; one result per input, same order and shape. Per-image
        randomness comes from ``image_seed(image, options.seed)``."""

    def __call__(self, images: Sequence[np.ndarray]) -> list[ProtectResult]:
        images = [check_image(im, f"{self.name} input {i}") for i, im in enumerate(images)]
        if not images:
            return []
        return check_results(self.name, images, self.protect(images))


class IdentityProtection(Protection):
    """Protects all images of one identity together (bi-level methods train a surrogate on them)."""

    per_identity = True

    @abc.abstractmethod
    def protect_identity(
        self, images: list[np.ndarray], clean_reference: list[np.ndarray], identity: str
    ) -> list[ProtectResult]:
        """Protect one identity's images; ``clean_reference`` are other clean photos of the identity
        (set_B), which some methods use for their surrogate. One result per image, same order/shape."""

    def __call__(
        self, images: Sequence[np.ndarray], clean_reference: Sequence[np.ndarray], identity: str
    ) -> list[ProtectResult]:
        images = [check_image(im, f"{self.name} {identity} input {i}") for i, im in enumerate(images)]
        refs = [check_image(im, f"{self.name} {identity} reference {i}") for i, im in enumerate(clean_reference)]
        if not images:
            return []
        return check_results(self.name, images, self.protect_identity(images, refs, identity))


# ------------------------------------------------------------------------------------------- registry

Factory = Callable[[Any, ProtectContext], Protection]
F = TypeVar("F", bound=Factory)


@dataclasses.dataclass(frozen=True)
class _Entry:
    factory: Factory
    options_model: type[ProtectOptions]


_REGISTRY: dict[str, _Entry] = {}
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def normalise_name(name: str) -> str:
    """``"photoguard-encoder"`` and ``"PhotoGuard_Encoder"`` name ``photoguard_encoder``."""
    return name.strip().lower().replace("-", "_")


def register_protection(name: str, options_model: type[ProtectOptions]) -> Callable[[F], F]:
    """Class (or factory) decorator: ``build_protection`` will call ``factory(options, context)``."""
    if not _NAME_RE.match(name):
        raise ValueError(f"protection name {name!r} must match {_NAME_RE.pattern}")
    if not (isinstance(options_model, type) and issubclass(options_model, ProtectOptions)):
        raise TypeError(f"protection {name!r}: options_model must subclass ProtectOptions, got {options_model!r}")

    def decorator(factory: F) -> F:
        existing = _REGISTRY.get(name)
        # Re-registering the same class (module reload in a notebook) is harmless; a clash is a bug.
        if existing is not None and _qualified(existing.factory) != _qualified(factory):
            raise ValueError(f"protection {name!r} is already registered by {existing.factory!r}")
        _REGISTRY[name] = _Entry(factory, options_model)
        return factory

    return decorator


def _qualified(factory: Factory) -> str:
    return f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', repr(factory))}"


def list_protections() -> list[str]:
    """Registered protection names, sorted."""
    return sorted(_REGISTRY)


def _entry(name: str) -> tuple[str, _Entry]:
    key = normalise_name(name)
    if key not in _REGISTRY:
        raise ValueError(f"unknown protection {name!r}; known protections: {', '.join(list_protections()) or '(none)'}")
    return key, _REGISTRY[key]


def is_per_identity(name: str) -> bool:
    """Whether a registered protection crafts per identity (a surrogate per identity: bi-level methods)
    rather than per image; decided by the class attribute, without building any model."""
    _, entry = _entry(name)
    return bool(getattr(entry.factory, "per_identity", False))


def protection_options_model(name: str) -> type[ProtectOptions]:
    """The options model of a registered protection (for CLIs and config validation)."""
    return _entry(name)[1].options_model


def build_protection(
    name: str,
    *,
    options: dict[str, Any] | None = None,
    device: str | None = None,
    preset: str = "tiny",
    weights_dir: str | None = None,
) -> Protection:
    """Build a registered protection; ``options`` is validated first (a misspelt key names the field)."""
    key, entry = _entry(name)
    if preset not in ("tiny", "full"):
        raise ValueError(f"protection {key!r}: unknown preset {preset!r}; choose 'tiny' or 'full'")
    try:
        opts = entry.options_model.model_validate(options or {})
    except ValidationError as err:
        raise ValueError(f"invalid options for protection {key!r}: {err}") from err
    context = ProtectContext(device=device or default_device(), preset=preset, weights_dir=weights_dir)
    return entry.factory(opts, context)
