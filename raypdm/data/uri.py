"""fsspec URIs for every input and output: local paths, file://, memory://, s3://, gs://, ...

Small helpers only; the filesystems themselves are fsspec's. Writes go to a temporary name first and are
then moved into place, so a reader (or a resumed run) never sees half a file on a local disk.
"""

from __future__ import annotations

import posixpath
import uuid

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

__all__ = ["fs_and_path", "join", "write_bytes", "read_bytes", "exists", "protocol_of", "to_uri"]


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


def write_bytes(uri: str, data: bytes) -> None:
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
