"""`report_index.json`: what a run directory's HTML report shows, written by the pipelines.

A pipeline that wants something in the report builds a `ReportIndex` (image grids per identity, tables,
plots, key facts) and calls `ReportIndex.write(run_dir)`; `raypdm.report.write_report(run_dir)` reads it and
renders one self-contained HTML file. URIs inside the index may be absolute (any fsspec URI) or relative
to `run_dir`, so a run directory can be copied or synced to a bucket and still render.

Several pipelines writing into one run directory combine their parts with `ReportIndex.merged` (later parts
replace a grid of the same identity and a table or plot of the same title) before writing.
"""

from __future__ import annotations

import datetime as _dt
import json
import posixpath
from pathlib import PurePosixPath

from pydantic import Field, ValidationError, model_validator

from raypdm.config import StrictModel
from raypdm.data.uri import exists, join, read_bytes, write_bytes

__all__ = ["INDEX_NAME", "GridRow", "ImageGrid", "PlotRef", "ReportIndex", "TableRef", "resolve_uri"]

INDEX_NAME = "report_index.json"
TABLE_SUFFIXES = (".html", ".htm", ".md", ".parquet")
PLOT_SUFFIXES = (".png", ".jpg", ".jpeg")


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def resolve_uri(run_dir: str, uri: str) -> str:
    """An index URI as something fsspec opens: absolute URIs and paths as they are, others under run_dir."""
    uri = str(uri)
    if not ("://" in uri or uri.startswith("/")):
        uri = join(str(run_dir), uri)
    # "a/../b" works on a local disk but not as an object-store key or a memory:// path: normalise.
    proto, sep, rest = uri.rpartition("://")
    if any(part in (".", "..") for part in rest.split("/")):
        lead = "/" if rest.startswith("/") else ""
        rest = lead + posixpath.normpath(rest).lstrip("/")
    return f"{proto}{sep}{rest}"


def _suffix(uri: str) -> str:
    return PurePosixPath(uri.split("?", 1)[0]).suffix.lower()


class GridRow(StrictModel):
    label: str
    images: list[str | None] = Field(description="image URIs (fsspec, or relative to run_dir); None = missing cell")


class ImageGrid(StrictModel):
    identity: str
    columns: list[str] = Field(description="column headers, e.g. clean / protected / purified / generated")
    rows: list[GridRow] = Field(default_factory=list)

    @model_validator(mode="after")
    def _row_widths(self) -> ImageGrid:
        for row in self.rows:
            if len(row.images) != len(self.columns):
                raise ValueError(
                    f"grid {self.identity!r}, row {row.label!r}: {len(row.images)} images for "
                    f"{len(self.columns)} columns {self.columns}"
                )
        return self


class TableRef(StrictModel):
    title: str
    uri: str = Field(description="a .html fragment, a .md file or a .parquet file (rendered with pandas)")
    caption: str = ""

    @model_validator(mode="after")
    def _known_kind(self) -> TableRef:
        if _suffix(self.uri) not in TABLE_SUFFIXES:
            raise ValueError(f"table {self.title!r}: uri {self.uri!r} must end in one of {TABLE_SUFFIXES}")
        return self


class PlotRef(StrictModel):
    title: str
    uri: str = Field(description="a PNG (JPEG accepted too)")
    caption: str = ""

    @model_validator(mode="after")
    def _known_kind(self) -> PlotRef:
        if _suffix(self.uri) not in PLOT_SUFFIXES:
            raise ValueError(f"plot {self.title!r}: uri {self.uri!r} must end in one of {PLOT_SUFFIXES}")
        return self


def _replace_by(old: list, new: list, key) -> list:
    keys = {key(x) for x in new}
    return [x for x in old if key(x) not in keys] + list(new)


class ReportIndex(StrictModel):
    title: str
    created: str = Field(default_factory=_now, description="ISO 8601 time the run (or this index) was made")
    facts: dict[str, str] = Field(default_factory=dict, description="key/value table at the top of the report")
    grids: list[ImageGrid] = Field(default_factory=list)
    tables: list[TableRef] = Field(default_factory=list)
    plots: list[PlotRef] = Field(default_factory=list)

    def write(self, run_dir: str) -> str:
        """Write `<run_dir>/report_index.json` atomically; returns its URI."""
        uri = join(str(run_dir), INDEX_NAME)
        write_bytes(uri, self.model_dump_json(indent=2).encode("utf-8"))
        return uri

    @classmethod
    def read(cls, run_dir: str) -> ReportIndex:
        uri = join(str(run_dir), INDEX_NAME)
        if not exists(uri):
            raise FileNotFoundError(f"{uri}: no report index; the pipelines write it (ReportIndex.write)")
        raw = read_bytes(uri)
        try:
            json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"{uri}: not valid JSON: {exc}") from None
        try:
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            raise ValueError(f"{uri}: not a report index:\n{exc}") from None

    def merged(self, other: ReportIndex) -> ReportIndex:
        """This index with `other` added: other's title/created/facts win, grids are replaced per
        identity, tables and plots per title (a re-run updates its parts instead of doubling them)."""
        return ReportIndex(
            title=other.title,
            created=other.created,
            facts={**self.facts, **other.facts},
            grids=_replace_by(self.grids, other.grids, lambda g: g.identity),
            tables=_replace_by(self.tables, other.tables, lambda t: t.title),
            plots=_replace_by(self.plots, other.plots, lambda p: p.title),
        )

    def relative_to(self, run_dir: str) -> ReportIndex:
        """A copy whose URIs under `run_dir` are relative, so the run directory can move."""
        root = str(run_dir).rstrip("/") + "/"

        def rel(uri: str | None) -> str | None:
            if uri is None or not uri.startswith(root):
                return uri
            return posixpath.normpath(uri[len(root):])

        data = self.model_copy(deep=True)
        for grid in data.grids:
            for row in grid.rows:
                row.images = [rel(u) for u in row.images]
        for item in [*data.tables, *data.plots]:
            item.uri = rel(item.uri)
        return data
