"""Paper-style result tables, rendered to Markdown, HTML and Parquet.

Shapes follow the tables of Liu, Chen, Chen, Sun, "Rethinking and Red-Teaming Protective Perturbation in
Personalized Diffusion Models":

- `table1`: rows = methods (purification / defence settings), columns = protection × {IMS, Q}, cells
  "mean ± std" over identities, with a marker ("*") where the Wilcoxon signed-rank test against
  `baseline_method` under the same protection gives p < 0.05. The paper marks its best entries in bold
  instead; a significance marker says more and survives plain Markdown.
- `table2`: rows = purifiers, columns = LPIPS, SSIM, MS-SSIM, PSNR ("mean ± std") and seconds per sample.
- `table4`: the ablation: one row per on/off combination of CodeFormer / SR / CDL (✓/✗ columns), then
  IMS and Q.

Statistics come from `raypdm.metrics.stats`: identities are the unit (mean over an identity's images
first, then mean ± sample std over identities). A frame without an `identity` column (e.g. a throughput
benchmark) treats every row as its own unit. Cells are strings: these tables are for reading; the numbers
themselves stay in the Parquet manifests and summaries.

Markdown is written by hand (pandas' `to_markdown` needs `tabulate`); HTML is a plain `<table>` fragment
with every text escaped, so identity and setting names (user data) cannot inject markup.
"""

from __future__ import annotations

import html
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from raypdm.data.uri import write_bytes
from raypdm.metrics.stats import IDENTITY, format_mean_std, setting_summary, wilcoxon_vs_baseline

__all__ = [
    "best_baseline",
    "METRIC_DIGITS",
    "METRIC_LABELS",
    "MISSING",
    "table1",
    "table2",
    "table4",
    "to_html",
    "to_markdown",
    "write_table",
]

METRIC_LABELS: dict[str, str] = {
    "ims": "IMS", "q": "Q", "fdfr": "FDFR", "lpips": "LPIPS", "ssim": "SSIM", "ms_ssim": "MS-SSIM",
    "psnr": "PSNR", "mismatch": "mismatch", "p_noise": "P(noise)",
}
METRIC_DIGITS: dict[str, int] = {"psnr": 2}
FLAG_LABELS: dict[str, str] = {"codeformer": "CodeFormer", "sr": "SR", "cdl": "CDL"}
MISSING = "—"  # a setting that was not run
ON, OFF = "✓", "✗"
_TRUE = {"1", "true", "yes", "on", "y", "t", ON}
_FALSE = {"0", "false", "no", "off", "n", "f", OFF, ""}


def _label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


def _digits(metric: str, digits: int | None) -> int:
    return digits if digits is not None else METRIC_DIGITS.get(metric, 3)


def _ordered_unique(values: pd.Series) -> list[Any]:
    return list(dict.fromkeys(values.tolist()))


def _scored(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["error"].isna()] if "error" in df.columns else df


def _with_units(df: pd.DataFrame) -> pd.DataFrame:
    """Identities are the statistical unit; without an identity column every row is its own unit."""
    if IDENTITY in df.columns:
        return df
    return df.assign(**{IDENTITY: np.arange(len(df))})


def best_baseline(
    df: pd.DataFrame,
    ours: Sequence[str],
    method_col: str = "method",
    metric: str = "ims",
) -> str | None:
    """The strongest competitor of `ours`: the method, other than ours, with the highest mean `metric`
    over identities and protections (identities first averaged per (method, protection), as Table 1
    does). The paper tests its method against the best baseline, not against doing nothing: beating
    "no defence" says little. None when no other method was scored."""
    scored = _scored(_with_units(df))
    others = scored[~scored[method_col].isin(list(ours))]
    others = others[others[metric].notna()] if metric in others.columns else others.iloc[0:0]
    if not len(others):
        return None
    per_identity = others.groupby([method_col, IDENTITY] + [c for c in ("protection",) if c in others.columns],
                                  dropna=False)[metric].mean()
    means = per_identity.groupby(level=method_col).mean()
    # ties break by name, so the choice does not depend on row order
    return str(sorted(means.items(), key=lambda kv: (-kv[1], str(kv[0])))[0][0])


def table1(
    df: pd.DataFrame,
    method_col: str = "method",
    protection_col: str = "protection",
    metrics: Sequence[str] = ("ims", "q"),
    baseline_method: str | None = None,
    *,
    alpha: float = 0.05,
    marker: str = "*",
    digits: int | None = None,
) -> pd.DataFrame:
    """Paper Table 1: rows = methods, MultiIndex columns (protection, metric label), cells "m ± s[*]"."""
    metrics = list(metrics)
    df = _with_units(df)
    summary = setting_summary(df, [method_col, protection_col], metrics)
    scored = _scored(df)
    methods = _ordered_unique(scored[method_col])
    protections = _ordered_unique(scored[protection_col])
    significant: set[tuple[Any, Any, str]] = set()
    if baseline_method is not None:
        tests = wilcoxon_vs_baseline(df, [method_col, protection_col], metrics, {method_col: baseline_method})
        for r in tests.to_dict("records"):
            if not math.isnan(r["p_value"]) and r["p_value"] < alpha:
                significant.add((r[method_col], r[protection_col], r["metric"]))
    columns = pd.MultiIndex.from_tuples(
        [(p, _label(m)) for p in protections for m in metrics], names=[protection_col, "metric"]
    )
    table = pd.DataFrame(MISSING, index=pd.Index(methods, name=method_col), columns=columns, dtype=object)
    for rec in summary.to_dict("records"):
        method, prot = rec[method_col], rec[protection_col]
        for m in metrics:
            cell = format_mean_std(rec[f"{m}_mean"], rec[f"{m}_std"], _digits(m, digits))
            if (method, prot, m) in significant:
                cell += marker
            table.loc[method, (prot, _label(m))] = cell
    n = sorted(set(summary["n_identities"].tolist()))
    caption = f"mean ± std over identities (n = {', '.join(map(str, n))})"
    if baseline_method is not None:
        caption += (f"; {marker} p < {alpha:g}, Wilcoxon signed-rank test against {baseline_method} under the "
                    "same protection, paired by identity")
    table.attrs["caption"] = caption
    return table


def _format_seconds(v: float) -> str:
    if v is None or pd.isna(v):
        return MISSING
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def table2(
    df: pd.DataFrame,
    purifier_col: str = "purifier",
    metrics: Sequence[str] = ("lpips", "ssim", "ms_ssim", "psnr"),
    seconds_col: str = "seconds",
    *,
    digits: int | None = None,
) -> pd.DataFrame:
    """Paper Table 2: rows = purifiers; LPIPS, SSIM, MS-SSIM, PSNR as "m ± s"; mean seconds per sample.

    The seconds column is the manifests' per-image compute time (a batch's time shared by its images); a
    frame without it gets "—" there.
    """
    metrics = list(metrics)
    df = _with_units(df)
    summary = setting_summary(df, [purifier_col], metrics)
    scored = _scored(df)
    purifiers = _ordered_unique(scored[purifier_col])
    sec_label = "s/sample"
    table = pd.DataFrame(
        MISSING, index=pd.Index(purifiers, name=purifier_col), columns=[*map(_label, metrics), sec_label],
        dtype=object,
    )
    for rec in summary.to_dict("records"):
        for m in metrics:
            table.loc[rec[purifier_col], _label(m)] = format_mean_std(
                rec[f"{m}_mean"], rec[f"{m}_std"], _digits(m, digits)
            )
    if seconds_col in scored.columns:
        seconds = pd.to_numeric(scored[seconds_col], errors="coerce").groupby(scored[purifier_col], sort=False).mean()
        for purifier, v in seconds.items():
            table.loc[purifier, sec_label] = _format_seconds(v)
    n = sorted(set(summary["n_identities"].tolist()))
    unit = "identities" if IDENTITY in df.columns else "images"
    table.attrs["caption"] = (f"mean ± std over {unit} (n = {', '.join(map(str, n))}); "
                              "s/sample: mean compute seconds per image")
    return table


def _as_flag(value: Any, column: str) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)) and not pd.isna(value) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        key = value.strip().lower()
        if key in _TRUE:
            return True
        if key in _FALSE:
            return False
    raise ValueError(f"table4: column {column!r} holds {value!r}, which is not an on/off flag")


def table4(
    df: pd.DataFrame,
    flags: Sequence[str] = ("codeformer", "sr", "cdl"),
    metrics: Sequence[str] = ("ims", "q"),
    *,
    digits: int | None = None,
) -> pd.DataFrame:
    """Paper Table 4 (ablation): one row per on/off combination present, ✓/✗ per flag, then "m ± s".

    Rows go from fewest to most components switched on, so the plain baseline comes first and the full
    method last, as in the paper.
    """
    flags, metrics = list(flags), list(metrics)
    missing = [f for f in flags if f not in df.columns]
    if missing:
        raise KeyError(f"table4: flag column(s) {missing} not in the frame (columns: {list(df.columns)})")
    df = _with_units(df).copy()
    for f in flags:
        df[f] = [_as_flag(v, f) for v in df[f]]
    summary = setting_summary(df, flags, metrics)
    summary["_order"] = [(sum(t), tuple(t)) for t in summary[flags].itertuples(index=False, name=None)]
    summary = summary.sort_values("_order", kind="stable")
    rows = []
    for rec in summary.to_dict("records"):
        row: dict[str, str] = {FLAG_LABELS.get(f, f): ON if rec[f] else OFF for f in flags}
        for m in metrics:
            row[_label(m)] = format_mean_std(rec[f"{m}_mean"], rec[f"{m}_std"], _digits(m, digits))
        rows.append(row)
    table = pd.DataFrame(rows, columns=[*(FLAG_LABELS.get(f, f) for f in flags), *map(_label, metrics)], dtype=object)
    n = sorted(set(summary["n_identities"].tolist()))
    table.attrs["caption"] = f"mean ± std over identities (n = {', '.join(map(str, n))})"
    return table


# ---- rendering ----------------------------------------------------------------------------------------


def _shows_index(table: pd.DataFrame) -> bool:
    # A default 0..n-1 index carries no information (table4's rows are named by their ✓/✗ columns).
    idx = table.index
    return not (isinstance(idx, pd.RangeIndex) and idx.name is None and idx.start == 0 and idx.step == 1)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, tuple):
        return " / ".join(_text(v) for v in value if _text(v))
    return str(value)


def _flat_columns(table: pd.DataFrame) -> list[str]:
    return [_text(c) for c in table.columns]


def _index_header(table: pd.DataFrame) -> str:
    names = [n for n in table.index.names if n is not None]
    return " / ".join(map(str, names))


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub pipe table (MultiIndex column levels joined with " / "), then the caption if any."""
    def cell(v: Any) -> str:
        # A pipe would end the cell and a newline the row; both can arrive in user-given names.
        return _text(v).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")

    with_index = _shows_index(table)
    header = ([_index_header(table)] if with_index else []) + _flat_columns(table)
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for idx, row in zip(table.index, table.itertuples(index=False, name=None)):
        values = ([idx] if with_index else []) + list(row)
        lines.append("| " + " | ".join(cell(v) for v in values) + " |")
    caption = table.attrs.get("caption")
    if caption:
        lines += ["", cell(caption)]
    return "\n".join(lines) + "\n"


def _header_rows(columns: pd.Index) -> list[list[tuple[str, int]]]:
    """Per column level, (label, colspan) runs; a run never crosses a boundary of a higher level."""
    tuples = [c if isinstance(c, tuple) else (c,) for c in columns]
    levels = max((len(t) for t in tuples), default=1)
    rows = []
    for level in range(levels):
        runs: list[tuple[str, int]] = []
        prev = None
        for t in tuples:
            key = t[: level + 1]
            if runs and key == prev:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((_text(t[level]) if level < len(t) else "", 1))
            prev = key
        rows.append(runs)
    return rows


def to_html(table: pd.DataFrame) -> str:
    """A `<table class="raypdm-table">` fragment: grouped header cells for MultiIndex columns, escaped text."""
    def esc(v: Any) -> str:
        return html.escape(_text(v), quote=True)

    with_index = _shows_index(table)
    header_rows = _header_rows(table.columns)
    out = ['<table class="raypdm-table">']
    caption = table.attrs.get("caption")
    if caption:
        out.append(f"<caption>{esc(caption)}</caption>")
    out.append("<thead>")
    for level, runs in enumerate(header_rows):
        cells = []
        if with_index and level == 0:
            span = f' rowspan="{len(header_rows)}"' if len(header_rows) > 1 else ""
            cells.append(f'<th class="index-name"{span}>{esc(_index_header(table))}</th>')
        for label, colspan in runs:
            span = f' colspan="{colspan}"' if colspan > 1 else ""
            cells.append(f'<th scope="col"{span}>{esc(label)}</th>')
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</thead>")
    out.append("<tbody>")
    for idx, row in zip(table.index, table.itertuples(index=False, name=None)):
        cells = [f'<th scope="row">{esc(idx)}</th>'] if with_index else []
        cells += [f"<td>{esc(v)}</td>" for v in row]
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody>")
    out.append("</table>")
    return "\n".join(out) + "\n"


def _parquet_frame(table: pd.DataFrame) -> pd.DataFrame:
    flat = table.copy()
    flat.columns = _flat_columns(table)
    if _shows_index(table):
        if flat.index.nlevels == 1 and flat.index.name is None:
            flat.index = flat.index.rename("index")
        flat = flat.reset_index()
    for c in flat.columns:
        if flat[c].dtype == object:
            # Parquet columns hold one type; table cells are mostly strings already.
            flat[c] = [None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v) for v in flat[c]]
    flat.attrs = {}
    return flat


def write_table(table: pd.DataFrame, out_uri_without_ext: str) -> dict[str, str]:
    """Write `<out>.md`, `<out>.html` (fragment) and `<out>.parquet` (flat columns); returns the URIs."""
    if len(set(_flat_columns(table))) != len(table.columns):
        raise ValueError(
            f"write_table {out_uri_without_ext}: column labels collide once flattened: {_flat_columns(table)}"
        )
    base = str(out_uri_without_ext)
    uris = {"md": f"{base}.md", "html": f"{base}.html", "parquet": f"{base}.parquet"}
    write_bytes(uris["md"], to_markdown(table).encode("utf-8"))
    write_bytes(uris["html"], to_html(table).encode("utf-8"))
    sink = io.BytesIO()
    _parquet_frame(table).to_parquet(sink, index=False)
    write_bytes(uris["parquet"], sink.getvalue())
    return uris
