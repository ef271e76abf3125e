"""One registry for every model raypdm runs: random-weight presets, real-weight loading, file checks.

    from raypdm import models
    sd = models.build("sd21-base", preset="tiny")           # seeded random weights
    sd = models.load("sd21-base", "/weights", device="cuda")  # reads /weights/sd21-base/...
    models.check_weights("/weights")                         # present / missing / corrupt per file

Real weights get there with `raypdm models fetch --weights-dir /weights` (raypdm.models.fetch); a job
checks them up front with raypdm.models.preflight.check_models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from raypdm.models.registry import ModelSpec, WeightFile, get, list_models, register
from raypdm.models.weights import (
    CorruptWeightsError,
    FileStatus,
    MissingWeightsError,
    check_weights,
    read_state_dict,
    require_files,
)

# Built-in models register themselves when first asked for (see registry._BUILTIN_MODULES), so importing
# this package stays cheap.

__all__ = [
    "CorruptWeightsError",
    "FileStatus",
    "MissingWeightsError",
    "ModelSpec",
    "WeightFile",
    "build",
    "check_weights",
    "get",
    "list_models",
    "load",
    "read_state_dict",
    "register",
]


def build(
    name: str, preset: str = "tiny", device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Any:
    """The model with seeded random weights. `device="meta"` builds the architecture without memory."""
    spec = get(name)
    if preset not in spec.presets:
        raise ValueError(f"{name}: unknown preset {preset!r}; choose one of {', '.join(spec.presets)}")
    return spec.builder(preset, torch.device(device), dtype)


def load(
    name: str, weights_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Any:
    """The model with real weights from `<weights_dir>/<name>/`, offline.

    Raises `MissingWeightsError` (naming each missing file and the command that fetches it) before
    anything is read, and `CorruptWeightsError` when a file does not match its pinned sha256 (hashed once
    per file version and remembered, see `raypdm.models.verify`).
    """
    spec = get(name)
    require_files(spec, weights_dir)
    return spec.loader(spec.model_dir(weights_dir), torch.device(device), dtype)
