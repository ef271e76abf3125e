"""Load-time sha256 verification of pinned weight files, hashed once per file version.

Every actor that loads a model checks the pinned files it reads, but hashing a 3.5 GB UNet on every actor
start would cost more than loading it. A file's digest is therefore remembered in a small JSON cache keyed
by (absolute path, size, mtime_ns): a file that was replaced or touched is hashed again, an unchanged one
is not. The cache lives beside the weights (`<weights_dir>/.raypdm-sha256.json`, shared by every node that
mounts the folder); where that folder is read-only it lives in the user's cache (`$RAYPDM_CACHE_DIR`, else
`$XDG_CACHE_HOME/raypdm`, else `~/.cache/raypdm`). A cache that cannot be written anywhere only costs
re-hashing. Whoever can write the cache can also replace the weights, so trusting it adds no exposure.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from raypdm.models.registry import ModelSpec
from raypdm.models.weights import CorruptWeightsError, custom_architecture, sha256_file

__all__ = ["CACHE_NAME", "NO_VERIFY_ENV", "file_sha256", "remember", "user_cache_dir", "verification_off",
           "verify_file", "verify_model"]

log = logging.getLogger(__name__)
CACHE_NAME = ".raypdm-sha256.json"
# `--no-verify` on any job sets this in the driver; `init_ray` carries it to the cluster's workers (see
# raypdm.runtime.PROPAGATED_ENV), where the models are loaded.
NO_VERIFY_ENV = "RAYPDM_NO_VERIFY"
_unverified: set[str] = set()


def verification_off() -> bool:
    """True when the user turned load-time sha256 checks off (`--no-verify`, or RAYPDM_NO_VERIFY=1)."""
    return os.environ.get(NO_VERIFY_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _skip(model: str) -> bool:
    """Whether to skip verifying `model`; says so in the log, once per model and process."""
    if not verification_off():
        return False
    if model not in _unverified:
        _unverified.add(model)
        log.warning("%s: weight files NOT verified against their pinned sha256 (--no-verify / %s=1): "
                    "they are loaded as they are", model, NO_VERIFY_ENV)
    return True


def user_cache_dir() -> Path:
    if env := os.environ.get("RAYPDM_CACHE_DIR"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "raypdm"


def _cache_files(root: str | Path | None) -> list[Path]:
    files = [Path(root) / CACHE_NAME] if root is not None else []
    return files + [user_cache_dir() / "sha256.json"]


def _read(cache_file: Path) -> dict:
    try:
        data = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # absent, unreadable or garbled: it is only a cache
    return data if isinstance(data, dict) else {}


def _write(cache_file: Path, key: str, entry: dict) -> bool:
    tmp: str | None = None
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        data = {k: v for k, v in _read(cache_file).items() if os.path.exists(k)}  # forget files that are gone
        data[key] = entry
        # Atomic replace: concurrent actors may lose each other's entry (a re-hash later), never corrupt it.
        fd, tmp = tempfile.mkstemp(prefix=".sha256-", dir=cache_file.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=0, sort_keys=True)
        os.replace(tmp, cache_file)
        return True
    except OSError as e:
        log.debug("sha256 cache %s not writable: %s", cache_file, e)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        return False


def file_sha256(path: str | Path, root: str | Path | None = None) -> str:
    """sha256 of `path`, from the cache when the file's size and mtime are the ones that were hashed."""
    path = Path(path).absolute()
    st = path.stat()
    key = str(path)
    for cache_file in _cache_files(root):
        entry = _read(cache_file).get(key)
        if isinstance(entry, dict) and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
            digest = entry.get("sha256")
            if isinstance(digest, str) and len(digest) == 64:
                return digest
    digest = sha256_file(path)
    _remember(key, st, digest, root)
    return digest


def remember(path: str | Path, digest: str, root: str | Path | None = None) -> None:
    """Record a digest already known for `path` (a verified download moved into place keeps its bytes)."""
    path = Path(path).absolute()
    _remember(str(path), path.stat(), digest, root)


def _remember(key: str, st: os.stat_result, digest: str, root: str | Path | None) -> None:
    entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    for cache_file in _cache_files(root):
        if _write(cache_file, key, entry):
            break


def verify_file(model: str, path: Path, expected: str, fetch: str, root: str | Path | None = None) -> None:
    """`CorruptWeightsError` (naming the file, both hashes and `fetch`) unless `path` hashes to `expected`."""
    if _skip(model):
        return
    found = file_sha256(path, root)
    if found != expected:
        raise CorruptWeightsError(model, Path(path).absolute(), expected, found, fetch)


def verify_model(spec: ModelSpec, weights_dir: str | Path) -> None:
    """Check every pinned file of `spec` that is on disk under its own name.

    A pickle fallback (another file name) and a tiny/custom-config bundle in the hub layout are not the
    pinned file by design: the first is read with weights_only=True, the second is layout-checked.
    """
    if _skip(spec.name):
        return
    model_dir = spec.model_dir(weights_dir)
    for wf in spec.files:
        target = model_dir / wf.path
        if not wf.sha256 or not target.is_file():
            continue
        found = file_sha256(target, weights_dir)
        if found == wf.sha256 or custom_architecture(spec, model_dir, wf):
            continue
        raise CorruptWeightsError(spec.name, target.absolute(), wf.sha256, found, spec.fetch_command(weights_dir))
