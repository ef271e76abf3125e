"""fsspec URIs for every input and output: local paths, file://, memory://, s3://, gs://, ...

Small helpers only; the filesystems themselves are fsspec's. Writes go to a temporary name first and are
then moved into place, so a reader (or a resumed run) never sees half a file on a local disk.
"""

from __future__ import annotations

import os
import posixpath
import uuid

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

__all__ = [
    "UriError",
    "normalise_uri",
    "fs_and_path",
    "join",
    "write_bytes",
    "read_bytes",
    "exists",
    "protocol_of",
    "to_uri",
    "entry_mtime",
]


class UriError(ValueError):
    """A path or URI that cannot work: unknown scheme, or a scheme whose fsspec back-end is not installed."""


# scheme -> (module fsspec needs, the pip install line that provides it). Schemes fsspec implements
# itself need nothing extra.
_BACKENDS: dict[str, tuple[str | None, str | None]] = {
    "file": (None, None),
    "local": (None, None),
    "memory": (None, None),
    "s3": ("s3fs", "pip install 'raypdm[s3]'  (s3fs)"),
    "s3a": ("s3fs", "pip install 'raypdm[s3]'  (s3fs)"),
    "gs": ("gcsfs", "pip install 'raypdm[gcs]'  (gcsfs)"),
    "gcs": ("gcsfs", "pip install 'raypdm[gcs]'  (gcsfs)"),
    "az": ("adlfs", "pip install adlfs"),
    "abfs": ("adlfs", "pip install adlfs"),
    "abfss": ("adlfs", "pip install adlfs"),
    "hdfs": ("pyarrow", None),
}


def normalise_uri(uri: str, *, cwd: str | None = None) -> str:
    """The one form every stage sees: an absolute local path, or a URI that keeps its scheme.

    Relative local paths are resolved against the caller's working directory *here*, in the process
    that reads the config: Ray workers and Tune run elsewhere (another cwd, another node), so a
    relative path would mean something different there, or nothing (`URI has empty scheme`).
    `~` is expanded. A scheme must be one fsspec can open, with its back-end installed; otherwise
    `UriError` says what to install, before anything starts.
    """
    uri = str(uri).strip()
    if not uri:
        raise UriError("empty path")
    if "://" in uri:
        scheme = uri.split("://", 1)[0].lower()
        if scheme not in _BACKENDS:
            from fsspec.registry import known_implementations

            if scheme not in known_implementations:
                known = ", ".join(f"{s}://" for s in ("file", "s3", "gs", "memory"))
                raise UriError(f"{uri!r}: unknown scheme {scheme}:// (use a local path or one of {known})")
        module, install = _BACKENDS.get(scheme, (None, None))
        if module is not None:
            import importlib.util

            if importlib.util.find_spec(module) is None:
                hint = f": {install}" if install else ""
                raise UriError(f"{uri!r}: {scheme}:// needs the {module} package{hint}")
        if scheme in ("file", "local"):
            # file:///abs keeps its scheme; file://relative (no leading slash) is a mistake worth naming.
            rest = uri.split("://", 1)[1]
            if not rest.startswith("/"):
                raise UriError(f"{uri!r}: a file:// URI needs an absolute path (file:///abs/path)")
        return uri
    base = cwd or os.getcwd()
    return os.path.normpath(os.path.join(base, os.path.expanduser(uri)))



def fs_and_path(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = url_to_fs(str(uri))
    return fs, path


def protocol_of(fs: fsspec.AbstractFileSystem) -> str:
    proto = fs.protocol
    return proto[0] if isinstance(proto, (tuple, list)) else proto


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URI a user (or another process) can open: plain paths for local files."""
    if isinstance(fs, LocalFileSystem):
        return path
    return fs.unstrip_protocol(path)


def join(uri: str, *parts: str) -> str:
    """Join path components onto a URI (POSIX separators, as every fsspec backend uses)."""
    uri = str(uri)
    if "://" in uri:
        proto, rest = uri.split("://", 1)
        return f"{proto}://{posixpath.join(rest, *parts)}" if rest else f"{proto}://{posixpath.join(*parts)}"
    return posixpath.join(uri, *parts)


def write_bytes(uri: str, data: bytes, *, root: str | None = None) -> None:
    """Write a whole file. Under an output root (`root`, or one this process holds a lock on) the file's
    folder must resolve inside that root: a folder symlink planted in the output is not written through
    (raises raypdm.data.roots.OutsideRootError)."""
    from raypdm.data.lock import held_root_of

    root = root or held_root_of(uri)
    if root is not None:
        from raypdm.data.roots import check_inside

        check_inside(root, uri)
    fs, path = fs_and_path(uri)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        # Atomic on POSIX: a crash leaves either the old file or the new one, never a torn one.
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    else:
        # Object stores publish a put atomically already.
        with fs.open(path, "wb") as f:
            f.write(data)


def read_bytes(uri: str) -> bytes:
    fs, path = fs_and_path(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def exists(uri: str) -> bool:
    fs, path = fs_and_path(uri)
    return fs.exists(path)


def entry_mtime(info: dict) -> float | None:
    """A listing entry's modification time in seconds, from whichever key the filesystem uses."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "modified"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return float(value)
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        try:
            from datetime import datetime

            return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None
