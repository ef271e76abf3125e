"""Statistics over scored images: identity means, mean ± std per setting, Wilcoxon signed-rank tests.

The paper (Liu, Chen, Chen, Sun, "Rethinking and Red-Teaming Protective Perturbation in Personalized
Diffusion Models") reports every setting (method × protection, purifier, ablation) as mean ± std and
compares settings with the Wilcoxon signed-rank test. Its public code does not say at which level the
statistics are taken; we take the *identity* as the unit, which is what makes a paired test valid:

1. `identity_means`: the mean of each metric over an identity's images, per setting (every generated
   image of one personalized model is one draw of that model; averaging them first keeps identities with
   more images from weighing more).
2. `setting_summary`: mean and sample std (ddof = 1) of those identity means per setting, with counts.
3. `wilcoxon_vs_baseline`: each setting against a baseline setting, paired by identity
   (`scipy.stats.wilcoxon`, default two-sided, zeros dropped as Wilcoxon did). Cases the test cannot
   answer (fewer than 2 pairs, every difference zero, no baseline rows) give a NaN p-value and a `note`
   that says why, never an exception: one thin setting must not stop a whole report.

Inputs are pandas DataFrames with one row per scored image, an `identity` column, the setting columns
(e.g. `method`, `protection`) and the metric columns. Rows with a non-null `error` (the manifests' error
rows) are left out. NaN metric values are skipped when averaging, as pandas does.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

__all__ = [
    "IDENTITY",
    "format_mean_std",
    "identity_means",
    "setting_summary",
    "wilcoxon_vs_baseline",
]

IDENTITY = "identity"


def _check_columns(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise KeyError(f"{what}: column(s) {missing} not in the frame (columns: {list(df.columns)})")


def _scored_rows(df: pd.DataFrame) -> pd.DataFrame:
    if "error" in df.columns:
        return df[df["error"].isna()]
    return df


def identity_means(df: pd.DataFrame, settings: Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    """Mean of each metric per (setting..., identity); one row each, plus `n_images` (rows averaged).

    Setting values that are NaN/None form their own group (`dropna=False`) rather than vanishing.
    """
    settings, metrics = list(settings), list(metrics)
    _check_columns(df, [*settings, IDENTITY], "identity_means settings")
    _check_columns(df, metrics, "identity_means metrics")
    rows = _scored_rows(df)
    keys = [*settings, IDENTITY]
    values = rows[metrics].apply(pd.to_numeric, errors="raise").astype(float)
    grouped = pd.concat([rows[keys], values], axis=1).groupby(keys, sort=False, dropna=False)
    out = grouped[metrics].mean()
    out["n_images"] = grouped.size()
    return out.reset_index()


def setting_summary(df: pd.DataFrame, settings: Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    """Per setting, over identity means: `{m}_mean`, `{m}_std` (ddof = 1; NaN with one identity),
    `{m}_n` (identities with a value for m) and `n_identities`."""
    settings, metrics = list(settings), list(metrics)
    means = identity_means(df, settings, metrics)
    if settings:
        groups = list(means.groupby(settings, sort=False, dropna=False))
    else:
        groups = [((), means)]
    records = []
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        rec: dict[str, Any] = dict(zip(settings, key))
        for m in metrics:
            vals = group[m].dropna().to_numpy(dtype=float)
            rec[f"{m}_mean"] = float(vals.mean()) if len(vals) else math.nan
            rec[f"{m}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else math.nan
            rec[f"{m}_n"] = len(vals)
        rec["n_identities"] = int(group[IDENTITY].nunique(dropna=False))
        records.append(rec)
    columns = [*settings, *(f"{m}_{s}" for m in metrics for s in ("mean", "std", "n")), "n_identities"]
    return pd.DataFrame.from_records(records, columns=columns)


def _min_exact_p(n: int, alternative: str) -> float:
    # The most extreme outcome of the exact signed-rank null (all signs equal) has probability 2^-n.
    return min(1.0, (2.0 if alternative == "two-sided" else 1.0) / 2.0**n)


def _wilcoxon_pair(x: np.ndarray, y: np.ndarray, zero_method: str, alternative: str) -> tuple[float, float, str]:
    n = len(x)
    if n == 0:
        return math.nan, math.nan, "no identity has both this setting and the baseline"
    if n < 2:
        return math.nan, math.nan, "fewer than 2 paired identities"
    diff = x - y
    if np.all(diff == 0):
        # scipy answers p = 1 with a divide warning here; "no evidence either way" is not a p-value.
        return math.nan, math.nan, "every paired difference is zero"
    with warnings.catch_warnings():
        # Ties and zeros switch scipy to the normal approximation and it says so; the note below covers
        # what matters to a reader (whether p < 0.05 was reachable at all).
        warnings.simplefilter("ignore", category=UserWarning)
        warnings.simplefilter("ignore", category=RuntimeWarning)
        res = sps.wilcoxon(x, y, zero_method=zero_method, alternative=alternative)
    nonzero = int(np.count_nonzero(diff)) if zero_method == "wilcox" else n
    note = ""
    floor = _min_exact_p(nonzero, alternative)
    if floor > 0.05:
        note = f"only {nonzero} non-zero differences: the exact p cannot go below {floor:.4g}"
    return float(res.statistic), float(res.pvalue), note


def wilcoxon_vs_baseline(
    df: pd.DataFrame,
    settings: Sequence[str],
    metrics: Sequence[str],
    baseline: dict[str, str],
    *,
    zero_method: str = "wilcox",
    alternative: str = "two-sided",
) -> pd.DataFrame:
    """Wilcoxon signed-rank test of each non-baseline setting against the baseline, paired by identity.

    `baseline` fixes some setting columns (e.g. `{"method": "no purification"}`); the setting columns it
    leaves out are matched, so with settings `["method", "protection"]` every method is compared with the
    baseline method *under the same protection*. Returns one row per (setting, metric): the setting
    columns, `metric`, `statistic`, `p_value`, `n_pairs`, `mean`, `baseline_mean` (over the paired
    identities), `mean_diff` and `note` (why p is NaN, or a caveat; "" otherwise).
    """
    settings, metrics = list(settings), list(metrics)
    if not baseline:
        raise ValueError("wilcoxon_vs_baseline: baseline is empty; give e.g. {'method': 'none'}")
    unknown = [k for k in baseline if k not in settings]
    if unknown:
        raise KeyError(f"wilcoxon_vs_baseline: baseline key(s) {unknown} are not settings {settings}")
    means = identity_means(df, settings, metrics)
    for k, v in baseline.items():
        present = set(means[k].astype(str))
        if str(v) not in present:
            raise ValueError(f"wilcoxon_vs_baseline: baseline {k}={v!r} has no rows (values: {sorted(present)})")
    free = [s for s in settings if s not in baseline]
    is_base = np.logical_and.reduce([means[k].astype(str) == str(v) for k, v in baseline.items()])
    base_rows, other_rows = means[is_base], means[~is_base]

    columns = [*settings, "metric", "statistic", "p_value", "n_pairs", "mean", "baseline_mean", "mean_diff", "note"]
    records = []
    for key, group in other_rows.groupby(settings, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        label = dict(zip(settings, key))
        base = base_rows
        for s in free:
            base = base[base[s].isna()] if pd.isna(label[s]) else base[base[s] == label[s]]
        for m in metrics:
            a = group.set_index(IDENTITY)[m].dropna()
            b = base.set_index(IDENTITY)[m].dropna()
            common = [i for i in a.index if i in b.index]
            x = a.loc[common].to_numpy(dtype=float)
            y = b.loc[common].to_numpy(dtype=float)
            if len(base) == 0:
                where = ", ".join(f"{s}={label[s]!r}" for s in free)
                stat, p, note = math.nan, math.nan, f"no baseline rows with {where}"
            else:
                stat, p, note = _wilcoxon_pair(x, y, zero_method, alternative)
            records.append({
                **label, "metric": m, "statistic": stat, "p_value": p, "n_pairs": len(common),
                "mean": float(x.mean()) if len(x) else math.nan,
                "baseline_mean": float(y.mean()) if len(y) else math.nan,
                "mean_diff": float((x - y).mean()) if len(x) else math.nan,
                "note": note,
            })
    return pd.DataFrame.from_records(records, columns=columns)


def format_mean_std(mean: float, std: float, digits: int = 3) -> str:
    """`"0.512 ± 0.031"`; `"n/a"` without a mean, `"0.512 ± n/a"` when std is undefined (one identity)."""
    def num(v: float) -> str | None:
        if v is None or (isinstance(v, float) and math.isnan(v)) or pd.isna(v):
            return None
        v = float(v)
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        text = f"{v:.{digits}f}"
        # "-0.000" reads like a sign that is not there.
        return text[1:] if text.startswith("-") and float(text) == 0 else text

    m, s = num(mean), num(std)
    if m is None:
        return "n/a"
    return f"{m} ± {s if s is not None else 'n/a'}"
