"""The purifier interface, the purifier registry, and chains of purifiers.

A purifier maps a batch of images to a batch of images. Every image is a uint8 ``H x W x 3`` RGB numpy
array; sizes may differ inside a batch (model purifiers group by size internally, see
:func:`group_indices_by_size`). The output list has the input's length and order.

Writing a purifier (one module per purifier, see ``jpeg.py`` for the shortest example)::

    class JpegOptions(PurifierOptions):          # extra="forbid": a misspelt option names the field
        quality: int = Field(75, ge=1, le=100)

    @register_purifier("jpeg", JpegOptions)
    class JpegPurifier(Purifier):
        name = "jpeg"
        uses_gpu = False

        def __init__(self, options: JpegOptions | None = None, context: BuildContext | None = None):
            self.options = options or JpegOptions()

        def purify(self, images: list[np.ndarray]) -> list[np.ndarray]:
            return [self._one(image) for image in images]

The registry calls ``factory(options, context)``: ``options`` is the validated options model and
``context`` a :class:`BuildContext` (device, preset, weights_dir). ``config_dict()`` must list every
setting that changes outputs, because the pipeline hashes it into the stage key; the default returns
the name and the options. Model purifiers should add what else changes outputs (preset, weights
checksum) but not the device.
"""

from __future__ import annotations

import abc
import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from raypdm.models.context import ModelContext

__all__ = [
    "BuildContext",
    "ChainPurifier",
    "Purifier",
    "PurifierOptions",
    "build_purifier",
    "check_image",
    "default_device",
    "float_to_uint8",
    "group_indices_by_size",
    "list_aliases",
    "list_purifiers",
    "parse_spec",
    "purifier_options_model",
    "purifier_uses_gpu",
    "register_alias",
    "register_purifier",
]


def default_device() -> str:
    """``"cuda"`` when a CUDA device is visible, else ``"cpu"``."""
    import torch  # imported here so that the registry itself stays cheap to import

    return "cuda" if torch.cuda.is_available() else "cpu"


class PurifierOptions(BaseModel):
    """Base for purifier options: unknown fields are errors, and models are immutable (hashable configs)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# What a purifier may need besides its options (classic purifiers ignore it): the one model context every
# stage shares (device, dtype, preset, weights dir, protocol; `context.model(name)` loads or builds).
BuildContext = ModelContext


# --------------------------------------------------------------------------------------------- images


def check_image(image: np.ndarray, where: str = "image") -> np.ndarray:
    """Fail early, with the offending shape/dtype, on anything but a uint8 HxWx3 array."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{where}: expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{where}: expected a uint8 HxWx3 RGB array, got {image.dtype} {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{where}: empty image {image.shape}")
    return image


def float_to_uint8(x: np.ndarray) -> np.ndarray:
    """Round (not truncate: truncation biases every pixel down by half a level) and clip to uint8."""
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def group_indices_by_size(images: Sequence[np.ndarray]) -> dict[tuple[int, int], list[int]]:
    """Indices of the images of each (H, W), in first-seen order, so model purifiers can batch same sizes."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault((int(image.shape[0]), int(image.shape[1])), []).append(i)
    return groups


# ------------------------------------------------------------------------------------------ interface


class Purifier(abc.ABC):
    """A batch-to-batch image transform. Subclasses implement :meth:`purify`; ``__call__`` checks it."""

    name: str = ""
    uses_gpu: bool = False
    options: PurifierOptions | None = None

    @abc.abstractmethod
    def purify(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Purify already-checked images; return one uint8 HxWx3 array per input, same order."""

    def config_dict(self) -> dict[str, Any]:
        """Every setting that changes outputs (hashed into the stage key)."""
        options = self.options.model_dump(mode="json") if self.options is not None else {}
        return {"name": self.name, **options}

    def __call__(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        images = [check_image(im, f"{self.name} input {i}") for i, im in enumerate(images)]
        if not images:
            return []
        out = list(self.purify(images))
        if len(out) != len(images):
            raise RuntimeError(f"purifier {self.name!r} returned {len(out)} images for {len(images)} inputs")
        for i, im in enumerate(out):
            check_image(im, f"{self.name} output {i}")
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config_dict()})"


class ChainPurifier(Purifier):
    """Applies its parts in order; uses the GPU if any part does."""

    def __init__(self, parts: Sequence[Purifier]):
        if not parts:
            raise ValueError("a chain needs at least one purifier")
        self.parts = list(parts)
        self.name = "+".join(p.name for p in self.parts)
        self.uses_gpu = any(p.uses_gpu for p in self.parts)

    def purify(self, images: list[np.ndarray]) -> list[np.ndarray]:
        for part in self.parts:
            images = part(images)  # __call__, so every hand-over between parts is checked too
        return images

    def config_dict(self) -> dict[str, Any]:
        return {"name": "chain", "parts": [p.config_dict() for p in self.parts]}


# ------------------------------------------------------------------------------------------- registry

Factory = Callable[[Any, BuildContext], Purifier]
F = TypeVar("F", bound=Factory)


@dataclasses.dataclass(frozen=True)
class _Entry:
    factory: Factory
    options_model: type[BaseModel]


_REGISTRY: dict[str, _Entry] = {}
_ALIASES: dict[str, str] = {"codesr": "codeformer+sr"}  # the paper's CodeSR
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def register_purifier(name: str, options_model: type[BaseModel]) -> Callable[[F], F]:
    """Class (or factory) decorator: ``build_purifier`` will call ``factory(options, context)``."""
    if not _NAME_RE.match(name):
        raise ValueError(f"purifier name {name!r} must match {_NAME_RE.pattern} ('+' joins chains)")

    def decorator(factory: F) -> F:
        existing = _REGISTRY.get(name)
        # Re-registering the same class (module reload in a notebook) is harmless; a clash is a bug.
        if existing is not None and _qualified(existing.factory) != _qualified(factory):
            raise ValueError(f"purifier {name!r} is already registered by {existing.factory!r}")
        if name in _ALIASES:
            raise ValueError(f"purifier name {name!r} is already an alias for {_ALIASES[name]!r}")
        _REGISTRY[name] = _Entry(factory, options_model)
        return factory

    return decorator


def _qualified(factory: Factory) -> str:
    return f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', repr(factory))}"


def register_alias(name: str, spec: str) -> None:
    """Name a chain, e.g. ``register_alias("codesr", "codeformer+sr")``."""
    if not _NAME_RE.match(name) or name in _REGISTRY:
        raise ValueError(f"alias {name!r} is not a valid name or clashes with a purifier")
    _ALIASES[name] = spec


def list_purifiers() -> list[str]:
    """Registered purifier names, sorted (aliases are in :func:`list_aliases`)."""
    return sorted(_REGISTRY)


def list_aliases() -> dict[str, str]:
    return dict(_ALIASES)


def purifier_options_model(name: str) -> type[BaseModel]:
    """The options model of a registered purifier (for CLIs and config validation)."""
    _check_known(name)
    return _REGISTRY[name].options_model


def purifier_uses_gpu(name: str) -> bool:
    """Whether a registered purifier holds a model (class attribute `uses_gpu`): such purifiers run in
    actor pools that load once per actor and take GPUs when the cluster has them."""
    _check_known(name)
    return bool(getattr(_REGISTRY[name].factory, "uses_gpu", False))


def _check_known(name: str) -> None:
    if name not in _REGISTRY:
        aliases = ", ".join(f"{a} (= {s})" for a, s in sorted(_ALIASES.items()))
        raise ValueError(
            f"unknown purifier {name!r}; known purifiers: {', '.join(list_purifiers()) or '(none)'}; "
            f"aliases: {aliases or '(none)'}"
        )


def parse_spec(spec: str) -> list[str]:
    """``"codesr + jpeg"`` -> ``["codeformer", "sr", "jpeg"]``: split on '+', strip, expand aliases."""
    names: list[str] = []
    for raw in spec.split("+"):
        # "pixel-diffpure" and "pixel_diffpure" name the same purifier (registry names use underscores).
        name = raw.strip().lower().replace("-", "_")
        if not name:
            raise ValueError(f"empty purifier name in spec {spec!r}")
        if name in _ALIASES:
            names.extend(parse_spec(_ALIASES[name]))
        else:
            _check_known(name)
            names.append(name)
    return names


def build_purifier(
    spec: str,
    *,
    device: str | None = None,
    preset: str = "tiny",
    weights_dir: str | None = None,
    options: dict[str, dict[str, Any]] | None = None,
) -> Purifier:
    """Build a purifier or a chain from ``spec`` ("jpeg", "codeformer+sr", "codesr", "gaussian + jpeg").

    ``options`` maps a purifier name (a chain part, not an alias) to its options; a name that is not in
    the chain is an error, so a typo never silently runs defaults. A one-part spec returns the bare
    purifier; longer specs return a :class:`ChainPurifier`.
    """
    names = parse_spec(spec)
    options = {k.strip().lower().replace("-", "_"): v for k, v in (options or {}).items()}
    stray = sorted(set(options) - set(names))
    if stray:
        raise ValueError(f"options given for {stray}, which are not in the chain {names} (from {spec!r})")
    context = BuildContext(device=device or default_device(), preset=preset, weights_dir=weights_dir)
    parts = []
    for name in names:
        entry = _REGISTRY[name]
        try:
            opts = entry.options_model.model_validate(options.get(name, {}))
        except ValidationError as err:
            raise ValueError(f"invalid options for purifier {name!r}: {err}") from err
        parts.append(entry.factory(opts, context))
    return parts[0] if len(parts) == 1 else ChainPurifier(parts)
