"""How a stage's output becomes visible: staged file, durable row, then the final name.

The protocol, for every output file of a stage (the image stage's write tasks, per-identity protections):

    1. the worker writes the bytes to `<final>.tmp-<run_id>` in the same folder (fsync'd on local disks);
    2. the driver appends the rows of a batch of such files to the manifest (one durable Parquet part);
    3. only then the driver renames each staged file to its final name (atomic on a local disk; a
       server-side copy on object stores).

So a file under its final name always has a durable row that describes it, whatever moment a run is
killed at:
    killed before 2: the staged file has no row. The next run removes it (the old output, if any, is
                     untouched and still matches its old row).
    killed between 2 and 3: the row is in the manifest, the file is still staged. The next run finishes
                     the rename ("rolled forward"), since the row names this run and the staged file's
                     size matches it.
    killed during 3: some files renamed, the rest rolled forward on the next run.
`recover` runs at the start of every stage; its counts appear in the stage summary. The layout lister
skips staged names (`.tmp-`), so a half-finished run never feeds a downstream stage.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from raypdm.data.roots import OutsideRootError, check_inside
from raypdm.data.uri import fs_and_path, to_uri

STAGED_MARK = ".tmp-"

__all__ = ["STAGED_MARK", "Recovery", "staged_uri", "write_staged", "publish", "recover", "discard_output", "discard_stale"]


def staged_uri(final_uri: str, run_id: str) -> str:
    """Where run `run_id` stages the file that becomes `final_uri` (same folder: the rename stays atomic)."""
    return f"{final_uri}{STAGED_MARK}{run_id}"


def write_staged(final_uri: str, data: bytes, run_id: str, root: str | None = None) -> None:
    """Write `data` to the staged name of `final_uri`, durably on a local disk (fsync before returning).

    root: the output root; the staged file's folder must resolve inside it (a symlinked folder planted in the
    output root raises OutsideRootError before a folder is made or a byte written; raypdm/data/roots.py).
    Object stores publish a put atomically and durably; the staged object is renamed by `publish`."""
    target = staged_uri(final_uri, run_id)
    fs, path = fs_and_path(target)
    if root is not None and isinstance(fs, LocalFileSystem):
        path = check_inside(root, path)
    elif root is not None:
        check_inside(root, target)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        # O_NOFOLLOW: a link planted under the staged name is not written through.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    else:
        with fs.open(path, "wb") as f:
            f.write(data)


def _parallel(fn, items: list, threads: int) -> list:
    if len(items) <= 1 or threads <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(fn, items))


def publish(rows: pa.Table, run_id: str) -> int:
    """Rename the staged files of `rows` (already durable in the manifest) to their final names.

    Rows without an output (errors, skipped) are ignored. Returns how many files were renamed. A staged
    file that is already gone (renamed by an earlier call) is not an error."""
    if rows.num_rows == 0 or "uri" not in rows.column_names:
        return 0
    cols = rows.select([c for c in ("uri", "error", "run_id") if c in rows.column_names]).to_pylist()
    finals = [r["uri"] for r in cols if r.get("uri") and not r.get("error") and r.get("run_id", run_id) == run_id]
    if not finals:
        return 0
    fs, _ = fs_and_path(finals[0])
    local = isinstance(fs, LocalFileSystem)
    if not local:
        # Object-store back-ends cache listings (s3fs, gcsfs): one taken before these files were staged (the
        # recovery's, a previous stage's in this process) would make them look absent and the move a no-op.
        fs.invalidate_cache()

    def move(final: str) -> int:
        _, src = fs_and_path(staged_uri(final, run_id))
        _, dst = fs_and_path(final)
        try:
            if local:
                os.replace(src, dst)  # atomic; replaces the previous output in one step
            else:
                fs.mv(src, dst)
            return 1
        except FileNotFoundError:
            if fs.exists(dst):  # renamed by an earlier call (a roll-forward, a retried flush)
                return 0
            raise  # neither staged nor final: a row without its file must never be left behind

    if not local:
        # No rename on object stores: a server-side copy, then a delete. All of a flush's copies go out
        # concurrently (fsspec's async back-ends) and its deletes as bulk requests (S3: 1,000 keys each),
        # two round trips per flush instead of two per file. Anything unexpected falls back to file by file.
        srcs = [fs_and_path(staged_uri(f, run_id))[1] for f in finals]
        dsts = [fs_and_path(f)[1] for f in finals]
        try:
            fs.copy(srcs, dsts)
            fs.rm(srcs)
            return len(finals)
        except Exception:  # noqa: BLE001 (e.g. a staged file already moved by an earlier call)
            fs.invalidate_cache()
    return sum(_parallel(move, finals, 1 if local else 16))


def discard_output(final_uri: str, root: str | None = None) -> bool:
    """Remove a final output that no longer has a row describing it (its input now fails). True if removed.
    Nothing outside the output root `root` is ever removed (OutsideRootError)."""
    if root is not None:
        check_inside(root, final_uri)
    fs, path = fs_and_path(final_uri)
    try:
        fs.rm(path)
        return True
    except FileNotFoundError:
        return False


@dataclass
class Recovery:
    """What `recover` found: staged files renamed into place, and staged files removed."""

    rolled_forward: int = 0
    removed: int = 0


def _staged_files(fs, root: str) -> dict[str, int]:
    """path -> size of every staged file under `root` (one recursive listing)."""
    if not fs.exists(root):
        return {}
    found = fs.find(root, detail=True)
    return {p: int(info.get("size") or 0) for p, info in found.items()
            if STAGED_MARK in posixpath.basename(p) and info.get("type", "file") == "file"}


def recover(out_uri: str, latest: Iterable[dict]) -> Recovery:
    """Finish or undo what an interrupted run left staged under `out_uri`.

    `latest` are the manifest's current rows (one per output location). A staged file whose name carries
    the run id of its location's latest row, with that row finished and its `output_bytes` equal to the
    file's size, was committed but not yet renamed: it is renamed now. Every other staged file (no row, an
    older run, a temporary file of a plain atomic write) is removed.
    """
    fs, root = fs_and_path(out_uri)
    fs.invalidate_cache()  # a cached listing (object stores) from before the kill would miss staged files
    staged = _staged_files(fs, root.rstrip("/"))
    result = Recovery()
    if not staged:
        return result
    by_path: dict[str, dict] = {}
    for row in latest:
        if row.get("uri"):
            by_path[fs_and_path(row["uri"])[1]] = row
    for path, size in sorted(staged.items()):
        final, _, run_id = path.rpartition(STAGED_MARK)
        try:
            check_inside(out_uri, to_uri(fs, path))  # a URI: a store's bare key would be read as a local path
        except OutsideRootError:  # reached through a symlinked folder: not ours to move or remove
            continue
        row = by_path.get(final)
        committed = (row is not None and row.get("run_id") == run_id and not row.get("error")
                     and row.get("output_bytes") is not None and int(row["output_bytes"]) == size)
        try:
            if committed:
                fs.mv(path, final)
                result.rolled_forward += 1
            else:
                fs.rm(path)
                result.removed += 1
        except FileNotFoundError:  # another process got there first
            pass
    return result


def discard_stale(out_uri: str, rows: pa.Table) -> None:
    """An input that now fails leaves no output behind: the file an earlier run wrote for it would
    otherwise sit in the folder under an error row (and a downstream stage would read it)."""
    from raypdm.data.layout import ImageRef, name_problem, output_uri

    for row in rows.select(["identity", "split", "name", "error"]).to_pylist():
        if row["error"] is None:
            continue
        try:
            # output_uri refuses names that are not safe components: nothing outside the root is touched.
            ident, split, name = row["identity"], row["split"], row["name"]
            target = output_uri(out_uri, ImageRef(ident, split, name, "", name_problem(ident, split, name)))
            discard_output(target, out_uri)
        except Exception:  # an invalid name has no output location; a vanished file is fine
            pass
