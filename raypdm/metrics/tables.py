"""Paper-style result tables, rendered to Markdown, HTML and Parquet.

Shapes follow the tables of Liu, Chen, Chen, Sun, "Rethinking and Red-Teaming Protective Perturbation in
Personalized Diffusion Models":

- `table1`: rows = methods (purification / defence settings), columns = protection × {IMS, Q}, cells
  "mean ± std", with a marker ("*") on a method under test where a one-sided Wilcoxon signed-rank test
  gives p ≤ 0.01 against *each* baseline under the same protection (the paper: "significant improvement
  over the baselines"). The paper marks its best entries in bold too; the marker survives plain Markdown.
- `table2`: rows = purifiers, columns = LPIPS, SSIM, MS-SSIM, PSNR ("mean ± std") and seconds per sample.
- `table4`: the ablation: one row per on/off combination of CodeFormer / SR / CDL (✓/✗ columns), then
  IMS and Q.

Statistics come from `raypdm.metrics.stats`. The unit is the paper's by default: every scored image is an
observation (means and spreads over identities × images, App. A.1; tests paired by identity, prompt and
seed); ``unit="identity"`` averages each identity first. A frame without an `identity` column (e.g. a
throughput benchmark) treats every row as its own unit. Cells are strings: these tables are for reading;
the numbers themselves stay in the Parquet manifests and summaries.

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
from raypdm.metrics.stats import (
    IDENTITY,
    OBSERVATION_KEYS,
    Unit,
    format_mean_std,
    setting_summary,
    wilcoxon_vs_baseline,
)

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


def _with_units(df: pd.DataFrame, settings: Sequence[str] = (), pair_on: Sequence[str] = OBSERVATION_KEYS
                ) -> pd.DataFrame:
    """Without an identity column every row is its own unit. A frame without the observation keys (one
    built by hand, a benchmark's) numbers each identity's rows per setting: its k-th image under one
    setting pairs with its k-th under another."""
    if IDENTITY not in df.columns:
        df = df.assign(**{IDENTITY: np.arange(len(df))})
    missing = [k for k in pair_on if k not in df.columns]
    if missing:
        position = df.groupby([*settings, IDENTITY], sort=False, dropna=False).cumcount()
        df = df.assign(**{k: position for k in missing})
    return df


# Columns that tell observations apart besides identity, prompt and image: the same generated file name
# under another protection, training seed or method (two methods can share an ablation row) is another
# observation, never averaged with it.
CONTEXT = ("protection", "method", "seed")


def _observation_keys(df: pd.DataFrame, settings: Sequence[str], pair_on: Sequence[str]) -> list[str]:
    return [*pair_on, *(c for c in CONTEXT if c in df.columns and c not in settings and c not in pair_on)]


def _unit_caption(unit: Unit, summary: pd.DataFrame) -> str:
    n_id = sorted(set(summary["n_identities"].tolist()))
    if unit == "identity":
        return f"mean ± std over identities (n = {', '.join(map(str, n_id))})"
    n = sorted(set(summary["n_units"].tolist()))
    return (f"mean ± std over identities × images (App. A.1; {', '.join(map(str, n_id))} identities, "
            f"n = {', '.join(map(str, n))})")


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
    baselines: str | Sequence[str] | None = None,
    *,
    ours: Sequence[str] | None = None,
    unit: Unit = "observation",
    pair_on: Sequence[str] = OBSERVATION_KEYS,
    alternative: str = "improvement",
    alpha: float = 0.01,
    marker: str = "*",
    digits: int | None = None,
) -> pd.DataFrame:
    """Paper Table 1: rows = methods, MultiIndex columns (protection, metric label), cells "m ± s[*]".

    `baselines`: the methods a marked entry must beat. A list: a method under test (`ours`; by default
    every method not in the list) is marked where p ≤ `alpha` against *each* listed baseline present under
    that protection. One name: every other method is tested against it alone. None: no tests, no marks.
    The tests' rows, p-values included, are in ``table.attrs["tests"]``."""
    metrics = list(metrics)
    df = _with_units(df, [method_col, protection_col], pair_on)
    pair_on = _observation_keys(df, [method_col, protection_col], pair_on)
    summary = setting_summary(df, [method_col, protection_col], metrics, unit=unit, pair_on=pair_on)
    scored = _scored(df)
    methods = _ordered_unique(scored[method_col])
    protections = _ordered_unique(scored[protection_col])
    if isinstance(baselines, str):
        base_list, tested = [baselines], [m for m in methods if m != baselines]
    else:
        base_list = list(baselines or [])
        tested = [m for m in (ours if ours is not None else methods) if m not in base_list and m in methods]
    base_list = [b for b in base_list if b in methods]
    # (method, protection, metric) -> p-values against each baseline present under that protection
    pvalues: dict[tuple[Any, Any, str], list[float]] = {}
    frames = []
    for b in base_list:
        tests = wilcoxon_vs_baseline(df, [method_col, protection_col], metrics, {method_col: b}, unit=unit,
                                     pair_on=pair_on, alternative=alternative, alpha=alpha)
        tests = tests[tests[method_col].isin(tested)].assign(baseline=b)
        frames.append(tests)
        for r in tests.to_dict("records"):
            if not r["note"].startswith("no baseline rows"):
                pvalues.setdefault((r[method_col], r[protection_col], r["metric"]), []).append(r["p_value"])
    significant = {k for k, ps in pvalues.items() if ps and all(not math.isnan(p) and p <= alpha for p in ps)}
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
    caption = _unit_caption(unit, summary)
    if base_list and tested:
        side = "one-sided (improvement)" if alternative == "improvement" else alternative
        paired = "identity" if unit == "identity" else "identity, prompt and seed"
        against = (f"each of {', '.join(base_list)}" if len(base_list) > 1 else base_list[0])
        caption += (f"; {marker} p ≤ {alpha:g}, {side} Wilcoxon signed-rank test against {against} under the "
                    f"same protection, paired by {paired}")
    table.attrs["caption"] = caption
    table.attrs["tests"] = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
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
    unit: Unit = "observation",
    digits: int | None = None,
) -> pd.DataFrame:
    """Paper Table 2: rows = purifiers; LPIPS, SSIM, MS-SSIM, PSNR as "m ± s"; mean seconds per sample.

    The seconds column is the manifests' per-image compute time (a batch's time shared by its images); a
    frame without it gets "—" there.
    """
    metrics = list(metrics)
    df = _with_units(df, [purifier_col])
    summary = setting_summary(df, [purifier_col], metrics, unit=unit,
                              pair_on=_observation_keys(df, [purifier_col], OBSERVATION_KEYS))
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
    table.attrs["caption"] = f"{_unit_caption(unit, summary)}; s/sample: mean compute seconds per image"
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
    unit: Unit = "observation",
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
    df = _with_units(df, flags).copy()
    for f in flags:
        df[f] = [_as_flag(v, f) for v in df[f]]
    summary = setting_summary(df, flags, metrics, unit=unit, pair_on=_observation_keys(df, flags, OBSERVATION_KEYS))
    summary["_order"] = [(sum(t), tuple(t)) for t in summary[flags].itertuples(index=False, name=None)]
    summary = summary.sort_values("_order", kind="stable")
    rows = []
    for rec in summary.to_dict("records"):
        row: dict[str, str] = {FLAG_LABELS.get(f, f): ON if rec[f] else OFF for f in flags}
        for m in metrics:
            row[_label(m)] = format_mean_std(rec[f"{m}_mean"], rec[f"{m}_std"], _digits(m, digits))
        rows.append(row)
    table = pd.DataFrame(rows, columns=[*(FLAG_LABELS.get(f, f) for f in flags), *map(_label, metrics)], dtype=object)
    table.attrs["caption"] = _unit_caption(unit, summary)
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
