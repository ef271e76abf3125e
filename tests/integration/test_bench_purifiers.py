"""`raypdm bench purifiers`, typed as a user types it: every mode at every job size, ratios to the paper's
way and the plain loop, the paper's way scaled from a sample of folders only where it says so."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from test_demo import fresh_env, raypdm_cmd  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]


def test_every_mode_at_every_size_with_its_ratios(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    res = subprocess.run([*raypdm_cmd(), "bench", "purifiers", "--smoke", "--output", "bench-out",
                          "--purifiers", "jpeg", "--images", "4,6", "--images-per-identity", "2",
                          "--paper-folders", "2"], cwd=cwd, env=fresh_env(tmp_path), capture_output=True,
                         text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "| images | purifier | mode | wall s | images/s | vs paper | vs plain |" in res.stdout
    df = pd.read_parquet(io.BytesIO((cwd / "bench-out" / "purifier_throughput.parquet").read_bytes()))
    assert sorted(zip(df["images"], df["mode"])) == sorted(
        (n, m) for n in (4, 6) for m in ("batched", "paper", "plain", "ray"))
    assert (df["wall_s"] > 0).all() and (df["images_per_s"] > 0).all()
    for n in (4, 6):
        at = df[df["images"] == n].set_index("mode")
        assert at.loc["paper", "vs_paper"] == pytest.approx(1.0) and at.loc["plain", "vs_plain"] == pytest.approx(1.0)
        for mode in at.index:
            assert at.loc[mode, "vs_paper"] == pytest.approx(at.loc[mode, "images_per_s"] / at.loc["paper", "images_per_s"])
    paper = df[df["mode"] == "paper"].set_index("images")
    # 4 images = 2 folders: both timed. 6 images = 3 folders: 2 timed (4 images), scaled to 6.
    assert not paper.loc[4, "extrapolated"] and paper.loc[4, "timed_images"] == 4
    assert paper.loc[6, "extrapolated"] and paper.loc[6, "timed_images"] == 4
    assert "(scaled)" in res.stdout
    assert (df[df["mode"] == "ray"]["peak_rss_mb"] > 0).all()  # the purify process tree was watched
    assert (cwd / "bench-out" / "purifier_throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
