"""Parquet manifests: one row per input of a stage, error rows included, keyed for resume.

Layout under a stage's output root:
    manifest.parquet          the compacted manifest (one row per key)
    _manifest_parts/*.parquet rows appended while a run streams; folded into manifest.parquet at its end

A row's key is (identity, split, name, input_sha256, config_hash): the same bytes under the same config
are never processed twice, and a changed file or config is processed again (its new row replaces the
old one: the manifest holds one row per output location). Rows that finished, and rows
that failed because of the input itself (`error_kind == "input"`: a corrupt file stays corrupt), count
as done on a re-run. Rows that failed for a passing reason (`error_kind == "runtime"`: an actor died, a
device ran out of memory) are tried again. An interrupted run leaves its parts behind; the next run
reads them, skips what they cover and compacts everything.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
import posixpath
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from raypdm.data.roots import check_inside
from raypdm.data.uri import fs_and_path, join, write_bytes

ERROR_INPUT = "input"
ERROR_RUNTIME = "runtime"

MANIFEST_FIELDS: list[pa.Field] = [
    pa.field("identity", pa.string()),
    pa.field("split", pa.string()),
    pa.field("name", pa.string()),
    pa.field("src_uri", pa.string()),
    pa.field("uri", pa.string()),
    pa.field("input_sha256", pa.string()),
    pa.field("input_bytes", pa.int64()),  # the input's size and modification time when it was read:
    pa.field("input_mtime", pa.float64()),  # a re-run's quick check that the input has not changed
    pa.field("output_sha256", pa.string()),
    pa.field("output_bytes", pa.int64()),  # a re-run checks the output file against it
    pa.field("stage", pa.string()),
    pa.field("config_hash", pa.string()),
    pa.field("seconds", pa.float64()),
    pa.field("error", pa.string()),
    pa.field("error_kind", pa.string()),
    pa.field("run_id", pa.string()),
]
MANIFEST_SCHEMA = pa.schema(MANIFEST_FIELDS)
MANIFEST_COLUMNS = [f.name for f in MANIFEST_FIELDS]

__all__ = [
    "ERROR_INPUT",
    "ERROR_RUNTIME",
    "MANIFEST_SCHEMA",
    "MANIFEST_COLUMNS",
    "row_key",
    "conform",
    "Manifest",
    "current_run_id",
    "new_run_id",
    "run_scope",
    "in_run_scope",
]


# ------------------------------------------------------------------------------------------ run ids
_RUN_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("raypdm_run_id", default=None)
_PART_SEQ = itertools.count()


def new_run_id() -> str:
    """Sortable to the microsecond: parts are read in name order and a later run's rows must win, also when
    two runs start within one second (a re-run right after a kill)."""
    now = datetime.now(timezone.utc)
    return f"{now:%Y%m%dT%H%M%S%f}Z-{uuid.uuid4().hex[:6]}"


def current_run_id() -> str | None:
    return _RUN_ID.get()


@contextlib.contextmanager
def run_scope() -> Iterator[str]:
    """One run id for everything written inside (every stage of a command, its config.yaml); an outer
    scope's id is kept, so a red-team run's stages share the command's id."""
    outer = _RUN_ID.get()
    if outer is not None:
        yield outer
        return
    token = _RUN_ID.set(new_run_id())
    try:
        yield _RUN_ID.get()
    finally:
        _RUN_ID.reset(token)


def in_run_scope(fn):
    """Decorate a command's entry point (its first argument a config, or a list of them): everything it
    writes shares one run id (see `run_scope`), and it holds the lock on each config's `output` root while it
    runs (raypdm/data/lock.py; nested inside a root this process holds, it takes none)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from raypdm.data.lock import hold_outputs, outputs_of

        with run_scope(), hold_outputs(outputs_of(args[0]) if args else []):
            return fn(*args, **kwargs)

    return wrapper


def row_key(identity: str, split: str, name: str, input_sha256: str | None, config_hash: str) -> str:
    return f"{identity}/{split}/{name}|{input_sha256 or ''}|{config_hash}"


def _cast_extra(col, want: pa.DataType):
    """A stage column to its declared type: 1.0/0.0 flags to bool, NaN to null (no NaN in a bool or an int)."""
    import pyarrow.compute as pc

    if col.type == want:
        return col
    if pa.types.is_null(col.type):
        return col.cast(want)
    if pa.types.is_floating(col.type) and (pa.types.is_boolean(want) or pa.types.is_integer(want)):
        col = pc.if_else(pc.is_nan(col), pa.scalar(None, col.type), col)
        return pc.not_equal(col, 0) if pa.types.is_boolean(want) else col.cast(want)
    return col.cast(want)


def conform(table: pa.Table, kind: str | None = None) -> pa.Table:
    """Put the base columns first with their declared types; keep any extra stage columns after them, each
    with the type `kind`'s declaration gives it (raypdm/data/schemas.py), and say the kind in the metadata."""
    from raypdm.data.schemas import KIND_KEY, declared_type

    kind = kind or kind_of(table.schema)
    cols, fields = [], []
    for f in MANIFEST_FIELDS:
        if f.name in table.column_names:
            col = table.column(f.name)
            cols.append(col.cast(f.type) if col.type != f.type else col)
        else:
            cols.append(pa.nulls(table.num_rows, f.type))
        fields.append(f)
    for name in table.column_names:
        if name not in MANIFEST_COLUMNS:
            col = table.column(name)
            want = declared_type(kind, name)
            if want is not None:
                col = _cast_extra(col, want)
            elif pa.types.is_null(col.type):
                col = col.cast(pa.string())  # an undeclared label column with nothing in it yet
            cols.append(col)
            fields.append(pa.field(name, col.type))
    return pa.Table.from_arrays(cols, schema=pa.schema(fields, metadata={KIND_KEY: kind.encode()} if kind else None))


def kind_of(schema: pa.Schema) -> str | None:
    from raypdm.data.schemas import kind_of as _kind_of

    return _kind_of(schema)


class Manifest:
    """The manifest of one stage output root."""

    FILE = "manifest.parquet"
    PARTS = "_manifest_parts"

    def __init__(self, out_uri: str, kind: str | None = None):
        """kind: which declared schema the rows follow (raypdm/data/schemas.py); None when only reading."""
        self.out_uri = str(out_uri)
        self.kind = kind
        self.fs, self.root = fs_and_path(self.out_uri)
        self.run_id = current_run_id() or new_run_id()

    # -- reading -----------------------------------------------------------------------------
    def _files(self) -> list[str]:
        files = []
        main = posixpath.join(self.root, self.FILE)
        if self.fs.exists(main):
            files.append(main)
        parts = posixpath.join(self.root, self.PARTS)
        if self.fs.exists(parts):
            files += sorted(p for p in self.fs.ls(parts, detail=False) if p.endswith(".parquet"))
        return files

    def read(self) -> pa.Table:
        """Every row, deduplicated by key (a finished row beats an error row, a later row an earlier)."""
        tables = []
        for path in self._files():
            with self.fs.open(path, "rb") as f:
                tables.append(conform(pq.read_table(f), self.kind))
        if not tables:
            return MANIFEST_SCHEMA.empty_table()
        table = pa.concat_tables(tables, promote_options="permissive")
        return conform(_dedupe(table), self.kind or kind_of(tables[0].schema))

    def done_keys(self) -> set[str]:
        table = self.read()
        if table.num_rows == 0:
            return set()
        done = set()
        for row in table.select(["identity", "split", "name", "input_sha256", "config_hash", "error_kind"]).to_pylist():
            if row["error_kind"] in (None, ERROR_INPUT):
                done.add(row_key(row["identity"], row["split"], row["name"], row["input_sha256"], row["config_hash"]))
        return done

    # -- writing -----------------------------------------------------------------------------
    def append(self, rows: pa.Table | Iterable[dict]) -> int:
        """Persist rows now (one part file), so an interrupted run keeps them."""
        table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(list(rows))
        if table.num_rows == 0:
            return 0
        table = self.stamp(table)
        # Process-wide sequence: two Manifest objects of one run on one folder never write the same part name.
        name = f"part-{self.run_id}-{next(_PART_SEQ):06d}.parquet"
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        target = join(self.out_uri, self.PARTS, name)
        check_inside(self.out_uri, target)  # a planted `_manifest_parts` link is not written through
        write_bytes(target, sink.getvalue().to_pybytes())
        return table.num_rows

    def stamp(self, table: pa.Table) -> pa.Table:
        """`table` conformed, with this run's id wherever a row has none."""
        import pyarrow.compute as pc

        table = conform(table, self.kind)
        i = table.column_names.index("run_id")
        return table.set_column(i, "run_id", pc.fill_null(table.column(i), pa.scalar(self.run_id, pa.string())))

    def compact(self) -> pa.Table:
        """Fold parts into manifest.parquet (written atomically), then remove the parts."""
        parts = [p for p in self._files() if posixpath.basename(posixpath.dirname(p)) == self.PARTS]
        table = self.read()
        if parts or not self.fs.exists(posixpath.join(self.root, self.FILE)):
            sink = pa.BufferOutputStream()
            pq.write_table(table.sort_by([("identity", "ascending"), ("split", "ascending"), ("name", "ascending")]), sink)
            target = join(self.out_uri, self.FILE)
            check_inside(self.out_uri, target)
            write_bytes(target, sink.getvalue().to_pybytes())
            for p in parts:
                self.fs.rm(p)
        return table


def _dedupe(table: pa.Table) -> pa.Table:
    """One row per output location (identity, split, name): the manifest describes the folder as it is.

    Later rows win (a changed file or config replaced the output), except that an error never replaces
    a finished row of the same key (a retried row that failed again keeps its earlier success).
    """
    rows = table.select(["identity", "split", "name", "input_sha256", "config_hash", "error"]).to_pylist()
    best: dict[tuple[str, str, str], int] = {}
    for i, row in enumerate(rows):
        loc = (row["identity"], row["split"], row["name"])
        j = best.get(loc)
        if j is not None:
            cur = rows[j]
            same_key = (cur["input_sha256"], cur["config_hash"]) == (row["input_sha256"], row["config_hash"])
            if same_key and cur["error"] is None and row["error"] is not None:
                continue
        best[loc] = i
    keep = sorted(best.values())
    if len(keep) == table.num_rows:
        return table
    return table.take(pa.array(keep, pa.int64()))
