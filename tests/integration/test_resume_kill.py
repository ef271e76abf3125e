"""Kill `raypdm purify` at awkward moments, through the real CLI in a subprocess, and check that a re-run
converges: every input exactly once in the manifest, every file matching its row, nothing staged left over,
whatever config the killed run had (issue 26: before the commit protocol, 12-18 of 42 PNGs were the
killed run's quality-20 output under quality-75 rows). A rival run into the same root is refused while the
first lives; a killed run's lock is taken over by the next run (issue 27)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from procs import kill_processes_naming  # tests/integration is on sys.path (rootdir imports)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from test_demo import fresh_env, raypdm_cmd  # noqa: E402

from raypdm.data.lock import LOCK_NAME  # noqa: E402
from raypdm.data.manifest import Manifest  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

N = 42  # 2 identities x 3 splits x 7 images
PURIFY = ["purify", "--input", "data", "--output", "out", "--purifier", "jpeg", "--lpips", "random",
          "--no-faithfulness", "--no-progress"]
OTHER_CONFIG = ["--set", "options.jpeg.quality=20"]


@pytest.fixture()
def workdir(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = fresh_env(tmp_path)
    res = subprocess.run([*raypdm_cmd(), "data", "make-synthetic", "--output", "data", "--num-identities", "2",
                          "--images", "7", "--size", "64", "--seed", "0"], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    return cwd, env


def _run(cwd, env, *extra) -> subprocess.CompletedProcess:
    res = subprocess.run([*raypdm_cmd(), *PURIFY, *extra], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode == 0, f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def _staged(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if ".tmp-" in p.name] if out.exists() else []


def _parts(out: Path) -> set[str]:
    folder = out / "_manifest_parts"
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


def _end_ray(env) -> None:
    """Whatever the killed driver's embedded Ray left running (only it names this RAY_TMPDIR)."""
    kill_processes_naming(env["RAY_TMPDIR"])


def _interrupt(cwd, env, when, sig) -> None:
    """Start a run under the other config and send `sig` to its driver once `when(out)` holds."""
    out = cwd / "out"
    proc = subprocess.Popen([*raypdm_cmd(), *PURIFY, *OTHER_CONFIG], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while not when(out):
            assert proc.poll() is None, "the run ended before the moment to interrupt it"
            assert time.monotonic() < deadline, "the moment to interrupt never came"
            time.sleep(0.01)
        os.kill(proc.pid, sig)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        _end_ray(env)


def _check_converged(out: Path) -> None:
    rows = Manifest(str(out)).read().to_pylist()
    assert len(rows) == N and len({(r["identity"], r["split"], r["name"]) for r in rows}) == N
    bad = []
    for r in rows:
        assert r["error"] is None, r
        data = Path(r["uri"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != r["output_sha256"] or len(data) != r["output_bytes"]:
            bad.append(r["uri"])
    assert not bad, f"{len(bad)} files do not match their rows: {bad[:3]}"
    assert not _staged(out), _staged(out)
    assert len(list(out.rglob("*.png"))) == N
    assert {r["run_id"] for r in rows} != {None}


def test_killed_runs_with_another_config_then_the_old_config_converge(workdir):
    cwd, env = workdir
    out = cwd / "out"
    # A rival run into the same root while the first one runs: refused at once, naming the holder; the first
    # run's output stays consistent (issue 27: both exited 0 and 24 of 42 files did not match their rows).
    first = subprocess.Popen([*raypdm_cmd(), *PURIFY], cwd=cwd, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / LOCK_NAME).exists():
        assert first.poll() is None and time.monotonic() < deadline, "the first run never took its lock"
        time.sleep(0.02)
    rival = subprocess.run([*raypdm_cmd(), *PURIFY, *OTHER_CONFIG], cwd=cwd, env=env, capture_output=True,
                           text=True, timeout=120, check=False)
    assert first.poll() is None, "the first run ended before its rival asked (the rival proves nothing)"
    assert rival.returncode == 2, rival.stdout[-2000:] + rival.stderr[-2000:]
    assert "being written by another run" in rival.stderr and f"pid {first.pid}" in rival.stderr, rival.stderr
    first_out, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_out[-2000:] + first_err[-2000:]
    _check_converged(out)
    assert "quality: 20" not in (out / "config.yaml").read_text()
    assert not (out / LOCK_NAME).exists()

    # SIGKILL once the new run's first rows are durable (some outputs are quality 20 now) while its workers
    # write more staged files. (The moment between a part and its renames, and a kill before any row, are
    # tests/unit/test_commit_resume.py's: a subprocess cannot be stopped there on purpose.)
    before = _parts(out)
    _interrupt(cwd, env, lambda o: bool(_parts(o) - before), signal.SIGKILL)
    assert (out / LOCK_NAME).exists()  # a killed run cannot release its lock: the next run takes it over
    second = _run(cwd, env)
    _check_converged(out)
    assert "taking over the lock" in second.stderr and "is gone" in second.stderr, second.stderr
    assert "recomputed" in second.stdout and "config changed" in second.stdout, second.stdout

    # SIGINT while staged files are being written; the re-run hashes every file it keeps.
    _interrupt(cwd, env, lambda o: bool(_staged(o)), signal.SIGINT)
    assert not (out / LOCK_NAME).exists()  # an interrupted run releases its lock on the way out
    third = _run(cwd, env, "--verify", "full")
    _check_converged(out)
    assert "taking over" not in third.stderr

    # A deleted output, a truncated one and a stray staged file: regenerated, regenerated, removed; the
    # other 40 verified and left alone.
    victims = sorted(out.rglob("*.png"))[:2]
    victims[0].unlink()
    with open(victims[1], "r+b") as f:
        f.truncate(10)
    (victims[1].parent / (victims[1].name + ".tmp-20990101T000000000000Z-abcdef")).write_bytes(b"stray")
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.png") if p not in victims}
    last = _run(cwd, env)
    _check_converged(out)
    assert f"{N - 2} outputs verified, {N - 2} inputs skipped; 2 recomputed (1 missing, 1 size)" in last.stdout, \
        last.stdout
    assert "1 staged files removed" in last.stdout, last.stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png") if p not in victims} == stamps

    # Finished: the re-run plans from the manifest and two listings, and starts no Ray at all.
    quiet_env = dict(env, RAY_TMPDIR=tempfile.mkdtemp(prefix="rp-", dir="/tmp"))
    done = _run(cwd, quiet_env)
    assert f"{N} outputs verified, {N} inputs skipped" in done.stdout and "recomputed" not in done.stdout
    assert not os.listdir(quiet_env["RAY_TMPDIR"]), "a finished re-run started Ray"
    shutil.rmtree(quiet_env["RAY_TMPDIR"], ignore_errors=True)
