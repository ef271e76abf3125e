"""The README's commands, typed literally: the tour block runs line by line in a fresh working directory
with the relative paths it shows (fresh torch / Hugging Face caches, each command its own process and its
own embedded Ray), and every full-size command resolves (`--print-config`) from the checkout's root."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_demo import DEMO_ARGS, NOISE, fresh_env  # tests/e2e is on sys.path (rootdir imports)

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(2400)]

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def block(marker: str) -> list[str]:
    """The lines of the fenced block right after `<!-- marker -->`."""
    match = re.search(rf"<!-- {re.escape(marker)} -->\s*```\w*\n(.*?)\n```", README, re.S)
    assert match, f"README has no block marked <!-- {marker} -->"
    return [line.strip() for line in match.group(1).splitlines() if line.strip() and not line.startswith("#")]


def shell_env(tmp_path: Path) -> dict[str, str]:
    env = fresh_env(tmp_path)
    # what `.venv/bin/...` in the install line gives: the venv's scripts first on PATH
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_the_quick_start_runs_the_demo_the_e2e_test_runs():
    install = README.splitlines()[1]
    assert "pip install" in install
    assert install.endswith("raypdm " + " ".join(DEMO_ARGS)), install


def test_the_tour_runs_literally_from_an_empty_directory(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = shell_env(tmp_path)
    lines = block("readme-tour")
    assert any(line.startswith("raypdm train ") for line in lines) and any("redteam" in line for line in lines)
    for line in lines:
        res = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, f"README command failed: {line}\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
        if line.startswith("raypdm ") and "--print-config" not in line:
            for pattern in NOISE:
                assert not re.search(pattern, res.stdout + res.stderr), f"{line}: {pattern!r} in its output"
    # what the tour wrote is where it says, relative to the directory it was typed in
    for path in ("data", "protected/manifest.parquet", "purified/manifest.parquet", "models/id000/export",
                 "samples/manifest.parquet", "scores/manifest.parquet", "sweep-out/results.parquet", "rt/report.html"):
        assert (cwd / path).exists(), path


@pytest.mark.parametrize("line", block("readme-full-size"), ids=lambda line: " ".join(line.split()[:2]))
def test_every_full_size_command_resolves(line, tmp_path):
    args = shlex.split(line)
    assert args[0] == "raypdm"
    env = shell_env(tmp_path)
    res = subprocess.run([*args, "--print-config"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{line}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    resolved = yaml.safe_load(res.stdout)
    out = resolved.get("output")
    assert out and os.path.isabs(out), resolved
