"""The demo, end to end, as a user runs it: `raypdm demo --out DIR`."""

import time

import pandas as pd
import pytest
from click.testing import CliRunner

from raypdm.cli import cli
from raypdm.data.manifest import Manifest

pytestmark = [pytest.mark.e2e, pytest.mark.ray, pytest.mark.timeout(1200)]


def test_demo_runs_every_stage(ray_local, tmp_path):
    out = tmp_path / "demo"
    t0 = time.perf_counter()
    res = CliRunner().invoke(cli, ["demo", "--out", str(out), "--no-progress"], terminal_width=200)
    seconds = time.perf_counter() - t0
    assert res.exit_code == 0, res.output
    assert "demo finished" in res.output
    assert (out / "demo_config.yaml").exists()
    # protection: set_A of every identity protected within the budget, the other splits copied
    protected = Manifest(str(out / "protected" / "advdm")).read().to_pandas()
    a = protected[protected["split"] == "set_A"]
    assert len(a) == 3 * 4 and a["error"].isna().all() and (a["linf"] <= 11 / 255 + 1e-9).all()
    assert len(protected) == 3 * 3 * 4
    jpeg = Manifest(str(out / "purified" / "jpeg")).read()
    assert jpeg.num_rows == 3 * 3 * 4 and jpeg.column("error").null_count == jpeg.num_rows
    assert "jpeg (re-run)" in res.output
    codesr = Manifest(str(out / "purified" / "codesr")).read()
    assert codesr.num_rows == 3 * 4 and codesr.column("error").null_count == codesr.num_rows
    assert "ref_ssim" in codesr.column_names
    # two identities fine-tuned in parallel, then sampled with decoupled guidance
    exports = sorted(p.parent.name for p in (out / "models").glob("*/export"))
    assert len(exports) == 2
    samples = Manifest(str(out / "samples")).read().to_pylist()
    assert len(samples) == 2 * 2 * 2 and all(r["error"] is None for r in samples)
    assert {r["identity"] for r in samples} == set(exports) and {r["w"] for r in samples} == {7.5}
    # scoring of the generated images
    scores = Manifest(str(out / "scores")).read().to_pandas()
    assert len(scores) == len(samples) and {"ims", "q", "p_noise", "face_found"} <= set(scores.columns)
    assert (out / "scores" / "mismatch.png").exists()
    assert {"clean", "protected", "purified", "evaluated"} <= set(pd.read_parquet(out / "scores" / "mismatch.parquet")["group"])
    # the 2 x 2 sweep: two trials, two w rows each from one training
    sweep = pd.read_parquet(out / "sweep" / "results.parquet")
    final = sweep[sweep["final"] == True]  # noqa: E712
    assert set(final["token"]) == {"t@j", "bhi"} and set(final["w"]) == {3.0, 7.5}
    # the smoke red-team matrix: tables and a report a person can open
    for table in ("table1", "table2", "table4"):
        assert (out / "redteam" / "tables" / f"{table}.md").stat().st_size > 0
    report = (out / "redteam" / "report.html").read_text()
    assert "<img" in report and "data:image" in report and "Table 1" in report
    assert "benchmark: purifier_throughput.png" in report  # the checkout's benchmark plots, inlined
    # Table 1 tests the method under test against its strongest competitor, never against itself
    table1 = (out / "redteam" / "tables" / "table1.md").read_text()
    assert "Wilcoxon signed-rank test against" in table1 and "against codesr + cdl" not in table1
    assert "report.html" in res.output
    print(f"demo: {seconds:.0f} s")  # the 10-minute budget is measured, not asserted (no timed tests)
