"""Statistics over scored images: means ± spread per setting and Wilcoxon signed-rank tests, the paper's way.

The paper (Liu, Chen, Chen, Sun, "Rethinking and Red-Teaming Protective Perturbation in Personalized
Diffusion Models") reports each setting as a mean over "instances × generated images" (App. A.1) and stars
Table 1's entries where a Wilcoxon signed-rank test gives p ≤ 0.01, "significant improvement" over the
baselines. So, by default (``unit="observation"``):

1. `unit_means`: one value per (setting..., unit): an *observation* is one scored image, keyed by
   `OBSERVATION_KEYS` = identity, prompt (the sample's `split`: its prompt folder) and image (`name`, which
   fixes the sampling seed), so the same observation under two settings is the same identity, prompt and
   seed; duplicates of a key are averaged. ``unit="identity"`` averages each identity's images first (every
   identity weighs the same; the test then has as many pairs as identities: with 4 identities its smallest
   one-sided p is 1/16, so no star can appear at 0.01).
2. `setting_summary`: mean and sample std (ddof = 1) over those units per setting, with counts.
3. `wilcoxon_vs_baseline`: each setting against a baseline setting, paired on the unit's keys
   (`scipy.stats.wilcoxon`, zeros dropped as Wilcoxon did). ``alternative="improvement"`` is one-sided in
   each metric's better direction ("greater", or "less" for `LOWER_IS_BETTER`). Cases the test cannot
   answer (fewer than 2 pairs, every difference zero, no baseline rows) give a NaN p-value and a `note`
   that says why, never an exception: one thin setting must not stop a whole report.

Inputs are pandas DataFrames with one row per scored image, the unit's key columns, the setting columns
(e.g. `method`, `protection`) and the metric columns. Rows with a non-null `error` (the manifests' error
rows) are left out. NaN metric values are skipped when averaging, as pandas does.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats as sps

__all__ = [
    "IDENTITY",
    "LOWER_IS_BETTER",
    "OBSERVATION_KEYS",
    "Unit",
    "better_direction",
    "format_mean_std",
    "identity_means",
    "setting_summary",
    "unit_keys",
    "unit_means",
    "wilcoxon_vs_baseline",
]

IDENTITY = "identity"
# An observation: one generated image of one identity's model, for one prompt and one sampling seed (the
# sample stage's <identity>/<prompt folder>/<image index>.png, whose index fixes the seed).
OBSERVATION_KEYS: tuple[str, ...] = (IDENTITY, "split", "name")
LOWER_IS_BETTER = frozenset({"lpips", "fdfr", "mismatch", "seconds", "p_noise"})
Unit = Literal["observation", "identity"]


def better_direction(metric: str) -> Literal["greater", "less"]:
    """The one-sided alternative that means "improves" for a metric."""
    return "less" if metric in LOWER_IS_BETTER else "greater"


def unit_keys(unit: Unit, pair_on: Sequence[str] = OBSERVATION_KEYS) -> list[str]:
    if unit == "identity":
        return [IDENTITY]
    if unit == "observation":
        return list(pair_on)
    raise ValueError(f"unit must be 'observation' or 'identity', got {unit!r}")


def _check_columns(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise KeyError(f"{what}: column(s) {missing} not in the frame (columns: {list(df.columns)})")


def _scored_rows(df: pd.DataFrame) -> pd.DataFrame:
    if "error" in df.columns:
        return df[df["error"].isna()]
    return df


def unit_means(df: pd.DataFrame, settings: Sequence[str], metrics: Sequence[str], keys: Sequence[str]) -> pd.DataFrame:
    """Mean of each metric per (setting..., key...); one row each, plus `n_images` (rows averaged).

    Setting values that are NaN/None form their own group (`dropna=False`) rather than vanishing.
    """
    settings, metrics, keys = list(settings), list(metrics), list(keys)
    _check_columns(df, [*settings, *keys], "settings and unit keys")
    _check_columns(df, metrics, "metrics")
    rows = _scored_rows(df)
    group_by = [*settings, *keys]
    values = rows[metrics].apply(pd.to_numeric, errors="raise").astype(float)
    grouped = pd.concat([rows[group_by], values], axis=1).groupby(group_by, sort=False, dropna=False)
    out = grouped[metrics].mean()
    out["n_images"] = grouped.size()
    return out.reset_index()


def identity_means(df: pd.DataFrame, settings: Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    """Mean of each metric per (setting..., identity): `unit_means` with the identity as the unit."""
    return unit_means(df, settings, metrics, [IDENTITY])


def setting_summary(df: pd.DataFrame, settings: Sequence[str], metrics: Sequence[str], *,
                    unit: Unit = "observation", pair_on: Sequence[str] = OBSERVATION_KEYS) -> pd.DataFrame:
    """Per setting, over units (see the module docstring): `{m}_mean`, `{m}_std` (ddof = 1; NaN with one
    unit), `{m}_n` (units with a value for m), `n_identities` and `n_units`."""
    settings, metrics = list(settings), list(metrics)
    means = unit_means(df, settings, metrics, unit_keys(unit, pair_on))
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
        rec["n_units"] = len(group)
        records.append(rec)
    columns = [*settings, *(f"{m}_{s}" for m in metrics for s in ("mean", "std", "n")), "n_identities", "n_units"]
    return pd.DataFrame.from_records(records, columns=columns)


def _min_exact_p(n: int, alternative: str) -> float:
    # The most extreme outcome of the exact signed-rank null (all signs equal) has probability 2^-n.
    return min(1.0, (2.0 if alternative == "two-sided" else 1.0) / 2.0**n)


def _wilcoxon_pair(x: np.ndarray, y: np.ndarray, zero_method: str, alternative: str,
                   alpha: float) -> tuple[float, float, str]:
    n = len(x)
    if n == 0:
        return math.nan, math.nan, "no unit has both this setting and the baseline"
    if n < 2:
        return math.nan, math.nan, "fewer than 2 pairs"
    diff = x - y
    if np.all(diff == 0):
        # scipy answers p = 1 with a divide warning here; "no evidence either way" is not a p-value.
        return math.nan, math.nan, "every paired difference is zero"
    with warnings.catch_warnings():
        # Ties and zeros switch scipy to the normal approximation and it says so; the note below covers
        # what matters to a reader (whether p ≤ alpha was reachable at all).
        warnings.simplefilter("ignore", category=UserWarning)
        warnings.simplefilter("ignore", category=RuntimeWarning)
        res = sps.wilcoxon(x, y, zero_method=zero_method, alternative=alternative)
    nonzero = int(np.count_nonzero(diff)) if zero_method == "wilcox" else n
    note = ""
    floor = _min_exact_p(nonzero, alternative)
    if floor > alpha:
        note = f"only {nonzero} non-zero differences: the exact p cannot go below {floor:.4g}"
    return float(res.statistic), float(res.pvalue), note


def wilcoxon_vs_baseline(
    df: pd.DataFrame,
    settings: Sequence[str],
    metrics: Sequence[str],
    baseline: dict[str, str],
    *,
    unit: Unit = "observation",
    pair_on: Sequence[str] = OBSERVATION_KEYS,
    zero_method: str = "wilcox",
    alternative: str = "improvement",
    alpha: float = 0.01,
) -> pd.DataFrame:
    """Wilcoxon signed-rank test of each non-baseline setting against the baseline, paired on the unit.

    `baseline` fixes some setting columns (e.g. `{"method": "no purification"}`); the setting columns it
    leaves out are matched, so with settings `["method", "protection"]` every method is compared with the
    baseline method *under the same protection*. `alternative`: "improvement" (one-sided, each metric's
    better direction), "two-sided", "greater" or "less". Returns one row per (setting, metric): the setting
    columns, `metric`, `alternative`, `statistic`, `p_value`, `n_pairs`, `mean`, `baseline_mean` (over the
    pairs), `mean_diff` and `note` (why p is NaN, or that `alpha` is out of reach; "" otherwise).
    """
    settings, metrics = list(settings), list(metrics)
    if not baseline:
        raise ValueError("wilcoxon_vs_baseline: baseline is empty; give e.g. {'method': 'none'}")
    unknown = [k for k in baseline if k not in settings]
    if unknown:
        raise KeyError(f"wilcoxon_vs_baseline: baseline key(s) {unknown} are not settings {settings}")
    if alternative not in ("improvement", "two-sided", "greater", "less"):
        raise ValueError(f"wilcoxon_vs_baseline: alternative must be improvement, two-sided, greater or less, "
                         f"got {alternative!r}")
    keys = unit_keys(unit, pair_on)
    means = unit_means(df, settings, metrics, keys)
    for k, v in baseline.items():
        present = set(means[k].astype(str))
        if str(v) not in present:
            raise ValueError(f"wilcoxon_vs_baseline: baseline {k}={v!r} has no rows (values: {sorted(present)})")
    free = [s for s in settings if s not in baseline]
    is_base = np.logical_and.reduce([means[k].astype(str) == str(v) for k, v in baseline.items()])
    base_rows, other_rows = means[is_base], means[~is_base]

    columns = [*settings, "metric", "alternative", "statistic", "p_value", "n_pairs", "mean", "baseline_mean",
               "mean_diff", "note"]
    records = []
    for key, group in other_rows.groupby(settings, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        label = dict(zip(settings, key))
        base = base_rows
        for s in free:
            base = base[base[s].isna()] if pd.isna(label[s]) else base[base[s] == label[s]]
        for m in metrics:
            side = better_direction(m) if alternative == "improvement" else alternative
            a = group.set_index(keys)[m].dropna()
            b = base.set_index(keys)[m].dropna()
            common = a.index.intersection(b.index)
            x = a.loc[common].to_numpy(dtype=float)
            y = b.loc[common].to_numpy(dtype=float)
            if len(base) == 0:
                where = ", ".join(f"{s}={label[s]!r}" for s in free)
                stat, p, note = math.nan, math.nan, f"no baseline rows with {where}"
            else:
                stat, p, note = _wilcoxon_pair(x, y, zero_method, side, alpha)
            records.append({
                **label, "metric": m, "alternative": side, "statistic": stat, "p_value": p,
                "n_pairs": len(common),
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
