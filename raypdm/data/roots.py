"""Where a command may write: never into its inputs, never outside its output root.

Two checks, both before anything is opened for writing:
- `check_apart(output, inputs)`: the output root must not be an input root, lie inside one, or contain one
  (local paths compared after resolving symlinks; URIs by scheme and normalised path). A command that
  would write into its own inputs (`--output` = `--input`, or nested either way) is refused with one line
  naming both.
- `check_inside(root, target)`: a local output path, with every symlink resolved, must stay under the
  resolved output root. A folder symlink planted inside the output root (`out/alice -> /elsewhere`) would
  otherwise carry writes outside it; the write is refused and its row becomes an error row. Object stores
  have no symlinks: their keys are checked lexically.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping

from fsspec.core import split_protocol

__all__ = ["OutsideRootError", "RootOverlapError", "check_apart", "check_inside", "resolved_root"]

SMOKE_DATA = "_smoke_data"  # inputs a --smoke run makes under its own output (raypdm/cli/jobs.py)


class RootOverlapError(ValueError):
    """The output root is, contains or lies inside an input root."""


class OutsideRootError(OSError):
    """A write would land outside the output root (a symlink inside it points elsewhere)."""


def resolved_root(uri: str) -> tuple[str, str]:
    """(scheme, path) of a root: local paths absolute with symlinks resolved, other paths without a
    trailing slash."""
    proto, path = _split(uri)
    if proto == "file":
        return "file", os.path.realpath(path)
    return proto, posixpath.normpath(path).rstrip("/")


def _split(uri: str) -> tuple[str, str]:
    """(scheme, path) without opening a filesystem (no back-end needed to compare two URIs)."""
    proto, path = split_protocol(str(uri))
    return ("file" if proto in (None, "file", "local") else proto), path


def _within(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def check_apart(output: str, inputs: Mapping[str, str | None], output_name: str = "output") -> None:
    """Raise RootOverlapError if the output root is, contains or is inside any input root.

    inputs: a label (the config field, e.g. "input") -> its root; None entries are skipped. An input that a
    smoke run made under its own output (`<output>/_smoke_data`) is raypdm's, not the user's: allowed."""
    out_proto, out_path = resolved_root(output)
    for label, root in inputs.items():
        if not root:
            continue
        proto, path = resolved_root(root)
        if proto != out_proto:
            continue
        if path == posixpath.join(out_path, SMOKE_DATA) or path == os.path.join(out_path, SMOKE_DATA):
            continue
        if path == out_path:
            how = "is the same folder as"
        elif _within(out_path, path):
            how = "is inside"
        elif _within(path, out_path):
            how = "contains"
        else:
            continue
        raise RootOverlapError(
            f"refusing to write into an input: the {output_name} {output} {how} the {label} {root}"
            + (f" (both resolve to {path})" if path == out_path and str(root) != str(output) else "")
            + "; choose an output folder outside every input"
        )


def check_inside(root: str, target: str) -> str:
    """Raise OutsideRootError unless `target` (a path under the output root `root`) stays inside it; return
    the path to open.

    Local paths: the folders are resolved with every existing symlink followed, so a planted folder link
    anywhere between the root and the file is caught before a folder is made or a byte written. The file
    name itself is not followed (a rename replaces a link, and `open_new` refuses one)."""
    proto, path = _split(target)
    _, root_path = resolved_root(root)
    if proto == "file":
        parent = os.path.realpath(os.path.dirname(path))
        if not _within(parent, root_path):
            raise OutsideRootError(f"refusing to write {target}: its folder resolves to {parent}, outside the "
                                   f"output root {root_path} (a symlink inside the output root?)")
        return os.path.join(parent, os.path.basename(path))
    # Store keys: a leading "/" carries no meaning (fsspec's memory:// writes one, s3:// none).
    clean = posixpath.normpath(path).lstrip("/")
    if not _within(clean, root_path.lstrip("/")):
        raise OutsideRootError(f"refusing to write {target}: outside the output root {root}")
    return str(target)


# Config fields that name roots a command reads (never writes): checked against its `output`.
READ_FIELDS = ("input", "data", "reference", "images", "models", "weights_dir")


def read_roots(cfg) -> dict[str, str]:
    """The input roots of a job config: its READ_FIELDS that are set, and evaluate's probe groups."""
    roots = {name: getattr(cfg, name) for name in READ_FIELDS if getattr(cfg, name, None)}
    for group, root in (getattr(cfg, "mismatch_groups", None) or {}).items():
        roots[f"mismatch group {group!r}"] = root
    return roots
