"""One self-contained HTML report per run directory, readable offline and from a bucket.

`write_report(run_dir)` reads `<run_dir>/report_index.json` (`raypdm.report.index.ReportIndex`) and writes
`<run_dir>/report.html`: the run's facts, per identity a grid of images (clean / protected / purified /
generated, whatever columns the index names), the tables, and the plots (latent mismatch, benchmarks).

Self-contained means: every image is inlined as a base64 `data:` URI, the CSS is inline, there is no
JavaScript and no external URL, so the file opens from a laptop, an e-mail attachment or an object-store
console alike. To keep a report of hundreds of images small, grid images are thumbnails of at most 256 px
on the long side, each stored as JPEG (quality 85), or as PNG where that is smaller (flat images of at
most 4096 colours are tried both ways; photos always come out smaller as JPEG); plots keep up to 1600 px
and stay PNG so their text stays sharp. Thumbnails are for looking at, not for measuring: every number in
the report comes from the full-resolution scores.

Robustness: an image, table or plot that is missing or unreadable renders as a labelled empty cell or
placeholder and is listed under "Warnings" at the bottom; the report itself never fails for it. A `None`
cell in the index is an image the writer knows does not exist and renders as an empty cell without a
warning. Every text (identity names and labels are user data) is HTML-escaped; `.html` table fragments are
passed through an allow-list of table tags and attributes, so a fragment cannot bring scripts, styles or
external references into the report. `.md` tables are converted from pipe tables; `.parquet` tables are
rendered with pandas (first `max_table_rows` rows).
"""

from __future__ import annotations

import base64
import html
import io
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from html.parser import HTMLParser

import pandas as pd
from PIL import Image, ImageOps

from raypdm.data.decode import decode_image
from raypdm.data.uri import join, read_bytes, write_bytes
from raypdm.report.index import ImageGrid, PlotRef, ReportIndex, TableRef, resolve_uri

log = logging.getLogger(__name__)

__all__ = ["PLOT_PX", "REPORT_NAME", "THUMB_PX", "render_report", "write_report"]

REPORT_NAME = "report.html"
THUMB_PX = 256
PLOT_PX = 1600
JPEG_QUALITY = 85
FLAT_COLOURS = 4096  # at most this many distinct colours: also try PNG
MAX_TABLE_ROWS = 500


def _esc(text: object) -> str:
    return html.escape("" if text is None else str(text), quote=True)


# ---- images -------------------------------------------------------------------------------------------


@dataclass
class _Inlined:
    src: str  # data: URI
    width: int
    height: int


def _open_rgb(data: bytes) -> Image.Image:
    # decode_image checks format and size (decompression bombs) and drops alpha; transparent pixels of a
    # plot or a cut-out face would then show whatever colour they store, so those are put on white.
    arr = decode_image(data)
    with Image.open(io.BytesIO(data)) as probe:
        if probe.mode not in ("RGBA", "LA", "PA") and "transparency" not in probe.info:
            return Image.fromarray(arr)
        rgba = ImageOps.exif_transpose(probe).convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _inline_image(uri: str, max_side: int, allow_jpeg: bool) -> _Inlined:
    img = _open_rgb(read_bytes(uri))
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    candidates: list[tuple[bytes, str]] = []
    # A photo-like thumbnail (thousands of colours) is always smaller as JPEG, and its PNG encoding costs
    # 40x more time: only flat images (plots, masks, synthetic data) try PNG.
    if not allow_jpeg or img.getcolors(maxcolors=FLAT_COLOURS) is not None:
        png = io.BytesIO()
        img.save(png, format="PNG", optimize=True)
        candidates.append((png.getvalue(), "image/png"))
    if allow_jpeg:
        jpg = io.BytesIO()
        img.save(jpg, format="JPEG", quality=JPEG_QUALITY)
        candidates.append((jpg.getvalue(), "image/jpeg"))
    best, mime = min(candidates, key=lambda c: len(c[0]))
    return _Inlined(f"data:{mime};base64,{base64.b64encode(best).decode('ascii')}", img.width, img.height)


def _load_all(uris: list[str], max_side: int, allow_jpeg: bool, workers: int) -> dict[str, _Inlined | str]:
    """URI -> inlined image, or the reason it could not be read (a string). Reads run in threads: on an
    object store each read is a round trip."""
    def one(uri: str) -> _Inlined | str:
        try:
            return _inline_image(uri, max_side, allow_jpeg)
        except FileNotFoundError:
            return "file not found"
        except Exception as exc:  # noqa: BLE001 - any unreadable file becomes a warning, never a failed report
            return f"{type(exc).__name__}: {exc}"

    unique = list(dict.fromkeys(uris))
    if not unique:
        return {}
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(unique)))) as pool:
        return dict(zip(unique, pool.map(one, unique)))


# ---- tables -------------------------------------------------------------------------------------------

_ALLOWED_TAGS = {
    "table", "thead", "tbody", "tfoot", "tr", "th", "td", "caption", "colgroup", "col",
    "b", "strong", "i", "em", "br", "sup", "sub", "span", "p", "code", "small",
}
_VOID_TAGS = {"br", "col"}
# Content of these is dropped entirely, not shown as text.
_DROP_CONTENT = {"script", "style", "iframe", "object", "embed", "template", "svg", "math", "noscript", "head", "title"}
_ALLOWED_ATTRS = {"colspan", "rowspan", "class", "scope", "align", "title"}


class _FragmentSanitizer(HTMLParser):
    """Keeps table markup and text; drops every other tag, every other attribute, and script/style content."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.open: list[str] = []
        self.dropping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _DROP_CONTENT:
            self.dropping += 1
            return
        if self.dropping or tag not in _ALLOWED_TAGS:
            return
        kept = []
        for name, value in attrs:
            if name not in _ALLOWED_ATTRS or value is None:
                continue
            if name in ("colspan", "rowspan") and not value.isdigit():
                continue
            kept.append(f' {name}="{_esc(value)}"')
        self.out.append(f"<{tag}{''.join(kept)}>")
        if tag not in _VOID_TAGS:
            self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in _DROP_CONTENT:
            self.dropping = max(0, self.dropping - 1)
            return
        if self.dropping or tag not in self.open:
            return
        while self.open:
            top = self.open.pop()
            self.out.append(f"</{top}>")
            if top == tag:
                break

    def handle_data(self, data: str) -> None:
        if not self.dropping:
            self.out.append(_esc(data))

    def result(self) -> str:
        self.close()
        return "".join(self.out) + "".join(f"</{t}>" for t in reversed(self.open))


def sanitize_fragment(fragment: str) -> str:
    parser = _FragmentSanitizer()
    parser.feed(fragment)
    return parser.result()


def _split_md_row(line: str) -> list[str]:
    cells, buf, i = [], [], 0
    line = line.strip()
    while i < len(line):
        ch = line[i]
        if ch == "\\" and i + 1 < len(line):
            buf.append(line[i + 1])
            i += 2
            continue
        if ch == "|":
            cells.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
        i += 1
    cells.append("".join(buf))
    if line.startswith("|"):
        cells = cells[1:]
    if line.endswith("|") and not line.endswith("\\|"):
        cells = cells[:-1]
    return [c.strip() for c in cells]


_MD_SEPARATOR = re.compile(r"^\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")


def markdown_to_html(text: str) -> str:
    """Pipe tables become `<table>`s, other non-empty lines paragraphs; all text escaped."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip().startswith("|") and i + 1 < len(lines) and _MD_SEPARATOR.match(lines[i + 1].strip()):
            header = _split_md_row(line)
            body = []
            i += 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                body.append(_split_md_row(lines[i]))
                i += 1
            rows = ["<tr>" + "".join(f'<th scope="col">{_esc(c)}</th>' for c in header) + "</tr>"]
            rows += ["<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in body]
            out.append('<table class="raypdm-table"><thead>' + rows[0] + "</thead><tbody>" + "".join(rows[1:])
                       + "</tbody></table>")
            continue
        if line.strip():
            out.append(f"<p>{_esc(line.strip().lstrip('#').strip())}</p>")
        i += 1
    return "\n".join(out)


def _render_table(ref: TableRef, run_dir: str, warnings: list[str], max_rows: int) -> str:
    from raypdm.metrics.tables import to_html

    uri = resolve_uri(run_dir, ref.uri)
    try:
        data = read_bytes(uri)
        suffix = uri.rsplit(".", 1)[-1].lower()
        if suffix == "parquet":
            df = pd.read_parquet(io.BytesIO(data))
            body = to_html(df.head(max_rows))
            if len(df) > max_rows:
                body += f'<p class="note">first {max_rows} of {len(df)} rows</p>'
            return body
        text = data.decode("utf-8")
        return markdown_to_html(text) if suffix == "md" else sanitize_fragment(text)
    except FileNotFoundError:
        reason = "file not found"
    except Exception as exc:  # noqa: BLE001 - a bad table is a warning, the rest of the report still renders
        reason = f"{type(exc).__name__}: {exc}"
    warnings.append(f"table {ref.title!r}: {ref.uri}: {reason}")
    return f'<div class="missing-block">table not available: {_esc(reason)}</div>'


# ---- page ---------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1b1b1b;background:#fff}
h1{margin:0 0 4px}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:32px}
h3{margin:18px 0 6px}.created,.note{color:#666;font-size:0.9em}
table.facts,#tables table{border-collapse:collapse;margin:8px 0;font-size:0.92em}
table.facts th,table.facts td,#tables table th,#tables table td{border:1px solid #ccc;padding:4px 8px;
text-align:left;vertical-align:top}
table.facts th,#tables table thead th{background:#f3f3f3}
#tables table caption{caption-side:bottom;color:#555;font-size:0.9em;padding-top:4px;text-align:left}
table.grid{border-collapse:collapse}
table.grid th{font-weight:600;padding:4px 6px;text-align:center;font-size:0.9em}
table.grid th.row-label{text-align:right;max-width:160px;word-break:break-word}
table.grid td{padding:3px;vertical-align:middle;text-align:center}
table.grid img{display:block;max-width:256px;height:auto}
.missing{width:128px;height:128px;display:flex;align-items:center;justify-content:center;flex-direction:column;
border:2px dashed #bbb;color:#888;font-size:0.8em;background:#fafafa;word-break:break-word}
.missing-block{border:2px dashed #bbb;color:#888;padding:12px;background:#fafafa}
figure{margin:12px 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:0.9em}
nav a{margin-right:12px}.warnings li{color:#8a4b00}
"""


@dataclass
class _Page:
    parts: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        self.parts.append(text)


def _grid_html(grid: ImageGrid, number: int, run_dir: str, images: dict[str, _Inlined | str],
               warnings: list[str]) -> str:
    head = "".join(f'<th scope="col">{_esc(c)}</th>' for c in grid.columns)
    rows = []
    for row in grid.rows:
        cells = []
        for column, uri in zip(grid.columns, row.images):
            alt = f"{grid.identity} / {row.label} / {column}"
            if uri is None:
                cells.append(f'<td><div class="missing">no image<br>{_esc(column)}</div></td>')
                continue
            got = images.get(resolve_uri(run_dir, uri))
            if isinstance(got, _Inlined):
                cells.append(f'<td><img src="{got.src}" width="{got.width}" height="{got.height}" '
                             f'alt="{_esc(alt)}" title="{_esc(alt)}"></td>')
            else:
                warnings.append(f"grid {grid.identity!r}, row {row.label!r}, column {column!r}: {uri}: {got}")
                cells.append(f'<td><div class="missing" title="{_esc(uri)}">missing<br>{_esc(column)}</div></td>')
        rows.append(f'<tr><th scope="row" class="row-label">{_esc(row.label)}</th>{"".join(cells)}</tr>')
    return (f'<div class="grid-block" id="grid-{number}"><h3>{_esc(grid.identity)}</h3>'
            f'<table class="grid"><thead><tr><th></th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>')


def _plot_html(plot: PlotRef, run_dir: str, images: dict[str, _Inlined | str], warnings: list[str]) -> str:
    got = images.get(resolve_uri(run_dir, plot.uri))
    caption = f"<figcaption>{_esc(plot.caption)}</figcaption>" if plot.caption else ""
    if isinstance(got, _Inlined):
        body = f'<img src="{got.src}" width="{got.width}" height="{got.height}" alt="{_esc(plot.title)}">'
    else:
        warnings.append(f"plot {plot.title!r}: {plot.uri}: {got}")
        body = f'<div class="missing-block">plot not available: {_esc(got)}</div>'
    return f"<figure><h3>{_esc(plot.title)}</h3>{body}{caption}</figure>"


def render_report(
    index: ReportIndex,
    run_dir: str,
    *,
    thumb_px: int = THUMB_PX,
    plot_px: int = PLOT_PX,
    max_table_rows: int = MAX_TABLE_ROWS,
    workers: int = 8,
) -> tuple[str, list[str]]:
    """The report page for `index` (URIs relative to `run_dir`) and the list of warnings."""
    page = _Page()
    grid_uris = [resolve_uri(run_dir, u) for g in index.grids for r in g.rows for u in r.images if u is not None]
    thumbs = _load_all(grid_uris, thumb_px, allow_jpeg=True, workers=workers)
    plots = _load_all([resolve_uri(run_dir, p.uri) for p in index.plots], plot_px, allow_jpeg=False, workers=workers)

    body = _Page()
    if index.grids:
        body.add('<section id="grids"><h2>Image grids</h2>')
        for i, grid in enumerate(index.grids):
            body.add(_grid_html(grid, i, run_dir, thumbs, page.warnings))
        body.add("</section>")
    if index.tables:
        body.add('<section id="tables"><h2>Tables</h2>')
        for ref in index.tables:
            caption = f"<figcaption>{_esc(ref.caption)}</figcaption>" if ref.caption else ""
            table = _render_table(ref, run_dir, page.warnings, max_table_rows)
            body.add(f'<figure class="table"><h3>{_esc(ref.title)}</h3>{table}{caption}</figure>')
        body.add("</section>")
    if index.plots:
        body.add('<section id="plots"><h2>Plots</h2>')
        for plot in index.plots:
            body.add(_plot_html(plot, run_dir, plots, page.warnings))
        body.add("</section>")

    page.add(f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
             f'<meta name="viewport" content="width=device-width, initial-scale=1">'
             f"<title>{_esc(index.title)}</title><style>{_CSS}</style></head><body>")
    page.add(f"<header><h1>{_esc(index.title)}</h1><p class=\"created\">created {_esc(index.created)}</p>")
    if index.facts:
        rows = "".join(f'<tr><th scope="row">{_esc(k)}</th><td>{_esc(v)}</td></tr>' for k, v in index.facts.items())
        page.add(f'<table class="facts"><tbody>{rows}</tbody></table>')
    links = [(sid, name) for sid, name, present in [
        ("grids", f"Image grids ({len(index.grids)})", index.grids), ("tables", "Tables", index.tables),
        ("plots", "Plots", index.plots), ("warnings", f"Warnings ({len(page.warnings)})", page.warnings),
    ] if present]
    if links:
        page.add("<nav>" + "".join(f'<a href="#{sid}">{_esc(name)}</a>' for sid, name in links) + "</nav>")
    page.add("</header>")
    page.parts.extend(body.parts)
    page.add('<section id="warnings" class="warnings"><h2>Warnings</h2>')
    if page.warnings:
        page.add("<ul>" + "".join(f"<li>{_esc(w)}</li>" for w in page.warnings) + "</ul>")
    else:
        page.add("<p>none: every image, table and plot was found.</p>")
    page.add("</section></body></html>\n")
    return "".join(page.parts), page.warnings


def write_report(run_dir: str, out_uri: str | None = None, **options) -> str:
    """Render `<run_dir>/report_index.json` into one self-contained HTML file (default
    `<run_dir>/report.html`); returns its URI. Options go to `render_report`."""
    index = ReportIndex.read(run_dir)
    text, warnings = render_report(index, run_dir, **options)
    out = out_uri or join(str(run_dir), REPORT_NAME)
    write_bytes(out, text.encode("utf-8"))
    for w in warnings:
        log.warning("report %s: %s", out, w)
    return out

