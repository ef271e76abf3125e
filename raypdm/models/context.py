"""One model context for every stage, actor and trial: where models run and which weights they come from.

    ctx = ModelContext(device="cuda", preset="full", weights_dir="/weights")
    sd = ctx.model("sd21-base")                  # loaded from /weights/sd21-base/ (checked), once per context
    sd2 = ctx.model("sd21-base")                 # the same object: an actor loads each model once
    surrogate = ctx.model("sd21-base", fresh=True)  # a private copy, for a model that will be trained

The rule lives here and nowhere else: at the `full` preset with a weights dir, a registered model is
*loaded* from the files users hold (`raypdm.models.load`: every file present, pinned checksums verified,
keys and shapes strict); otherwise it is *built* with the preset's seeded random weights (`tiny` for tests
and smoke runs; `full` without weights: the real architecture, random, for shape and memory checks).

The cache belongs to the context object, not to the process: a Ray worker process that Ray reuses for
another task does not keep the last stage's models alive, and a context pickled to a worker travels
without its cache (each actor fills its own). Cached models are shared by whoever asks the same context
for the same (name, device, dtype), so they must not be changed in place — ask for the dtype you need
instead of converting the result, and use `fresh=True` for anything that trains.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where a model is made: drivers that only validate configs never pay it
    import torch

__all__ = ["DTYPES", "ModelContext"]

DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelContext:
    """Device, dtype, preset, weights dir and protocol of a stage; `model(name)` gets a registered model."""

    device: str = "cpu"
    preset: str = "tiny"
    weights_dir: str | None = None
    dtype: str | None = None  # None: each model's own default (float32); else a key of DTYPES
    protocol: str = "paper"
    _cache: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False, hash=False)
    _lock: Any = dataclasses.field(default_factory=threading.Lock, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)} or None, got {self.dtype!r}")

    # The cache and its lock stay behind when a context is pickled (to a Ray worker) or copied.
    def __getstate__(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            object.__setattr__(self, key, value)
        object.__setattr__(self, "_cache", {})
        object.__setattr__(self, "_lock", threading.Lock())

    @property
    def real_weights(self) -> bool:
        """Whether models come from files (the `full` preset with a weights dir) rather than random weights."""
        return self.preset == "full" and bool(self.weights_dir)

    def weights_source(self) -> str:
        """"weights" (read from the weights dir) or "random" (the preset's seeded random weights)."""
        return "weights" if self.real_weights else "random"

    def torch_dtype(self, dtype: str | torch.dtype | None = None) -> torch.dtype | None:
        import torch

        chosen = dtype if dtype is not None else self.dtype
        if chosen is None or isinstance(chosen, torch.dtype):
            return chosen
        return getattr(torch, chosen)

    def model(self, name: str, *, device: str | torch.device | None = None,
              dtype: str | torch.dtype | None = None, fresh: bool = False) -> Any:
        """The registered model `name` on `device` (default: the context's) in `dtype` (default: the
        context's, else the model's own), cached on this context unless `fresh`."""
        import torch

        where = torch.device(device if device is not None else self.device)
        torch_dtype = self.torch_dtype(dtype)
        if fresh:
            return self._make(name, where, torch_dtype)
        key = (name, str(where), str(torch_dtype))
        with self._lock:  # one load per model even when an actor's threads ask at once
            if key not in self._cache:
                self._cache[key] = self._make(name, where, torch_dtype)
            return self._cache[key]

    def _make(self, name: str, device: torch.device, dtype: torch.dtype | None) -> Any:
        from raypdm import models

        if self.real_weights:
            return models.load(name, self.weights_dir, device=device, dtype=dtype)
        return models.build(name, preset=self.preset, device=device, dtype=dtype)

    def check_weights_used(self) -> None:
        """For a config whose weights dir would be ignored (a tiny preset): a ValueError instead of a run that
        silently uses random weights while the user thinks they are real."""
        if self.weights_dir and not self.real_weights:
            raise ValueError(f"read only at preset full (the {self.preset} preset uses seeded random weights): set "
                             "the preset to full, or drop the weights dir")

    def forget(self) -> None:
        """Drop every cached model (an actor that is done with a stage's models)."""
        with self._lock:
            self._cache.clear()
