"""Statistics (identity means, mean ± std, Wilcoxon vs baseline) and the paper-style tables."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import wilcoxon

from raypdm.metrics.stats import format_mean_std, identity_means, setting_summary, wilcoxon_vs_baseline
from raypdm.metrics.tables import best_baseline, table1, table2, table4, to_html, to_markdown, write_table


# The identity-level, two-sided protocol (what these tests were written for); the paper's observation-level,
# one-sided one has its own tests below.
ID2 = dict(unit="identity", alternative="two-sided")


def _frame() -> pd.DataFrame:
    """2 methods x 1 protection x 3 identities, uneven image counts, one error row."""
    rows = [
        # method a: identity x has 2 images, y 1, z 3
        ("a", "p", "x", 0.10, 1.0), ("a", "p", "x", 0.30, 3.0),
        ("a", "p", "y", 0.50, 2.0),
        ("a", "p", "z", 0.20, 0.0), ("a", "p", "z", 0.40, 0.0), ("a", "p", "z", 0.90, 3.0),
        ("b", "p", "x", 0.70, 5.0), ("b", "p", "y", 0.60, 4.0), ("b", "p", "z", 0.80, 6.0),
    ]
    df = pd.DataFrame(rows, columns=["method", "protection", "identity", "ims", "q"])
    df["error"] = None
    bad = pd.DataFrame([{"method": "a", "protection": "p", "identity": "x", "ims": 99.0, "q": 99.0, "error": "boom"}])
    return pd.concat([df, bad], ignore_index=True)


def test_identity_means_match_numpy_and_skip_error_rows():
    means = identity_means(_frame(), ["method", "protection"], ["ims", "q"])
    got = means.set_index(["method", "identity"])
    assert got.loc[("a", "x"), "ims"] == pytest.approx(np.mean([0.10, 0.30]))
    assert got.loc[("a", "z"), "ims"] == pytest.approx(np.mean([0.20, 0.40, 0.90]))
    assert got.loc[("a", "z"), "q"] == pytest.approx(1.0)
    assert got.loc[("a", "x"), "n_images"] == 2  # the error row is not counted
    assert len(means) == 6


def test_setting_summary_mean_std_over_identities():
    summary = setting_summary(_frame(), ["method", "protection"], ["ims", "q"], unit="identity").set_index("method")
    a_ims = np.array([0.20, 0.50, 0.50])  # identity means of method a: x, y, z
    assert summary.loc["a", "ims_mean"] == pytest.approx(a_ims.mean())
    assert summary.loc["a", "ims_std"] == pytest.approx(a_ims.std(ddof=1))
    assert summary.loc["b", "q_std"] == pytest.approx(np.std([5.0, 4.0, 6.0], ddof=1))
    assert summary.loc["a", "n_identities"] == 3
    assert {"ims_mean", "ims_std", "q_mean", "q_std", "n_identities"} <= set(summary.columns)


def test_setting_summary_single_identity_has_nan_std():
    df = pd.DataFrame({"method": ["a", "a"], "identity": ["x", "x"], "ims": [0.2, 0.4]})
    s = setting_summary(df, ["method"], ["ims"], unit="identity")
    assert s["ims_mean"].iloc[0] == pytest.approx(0.3)
    assert math.isnan(s["ims_std"].iloc[0])
    assert s["n_identities"].iloc[0] == 1


def _paired_frame(n_ids: int = 8, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.normal(0.3, 0.1, n_ids)
    other = base + rng.normal(0.05, 0.08, n_ids)
    rows = [{"method": "none", "protection": "aspl", "identity": f"id{i}", "ims": v} for i, v in enumerate(base)]
    rows += [{"method": "codesr", "protection": "aspl", "identity": f"id{i}", "ims": v} for i, v in enumerate(other)]
    return pd.DataFrame(rows), other, base


def test_wilcoxon_rows_equal_scipy():
    df, other, base = _paired_frame()
    out = wilcoxon_vs_baseline(df, ["method", "protection"], ["ims"], {"method": "none"}, **ID2)
    assert len(out) == 1
    row = out.iloc[0]
    ref = wilcoxon(other, base)
    assert row["method"] == "codesr" and row["protection"] == "aspl" and row["metric"] == "ims"
    assert row["statistic"] == pytest.approx(float(ref.statistic))
    assert row["p_value"] == pytest.approx(float(ref.pvalue))
    assert row["n_pairs"] == 8
    assert row["mean_diff"] == pytest.approx(float((other - base).mean()))
    assert row["note"] == ""


def test_wilcoxon_pairs_only_shared_identities_within_protection():
    df, _, _ = _paired_frame(n_ids=7, seed=1)
    # A second protection where the baseline lacks two identities; the pairing must use the rest only.
    extra = df.assign(protection="metacloak")
    extra = extra[~((extra["method"] == "none") & extra["identity"].isin(["id0", "id1"]))]
    extra.loc[extra["method"] == "codesr", "ims"] += 0.5
    out = wilcoxon_vs_baseline(pd.concat([df, extra]), ["method", "protection"], ["ims"], {"method": "none"}, **ID2)
    row = out.set_index("protection").loc["metacloak"]
    x = extra[(extra.method == "codesr") & ~extra.identity.isin(["id0", "id1"])].sort_values("identity")["ims"]
    y = extra[extra.method == "none"].sort_values("identity")["ims"]
    assert row["n_pairs"] == 5
    assert row["p_value"] == pytest.approx(float(wilcoxon(x.to_numpy(), y.to_numpy()).pvalue))
    assert "cannot go below" in row["note"]  # 5 pairs: the smallest two-sided exact p is 0.0625


def test_wilcoxon_degenerate_cases_give_nan_with_reason():
    one = pd.DataFrame({"method": ["none", "m"], "identity": ["x", "x"], "ims": [0.1, 0.2]})
    r = wilcoxon_vs_baseline(one, ["method"], ["ims"], {"method": "none"}, **ID2).iloc[0]
    assert math.isnan(r["p_value"]) and "fewer than 2" in r["note"] and r["n_pairs"] == 1

    same = pd.DataFrame({"method": ["none"] * 3 + ["m"] * 3, "identity": list("xyz") * 2, "ims": [0.1, 0.2, 0.3] * 2})
    r = wilcoxon_vs_baseline(same, ["method"], ["ims"], {"method": "none"}, **ID2).iloc[0]
    assert math.isnan(r["p_value"]) and "zero" in r["note"]

    disjoint = pd.DataFrame({"method": ["none", "none", "m", "m"], "identity": ["x", "y", "z", "w"], "ims": [0.1] * 4})
    r = wilcoxon_vs_baseline(disjoint, ["method"], ["ims"], {"method": "none"}, **ID2).iloc[0]
    assert math.isnan(r["p_value"]) and r["n_pairs"] == 0 and r["note"]

    two_prot = pd.DataFrame({"method": ["none", "m", "m"], "protection": ["p", "p", "q"],
                             "identity": ["x", "x", "x"], "ims": [0.1, 0.2, 0.3]})
    out = wilcoxon_vs_baseline(two_prot, ["method", "protection"], ["ims"], {"method": "none"}, **ID2)
    assert "no baseline rows" in out.set_index("protection").loc["q", "note"]


def test_wilcoxon_bad_baseline_names_the_field():
    df, _, _ = _paired_frame()
    with pytest.raises(ValueError, match="method='nonee'"):
        wilcoxon_vs_baseline(df, ["method", "protection"], ["ims"], {"method": "nonee"}, **ID2)
    with pytest.raises(KeyError, match="purifier"):
        wilcoxon_vs_baseline(df, ["method", "protection"], ["ims"], {"purifier": "none"})
    with pytest.raises(KeyError, match="lpips"):
        identity_means(df, ["method"], ["lpips"])


def test_format_mean_std():
    assert format_mean_std(0.51234, 0.0312) == "0.512 ± 0.031"
    assert format_mean_std(30.456, 1.2, digits=2) == "30.46 ± 1.20"
    assert format_mean_std(0.5, float("nan")) == "0.500 ± n/a"
    assert format_mean_std(float("nan"), float("nan")) == "n/a"
    assert format_mean_std(-0.0001, 0.0) == "0.000 ± 0.000"


def _table1_frame() -> pd.DataFrame:
    rows = []
    # 6 identities: the smallest exact two-sided p is 2/64 < 0.05, so a consistent shift is significant.
    for prot, shift in [("ASPL", 0.4), ("Meta|Cloak", 0.0)]:
        for i in range(6):
            base = 0.1 + 0.01 * i
            rows.append({"method": "none", "protection": prot, "identity": f"id{i}", "ims": base, "q": 0.5})
            rows.append({"method": "CodeSR", "protection": prot, "identity": f"id{i}",
                         "ims": base + shift + 0.001 * i, "q": 0.5 + 0.01 * i})
    return pd.DataFrame(rows)


def test_table1_shape_and_cells():
    df = _table1_frame()
    t = table1(df, baselines="none", **ID2, alpha=0.05)
    assert list(t.index) == ["none", "CodeSR"]
    assert t.columns.nlevels == 2
    assert list(t.columns) == [("ASPL", "IMS"), ("ASPL", "Q"), ("Meta|Cloak", "IMS"), ("Meta|Cloak", "Q")]
    base_ims = np.array([0.1 + 0.01 * i for i in range(6)])
    codesr = base_ims + 0.4 + 0.001 * np.arange(6)
    assert t.loc["none", ("ASPL", "IMS")] == format_mean_std(base_ims.mean(), base_ims.std(ddof=1))
    assert t.loc["CodeSR", ("ASPL", "IMS")] == format_mean_std(codesr.mean(), codesr.std(ddof=1)) + "*"
    assert not t.loc["none", ("ASPL", "IMS")].endswith("*")  # the baseline is never marked
    # Under Meta|Cloak IMS differs by 0.001*i only (id0 zero, dropped: 5 pairs) -> p >= 0.0625: no marker.
    assert not t.loc["CodeSR", ("Meta|Cloak", "IMS")].endswith("*")
    assert t.loc["none", ("ASPL", "Q")] == "0.500 ± 0.000"
    assert "Wilcoxon" in t.attrs["caption"]


def test_best_baseline_is_the_strongest_other_method():
    df = _frame()  # identity means of ims: a = 0.2/0.5/0.5 (the error row's 99 is ignored), b = 0.7/0.6/0.8
    assert best_baseline(df, ours=["c"]) == "b"
    assert best_baseline(df, ours=["b"]) == "a"  # ours never competes with itself
    assert best_baseline(df, ours=["a", "b"]) is None
    # identities are the unit: many images of one identity do not outweigh the others
    heavy = pd.DataFrame([{"method": "m1", "protection": "p", "identity": "x", "ims": 0.9}] * 20
                         + [{"method": "m1", "protection": "p", "identity": "y", "ims": 0.0},
                            {"method": "m2", "protection": "p", "identity": "x", "ims": 0.5},
                            {"method": "m2", "protection": "p", "identity": "y", "ims": 0.5}])
    assert best_baseline(heavy, ours=[]) == "m2"
    tie = pd.DataFrame({"method": ["z", "y"], "identity": ["x", "x"], "ims": [0.5, 0.5]})
    assert best_baseline(tie, ours=[]) == "y"


def test_table1_missing_setting_and_no_baseline():
    df = _table1_frame()
    df = df[~((df.method == "CodeSR") & (df.protection == "ASPL"))]
    t = table1(df)
    assert t.loc["CodeSR", ("ASPL", "IMS")] == "—"
    assert not any(str(v).endswith("*") for v in t.to_numpy().ravel())


def test_markdown_and_html_rendering_escape_user_text():
    t = table1(_table1_frame(), baselines="none", **ID2, alpha=0.05)
    md = to_markdown(t)
    lines = md.splitlines()
    assert lines[0] == "| method | ASPL / IMS | ASPL / Q | Meta\\|Cloak / IMS | Meta\\|Cloak / Q |"
    assert lines[1] == "|---|---|---|---|---|"
    assert lines[3].startswith("| CodeSR | ") and lines[3].count(" | ") == 4
    frag = to_html(t)
    assert frag.startswith('<table class="raypdm-table">')
    assert '<th scope="col" colspan="2">ASPL</th>' in frag and 'rowspan="2"' in frag
    evil = pd.DataFrame({"identity": ["<script>alert(1)</script>"], "v": ["a&b"]})
    out = to_html(evil)
    assert "<script>" not in out and "&lt;script&gt;" in out and "a&amp;b" in out
    assert "| <script>alert(1)</script> | a&b |" in to_markdown(evil)


def test_table2_and_table4():
    rows = []
    for purifier, secs in [("jpeg", 0.01), ("codesr", 2.5)]:
        for i in range(3):
            rows.append({"purifier": purifier, "identity": f"id{i}", "lpips": 0.1 * (i + 1), "ssim": 0.9,
                         "ms_ssim": 0.8, "psnr": 30.0 + i, "seconds": secs,
                         "codeformer": purifier == "codesr", "sr": int(purifier == "codesr"), "cdl": "true",
                         "ims": 0.2 + 0.1 * i, "q": 0.1})
    df = pd.DataFrame(rows)
    t2 = table2(df)
    assert list(t2.index) == ["jpeg", "codesr"]
    assert list(t2.columns) == ["LPIPS", "SSIM", "MS-SSIM", "PSNR", "s/sample"]
    assert t2.loc["jpeg", "LPIPS"] == format_mean_std(0.2, 0.1)
    assert t2.loc["codesr", "PSNR"] == "31.00 ± 1.00"
    assert t2.loc["codesr", "s/sample"] == "2.5"

    t4 = table4(df)
    assert list(t4.columns) == ["CodeFormer", "SR", "CDL", "IMS", "Q"]
    assert t4[["CodeFormer", "SR", "CDL"]].values.tolist() == [["✗", "✗", "✓"], ["✓", "✓", "✓"]]
    assert t4.loc[1, "IMS"] == format_mean_std(0.3, 0.1)
    md = to_markdown(t4)
    assert md.splitlines()[0] == "| CodeFormer | SR | CDL | IMS | Q |"  # no 0..n-1 index column
    with pytest.raises(ValueError, match="'cdl'"):
        table4(df.assign(cdl="maybe"))


def test_write_table_writes_md_html_parquet(tmp_path):
    t = table1(_table1_frame(), baselines="none", **ID2, alpha=0.05)
    uris = write_table(t, str(tmp_path / "tables" / "table1"))
    assert set(uris) == {"md", "html", "parquet"}
    assert (tmp_path / "tables" / "table1.md").read_text(encoding="utf-8") == to_markdown(t)
    assert (tmp_path / "tables" / "table1.html").read_text(encoding="utf-8") == to_html(t)
    back = pd.read_parquet(uris["parquet"])
    assert list(back.columns) == ["method", "ASPL / IMS", "ASPL / Q", "Meta|Cloak / IMS", "Meta|Cloak / Q"]
    assert back["ASPL / IMS"].tolist() == t[("ASPL", "IMS")].tolist()


# ---- the paper's statistics (App. A.1, Table 1's caption): observations, one-sided, p ≤ 0.01, each baseline


def _matrix(ours_shift: float, n_ids: int = 4, prompts: int = 2, images: int = 8, seed: int = 0) -> pd.DataFrame:
    """Generated-image scores of 3 methods × 2 protections; every observation (identity, prompt, image)
    has a shared part (the identity's and the prompt's difficulty) and a method-specific noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for prot in ("aspl", "metacloak"):
        for i in range(n_ids):
            for p in range(prompts):
                for k in range(images):
                    shared = rng.normal(0.0, 0.2)
                    for method, shift in (("none + vanilla", 0.0), ("jpeg + vanilla", 0.05), ("codesr + cdl", ours_shift)):
                        rows.append({"method": method, "protection": prot, "identity": f"id{i}",
                                     "split": f"prompt-{p}", "name": f"{k:04d}.png",
                                     "ims": shared + shift + rng.normal(0, 0.05),
                                     "q": 0.5 * shared + shift + rng.normal(0, 0.05), "error": None})
    return pd.DataFrame(rows)


BASELINES = ["none + vanilla", "jpeg + vanilla"]


def test_better_by_construction_gets_its_stars_with_four_identities():
    t = table1(_matrix(ours_shift=0.3), baselines=BASELINES, ours=["codesr + cdl"])
    for prot in ("aspl", "metacloak"):
        for m in ("IMS", "Q"):
            assert t.loc["codesr + cdl", (prot, m)].endswith("*")
            assert not any(t.loc[b, (prot, m)].endswith("*") for b in BASELINES)  # baselines are never marked
    assert "p ≤ 0.01" in t.attrs["caption"] and "one-sided" in t.attrs["caption"]
    assert "identities × images" in t.attrs["caption"] and "identity, prompt and seed" in t.attrs["caption"]
    tests = t.attrs["tests"]
    assert set(tests["baseline"]) == set(BASELINES) and (tests["n_pairs"] == 4 * 2 * 8).all()
    assert (tests["p_value"] <= 0.01).all() and set(tests["alternative"]) == {"greater"}


def test_equal_methods_get_no_star():
    # Ours equal in distribution to the strongest baseline: no star (both seeds, so not one lucky draw).
    for seed in (0, 1):
        t = table1(_matrix(ours_shift=0.05, seed=seed), baselines=BASELINES, ours=["codesr + cdl"])
        assert not any(str(v).endswith("*") for v in t.to_numpy().ravel())


def test_a_star_needs_every_baseline():
    df = _matrix(ours_shift=0.3)
    strong = df[df.method == "codesr + cdl"].assign(method="strong + vanilla")
    df = pd.concat([df, strong], ignore_index=True)  # a baseline exactly as good as ours
    t = table1(df, baselines=[*BASELINES, "strong + vanilla"], ours=["codesr + cdl"])
    assert not t.loc["codesr + cdl", ("aspl", "IMS")].endswith("*")
    # against the two weak ones alone it is starred
    t = table1(df, baselines=BASELINES, ours=["codesr + cdl"])
    assert t.loc["codesr + cdl", ("aspl", "IMS")].endswith("*")


def test_worse_by_construction_gets_no_star_one_sided():
    t = table1(_matrix(ours_shift=-0.3), baselines=BASELINES, ours=["codesr + cdl"])
    assert not any(str(v).endswith("*") for v in t.to_numpy().ravel())
    assert (t.attrs["tests"]["p_value"] > 0.99).all()  # one-sided: a decline is no improvement
    two = table1(_matrix(ours_shift=-0.3), baselines=BASELINES, ours=["codesr + cdl"], alternative="two-sided")
    assert two.loc["codesr + cdl", ("aspl", "IMS")].endswith("*")


def test_identity_unit_cannot_star_four_identities():
    df = _matrix(ours_shift=0.3)
    t = table1(df, baselines=BASELINES, ours=["codesr + cdl"], unit="identity")
    assert not any(str(v).endswith("*") for v in t.to_numpy().ravel())
    notes = t.attrs["tests"]["note"]
    assert notes.str.contains("cannot go below 0.0625").all()  # 4 pairs: one-sided floor 1/16


def test_observation_means_and_spreads_are_over_all_scored_images():
    df = _matrix(ours_shift=0.3)
    df = df[~((df.identity == "id0") & (df.name != "0000.png"))]  # id0 keeps 1 image per prompt, the rest 8
    df = pd.concat([df, df.iloc[:1].assign(ims=99.0, error="boom")], ignore_index=True)
    t = table1(df, baselines=BASELINES, ours=["codesr + cdl"])
    obs = df[(df.method == "codesr + cdl") & (df.protection == "aspl") & df.error.isna()]["ims"].to_numpy()
    assert t.loc["codesr + cdl", ("aspl", "IMS")].rstrip("*") == format_mean_std(obs.mean(), obs.std(ddof=1))
    s = setting_summary(df, ["method", "protection"], ["ims"])
    row = s[(s.method == "codesr + cdl") & (s.protection == "aspl")].iloc[0]
    assert row["n_units"] == len(obs) == 2 + 3 * 16 and row["n_identities"] == 4
    by_id = setting_summary(df, ["method", "protection"], ["ims"], unit="identity")
    row_id = by_id[(by_id.method == "codesr + cdl") & (by_id.protection == "aspl")].iloc[0]
    assert row_id["ims_mean"] != pytest.approx(row["ims_mean"])  # the two units weigh id0 differently


def test_pairs_follow_identity_prompt_and_seed_not_row_order():
    df = _matrix(ours_shift=0.1)
    ours = df[(df.method == "codesr + cdl") & (df.protection == "aspl")].sort_values(["identity", "split", "name"])
    base = df[(df.method == "none + vanilla") & (df.protection == "aspl")].sort_values(["identity", "split", "name"])
    ref = wilcoxon(ours["ims"].to_numpy(), base["ims"].to_numpy(), alternative="greater")
    shuffled = df.sample(frac=1.0, random_state=3)
    out = wilcoxon_vs_baseline(shuffled, ["method", "protection"], ["ims"], {"method": "none + vanilla"})
    row = out[(out.method == "codesr + cdl") & (out.protection == "aspl")].iloc[0]
    assert row["p_value"] == pytest.approx(float(ref.pvalue)) and row["n_pairs"] == 64
    assert row["statistic"] == pytest.approx(float(ref.statistic))


def test_improvement_is_lower_for_lower_is_better_metrics():
    df = _matrix(ours_shift=0.3).assign(lpips=lambda d: -d["ims"])
    out = wilcoxon_vs_baseline(df, ["method", "protection"], ["ims", "lpips"], {"method": "none + vanilla"})
    ours = out[out.method == "codesr + cdl"].set_index(["protection", "metric"])
    assert ours.loc[("aspl", "ims"), "alternative"] == "greater" and ours.loc[("aspl", "lpips"), "alternative"] == "less"
    assert ours.loc[("aspl", "lpips"), "p_value"] <= 0.01
