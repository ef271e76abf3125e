"""Reading weight files safely, and telling a user exactly what is missing or broken.

Rules this module enforces for every model in the registry:
- safetensors first; a pickle (.bin/.pth/.ckpt) is only ever read with `torch.load(weights_only=True)`,
  so a file that smuggles in arbitrary objects is refused instead of executed;
- nothing here touches the network; a missing file raises `MissingWeightsError`, which names the file
  and the exact command that fetches it;
- `check_weights` never loads tensors: it hashes (streaming) and reads safetensors headers, so checking a
  20 GB weights directory costs seconds and no memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from raypdm.models.registry import ModelSpec, get, list_models

Shape = tuple[int, ...]
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")
_HASH_CHUNK = 8 * 1024 * 1024
# A safetensors header is JSON of a few hundred KB at most; anything bigger means a garbage file.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def _rebuild_error(cls: type, args: tuple, state: dict) -> BaseException:
    err = cls.__new__(cls)
    err.args = args
    err.__dict__.update(state)
    return err


class _TravellingError:
    """These errors are raised inside Ray actors and travel to the driver pickled. An exception pickles
    as `cls(*self.args)`, which does not fit constructors that take the parts of the message: Ray then
    shows "Failed to deserialize exception" instead of the fix. Rebuild from the message and attributes."""

    def __reduce__(self):
        return _rebuild_error, (type(self), self.args, dict(self.__dict__))


class MissingWeightsError(_TravellingError, FileNotFoundError):
    """A required weight file is not on disk. The message names each file and the fetch command."""

    def __init__(self, model: str, missing: list[Path], fetch: str):
        self.model, self.missing, self.fetch = model, missing, fetch
        files = "\n".join(f"  {p}" for p in missing)
        super().__init__(
            f"{model}: {len(missing)} required weight file(s) missing:\n{files}\n"
            f"Fetch them with:\n{_indent(fetch)}\n(or check them with `raypdm models check --weights-dir ...`)"
        )


class CorruptWeightsError(_TravellingError, ValueError):
    """A weight file is on disk but its sha256 is not the pinned one (truncated, damaged, another release)."""

    def __init__(self, model: str, path: Path, expected: str, found: str, fetch: str):
        self.model, self.path, self.expected, self.found, self.fetch = model, path, expected, found, fetch
        super().__init__(
            f"{model}: {path} does not match its pinned sha256\n  expected {expected}\n  found    {found}\n"
            f"It is truncated, damaged or another release. Fetch it again with:\n{_indent(fetch)}"
        )


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" for line in text.splitlines())


@dataclass(frozen=True)
class FileStatus:
    model: str
    path: str  # full path on disk
    status: str  # "present" | "missing" | "corrupt"
    detail: str
    fetch: str  # command that (re)fetches the model's files
    required: bool = True

    @property
    def ok(self) -> bool:
        return self.status == "present" or (self.status == "missing" and not self.required)


# --------------------------------------------------------------------------- reading tensors


def read_state_dict(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or from a pickle with `weights_only=True` (never unrestricted)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device=str(device))
    if path.suffix in PICKLE_SUFFIXES:
        try:
            obj = torch.load(path, map_location=device, weights_only=True)
        except Exception as e:  # UnpicklingError for forbidden globals; keep the cause visible
            raise ValueError(
                f"{path}: refused to unpickle (weights_only=True allows tensors and plain containers "
                f"only; convert the file to .safetensors if it is trusted): {e}"
            ) from e
        # Training checkpoints nest the weights ({"state_dict": ...}, {"params_ema": ...}).
        for key in ("state_dict", "params_ema", "params", "model"):
            if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
        if not isinstance(obj, Mapping):
            raise ValueError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
        return dict(obj)
    raise ValueError(f"{path}: unknown weight file type {path.suffix!r} (want .safetensors or a pickle)")


def read_safetensors_header(path: str | Path) -> dict[str, tuple[str, Shape]]:
    """key -> (dtype, shape) from the header alone; ValueError when the file is not valid safetensors.

    Also checks that the tensor data the header promises is all there, which catches truncated
    downloads that a header-only read would miss.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise ValueError("file shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw_len)
        if n > min(size - 8, _MAX_HEADER_BYTES):
            raise ValueError(f"header length {n} does not fit in a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    out: dict[str, tuple[str, Shape]] = {}
    data_end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            out[key] = (info["dtype"], tuple(int(d) for d in info["shape"]))
            data_end = max(data_end, int(info["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise ValueError(f"malformed header entry for {key!r}") from None
    if 8 + n + data_end > size:
        raise ValueError(f"truncated: header promises {8 + n + data_end} bytes, file has {size}")
    return out


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- layouts and loading

# Keys that older or newer writers add or rename without changing the weights:
# - transformers <5 and the hub files prefix the CLIP text tower with `text_model.`; transformers 5
#   drops it in `state_dict()` and in `save_pretrained`;
# - `position_ids` is a non-persistent buffer now, but old files still carry it;
# - old diffusers VAE files name the mid-block attention `query/key/value/proj_attn`.
_IGNORED_SUFFIXES = ("embeddings.position_ids",)
_OLD_ATTENTION = re.compile(r"\.(query|key|value|proj_attn)\.(weight|bias)$")
_NEW_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def canonical_key(key: str) -> str:
    key = key.removeprefix("text_model.")
    return _OLD_ATTENTION.sub(lambda m: f".{_NEW_ATTENTION[m.group(1)]}.{m.group(2)}", key)


def canonical_state_dict(state: Mapping[str, object]) -> dict[str, object]:
    return {canonical_key(k): v for k, v in state.items() if not k.endswith(_IGNORED_SUFFIXES)}


def module_layout(module: torch.nn.Module, prefix: str = "") -> dict[str, Shape]:
    """key -> shape of a module's persistent state (build it on the meta device: no memory used)."""
    return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}


def compare_layout(found: Mapping[str, Shape], expected: Mapping[str, Shape]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, shape-mismatched) canonical keys of `found` against `expected`."""
    f = canonical_state_dict(found)
    e = canonical_state_dict(expected)
    missing = sorted(set(e) - set(f))
    unexpected = sorted(set(f) - set(e))
    mismatched = sorted(k for k in set(f) & set(e) if tuple(f[k]) != tuple(e[k]))
    return missing, unexpected, mismatched


def resolve_weight_file(path: Path) -> Path | None:
    """`path` if it exists, else for a .safetensors path a pickle with the same role next to it.

    Older downloads only have `diffusion_pytorch_model.bin` / `pytorch_model.bin`; those are read with
    weights_only=True, so accepting them costs no safety.
    """
    if path.exists():
        return path
    if path.suffix != ".safetensors":
        return None
    stems = [path.stem]
    if path.name == "model.safetensors":  # transformers' pickle name differs from its safetensors name
        stems.append("pytorch_model")
    for stem in stems:
        for suffix in PICKLE_SUFFIXES:
            alt = path.with_name(stem + suffix)
            if alt.exists():
                return alt
    return None


def load_weights_into(module: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Strictly load a weight file into `module` (which may live on the meta device).

    Works on canonical key names, so hub files (`text_model.`, old attention names) and files written
    by the current libraries both load. Tensors are assigned, not copied, so a meta skeleton costs
    no extra memory.
    """
    state = canonical_state_dict(read_state_dict(path))
    expected = {canonical_key(k) for k in module.state_dict()}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{path}: does not match {type(module).__name__}: {len(missing)} missing keys "
            f"{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    # Module keys are canonical already except for the CLIP prefix case handled by canonical_key.
    by_canonical = {canonical_key(k): k for k in module.state_dict()}
    module.load_state_dict({by_canonical[k]: v for k, v in state.items()}, strict=True, assign=True)
    return module


@contextlib.contextmanager
def init_on(device: torch.device) -> Iterator[None]:
    """Create modules directly on `device`; on `meta` that allocates nothing (used for layouts)."""
    with torch.device(device):
        yield


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Deterministic random init that leaves the caller's RNG states (CPU and CUDA) untouched.

    `torch.manual_seed` would also reseed every CUDA device; only the generators the init uses are
    seeded here (CPU, plus the target GPU when building on one), inside a fork that restores them.
    """
    device = torch.device(device)
    gpus = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus, device_type="cuda"):
        torch.random.default_generator.manual_seed(seed)
        for index in gpus:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


# --------------------------------------------------------------------------- checks


def require_files(spec: ModelSpec, weights_dir: str | Path, *, verify_hashes: bool = True) -> None:
    """Every required file present (else `MissingWeightsError`), and with `verify_hashes` every pinned one
    intact (else `CorruptWeightsError`; hashes are remembered per file version, see `verify.py`)."""
    model_dir = spec.model_dir(weights_dir)
    missing = [
        (model_dir / f.path).absolute()
        for f in spec.files
        if f.required and resolve_weight_file(model_dir / f.path) is None
    ]
    if missing:
        raise MissingWeightsError(spec.name, missing, spec.fetch_command(weights_dir))
    if verify_hashes:
        from raypdm.models.verify import verify_model  # verify.py builds on this module

        verify_model(spec, weights_dir)


def custom_architecture(spec: ModelSpec, model_dir: Path, wf) -> bool:
    """Whether `wf` is a tiny/custom-config bundle's file in the hub layout: its own config implies another
    layout than the full preset's, so the pin (taken for the hub's full-size file) cannot apply."""
    if wf.layout is None or spec.config_layouts is None or not spec.layouts:
        return False
    layouts, source = _expected_layouts(spec, model_dir)
    full = spec.layouts().get(wf.layout)
    own = layouts.get(wf.layout)
    return source != "the full preset" and full is not None and own is not None and any(compare_layout(own, full))


def _expected_layouts(spec: ModelSpec, model_dir: Path) -> tuple[dict[str, dict[str, Shape]], str]:
    """Layouts to check files against, and where they came from.

    The registry's reference is the `full` preset. When the model folder has its own configs (a
    diffusers folder), files are checked against those instead, so a tiny or fine-tuned bundle saved
    in the same layout is not called corrupt; the detail then says it is not the full architecture.
    """
    full = spec.layouts() if spec.layouts else {}
    if spec.config_layouts is not None:
        try:
            return spec.config_layouts(model_dir), "its config.json"
        except (OSError, ValueError, TypeError, KeyError):
            pass  # no/unreadable config: the JSON check reports it; fall back to the full preset
    return full, "the full preset"


def _check_file(spec: ModelSpec, wf, model_dir: Path, fetch: str, layouts_src, verify_hashes: bool) -> FileStatus:
    target = model_dir / wf.path

    def status(s: str, detail: str) -> FileStatus:
        return FileStatus(spec.name, str(target.absolute()), s, detail, fetch, wf.required)

    found = resolve_weight_file(target)
    if found is None:
        return status("missing", "required" if wf.required else "optional: not needed to load")
    if found != target:
        return status("present", f"pickle fallback {found.name} (read with weights_only=True; not layout-checked)")
    notes = []
    if target.suffix == ".json":
        try:
            json.loads(target.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return status("corrupt", f"invalid JSON: {e}")
    custom_architecture = False
    if target.suffix == ".safetensors" and wf.layout:
        try:
            header = read_safetensors_header(target)
        except (OSError, ValueError) as e:
            return status("corrupt", f"unreadable safetensors: {e}")
        layouts, source = layouts_src()
        expected = layouts.get(wf.layout)
        if expected is None:
            notes.append(f"no layout {wf.layout!r} to check against")
        else:
            missing, unexpected, mismatched = compare_layout({k: s for k, (_, s) in header.items()}, expected)
            if missing or unexpected or mismatched:
                first = (mismatched or missing or unexpected)[0]
                return status(
                    "corrupt",
                    f"layout {wf.layout!r} vs {source}: {len(missing)} keys missing, {len(unexpected)} "
                    f"unexpected, {len(mismatched)} shape mismatches (e.g. {first})",
                )
            notes.append(f"{len(header)} tensors match {source}")
            if source != "the full preset" and spec.layouts:
                full = spec.layouts().get(wf.layout)
                custom_architecture = full is not None and any(compare_layout(expected, full))
                if custom_architecture:
                    notes.append("not the full architecture (tiny or custom config)")
    if not wf.sha256:
        notes.append("sha256 not pinned")
    elif custom_architecture:
        # The pin identifies the hub's full-size file; a tiny/custom bundle cannot match it by design.
        notes.append("sha256 pin skipped (pinned for the full hub file)")
    elif verify_hashes:
        digest = sha256_file(target)
        if digest != wf.sha256:
            return status("corrupt", f"sha256 {digest[:12]}… != pinned {wf.sha256[:12]}…")
        notes.append("sha256 ok")
    else:
        notes.append("sha256 not verified (--no-hash)")
    return status("present", "; ".join(notes))


def check_model(spec: ModelSpec, weights_dir: str | Path, verify_hashes: bool = True) -> list[FileStatus]:
    model_dir = spec.model_dir(weights_dir)
    fetch = spec.fetch_command(weights_dir)
    cache: list = []

    def layouts_src():  # computed once per model and only when a file needs it
        if not cache:
            cache.append(_expected_layouts(spec, model_dir))
        return cache[0]

    return [_check_file(spec, wf, model_dir, fetch, layouts_src, verify_hashes) for wf in spec.files]


def check_weights(
    weights_dir: str | Path, names: list[str] | tuple[str, ...] | str | None = None, verify_hashes: bool = True
) -> list[FileStatus]:
    """One `FileStatus` per expected file of each model (all registered models by default)."""
    if isinstance(names, str):
        names = [names]
    out: list[FileStatus] = []
    for name in names or list_models():
        out.extend(check_model(get(name), weights_dir, verify_hashes=verify_hashes))
    return out
