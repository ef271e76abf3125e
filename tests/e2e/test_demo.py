"""The demo, end to end, as a user runs it: `raypdm demo --out DIR`."""

import pytest
from click.testing import CliRunner

from raypdm.cli import cli
from raypdm.data.manifest import Manifest

pytestmark = [pytest.mark.e2e, pytest.mark.ray]


def test_demo_runs_every_stage(ray_local, tmp_path):
    out = tmp_path / "demo"
    res = CliRunner().invoke(cli, ["demo", "--out", str(out), "--no-progress"], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "demo finished" in res.output
    assert (out / "demo_config.yaml").exists()
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
