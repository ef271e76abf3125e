"""The model registry: what each model is, which files it needs, and how to build or load it.

A model module (stable_diffusion.py, upscaler.py, codeformer.py, ...) describes itself with a
`ModelSpec` and calls `register(spec)` at import time. Everything else (building random weights,
loading real ones, checking a weights directory, the `raypdm models` CLI) only talks to specs, so
adding a model never touches this file.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# layout name -> {state_dict key as stored on disk -> shape}
Layouts = dict[str, dict[str, tuple[int, ...]]]


@dataclass(frozen=True)
class WeightFile:
    """One file a model needs, relative to `<weights_dir>/<model name>/`."""

    path: str
    # None means "not pinned": checks can only test presence and layout, and say so.
    sha256: str | None = None
    # A direct download URL, for models that do not live on the Hugging Face Hub.
    url: str | None = None
    # Name of the entry in `ModelSpec.layouts()` this file's tensors must match (None: no check).
    layout: str | None = None
    required: bool = True


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    licence: str
    licence_note: str
    hub_repo: str | None
    hub_revision: str | None
    files: tuple[WeightFile, ...]
    # builder(preset, device, dtype) -> model or bundle with random (seeded) weights.
    builder: Callable[[str, Any, Any], Any]
    # loader(model_dir, device, dtype) -> the same object with real weights from `model_dir`.
    loader: Callable[[Path, Any, Any], Any]
    # Expected tensors per layout name, from the `full` preset on the meta device (cheap: no memory).
    layouts: Callable[[], Layouts] | None = None
    presets: tuple[str, ...] = ("tiny", "full")
    # Optional: layouts implied by the configs inside a model folder (diffusers `*/config.json`), so
    # a tiny or fine-tuned bundle saved in the hub layout is checked against its own architecture.
    config_layouts: Callable[[Path], Layouts] | None = None
    # Terms that limit use (non-commercial, research only): `raypdm models fetch` prints the licence and
    # downloads only after `--accept-licence NAME`, once per weights dir.
    restricted: bool = False

    def model_dir(self, weights_dir: str | Path) -> Path:
        return Path(weights_dir) / self.name

    @property
    def downloadable(self) -> bool:
        """Whether `raypdm models fetch` can download this model (a hub repo or a URL per file)."""
        return bool(self.hub_repo) or any(f.url for f in self.files)

    def fetch_command(self, weights_dir: str | Path) -> str:
        """The exact shell command that puts this model's files where `load` looks for them.

        The first line is `raypdm models fetch ...`; the `hf download`/`curl` equivalents follow as
        comment lines, for a download machine without raypdm (the block stays pasteable as a whole).
        """
        if not self.downloadable:
            return self.manual_fetch_command(weights_dir)
        manual = "\n".join(f"# {line}" for line in self.manual_fetch_command(weights_dir).splitlines())
        return f"{fetch_command([self.name], weights_dir)}\n# without raypdm:\n{manual}"

    def manual_fetch_command(self, weights_dir: str | Path) -> str:
        """The same download with `hf download` (hub models) or `curl` (release URLs)."""
        dest = self.model_dir(weights_dir)
        if self.hub_repo:
            rev = self.hub_revision or "main"
            # Naming the files keeps the download to what `load` reads: the SD repos also hold
            # original-format checkpoints, pickles and fp16 variants (3-4x more data).
            files = " ".join(shlex.quote(f.path) for f in self.files)
            return (
                f"hf download {shlex.quote(self.hub_repo)} --revision {shlex.quote(rev)} "
                f"--local-dir {shlex.quote(str(dest))} {files}"
            ).rstrip()
        cmds = []
        for f in self.files:
            target = dest / f.path
            if f.url is None:
                cmds.append(f"# no public URL known for {f.path}: place it at {target}")
                continue
            cmds.append(
                f"mkdir -p {shlex.quote(str(target.parent))} && "
                f"curl -L -o {shlex.quote(str(target))} {shlex.quote(f.url)}"
            )
        return "\n".join(cmds)


def fetch_command(names: Iterable[str], weights_dir: str | Path) -> str:
    """`raypdm models fetch --weights-dir W --model A --model B`: one line for any set of models."""
    models = " ".join(f"--model {shlex.quote(n)}" for n in dict.fromkeys(names))
    return f"raypdm models fetch --weights-dir {shlex.quote(str(weights_dir))} {models}".rstrip()


_REGISTRY: dict[str, ModelSpec] = {}

# What each use reads (`raypdm models fetch --for USE`); the README's "Real weights" gives each one's disk.
USES: dict[str, tuple[str, ...]] = {
    "codesr": ("codeformer", "sd-x4-upscaler", "lpips-alex"),
    "scoring": ("antelopev2", "vggface", "clip-vit-b32", "liqe", "lpips-alex"),
    "training": ("sd21-base",),
    "paper": ("sd21-base", "codeformer", "sd-x4-upscaler", "adm256-uncond", "antelopev2", "vggface",
              "clip-vit-b32", "liqe", "lpips-alex", "lpips-vgg"),
}

# Built-in models live in their own modules and register themselves when imported. Importing diffusers
# and transformers costs seconds, so a module is imported only when one of its models is first asked
# for: a CodeFormer actor never pays for Stable Diffusion's imports.
_BUILTIN_MODULES: dict[str, str] = {
    "sd21-base": "raypdm.models.stable_diffusion",
    "sd-x4-upscaler": "raypdm.models.upscaler",
    "codeformer": "raypdm.models.codeformer",
    "adm256-uncond": "raypdm.models.adm",
    "antelopev2": "raypdm.models.faces",
    "vggface": "raypdm.models.faces",
    "clip-vit-b32": "raypdm.models.clip",
    "liqe": "raypdm.models.clip",
    "lpips-alex": "raypdm.models.lpips_trunks",
    "lpips-vgg": "raypdm.models.lpips_trunks",
}


def _import_builtins(name: str | None = None) -> None:
    import importlib

    modules = [_BUILTIN_MODULES[name]] if name in _BUILTIN_MODULES else sorted(set(_BUILTIN_MODULES.values()))
    for module in modules:
        importlib.import_module(module)


def register(spec: ModelSpec) -> ModelSpec:
    """Add `spec`; re-registering the same name replaces it (module reloads in notebooks/tests)."""
    _REGISTRY[spec.name] = spec
    return spec


def get(name: str) -> ModelSpec:
    if name not in _REGISTRY:
        _import_builtins(name)
    try:
        return _REGISTRY[name]
    except KeyError:
        _import_builtins()
        known = ", ".join(sorted(_REGISTRY)) or "(none registered)"
        raise KeyError(f"unknown model {name!r}; known models: {known}") from None


def list_models() -> list[str]:
    _import_builtins()
    return sorted(_REGISTRY)
