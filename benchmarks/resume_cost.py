"""What a re-run of a finished stage costs (issue 26's targets).

Two measurements:
1. `raypdm purify --purifier jpeg` on 42 synthetic images, as a user types it, each command in its own
   process with its own embedded Ray: S = `raypdm purify --help` (start-up), the first run, and the re-run
   with every row finished. Target: (re-run - S) <= 10% of (first run - S).
2. The resume check itself on N finished rows of 512x512 PNGs (`raypdm.data.resume.plan_resume`, what the
   driver runs before any Ray work): size check (target <= 2 s for 1,000) and `--verify full` (sha256 of
   every output and input; target <= 10 s for 1,000).

    python benchmarks/resume_cost.py [--rows 1000] [--out benchmarks/results]

Writes `resume_cost.parquet` (one row per measurement) and prints a table.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _raypdm() -> list[str]:
    exe = shutil.which("raypdm", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "raypdm.cli"]


def _timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if res.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return time.perf_counter() - t0


def cli_rerun(work: Path) -> list[dict]:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_TMPDIR=tempfile.mkdtemp(prefix="rb-", dir="/tmp"))
    cwd = work / "cli"
    cwd.mkdir(parents=True)
    _timed([*_raypdm(), "data", "make-synthetic", "--output", "data", "--num-identities", "2", "--images", "7",
            "--size", "128", "--seed", "0"], cwd, env)
    purify = [*_raypdm(), "purify", "--input", "data", "--output", "out", "--purifier", "jpeg", "--lpips", "random",
              "--no-progress"]
    start = min(_timed([*_raypdm(), "purify", "--help"], cwd, env) for _ in range(3))
    first = _timed(purify, cwd, env)
    rerun = min(_timed(purify, cwd, env) for _ in range(3))
    share = (rerun - start) / (first - start)
    return [{"measurement": "raypdm purify jpeg, 42 images", "rows": 42, "startup_s": start, "first_run_s": first,
             "rerun_s": rerun, "rerun_share": share}]


def _finished_stage(work: Path, rows: int) -> tuple[list, str]:
    """`rows` 512x512 inputs and their outputs, with a manifest as a finished stage leaves it."""
    import pyarrow as pa

    from raypdm.data.commit import publish, write_staged
    from raypdm.data.decode import encode_png, sha256_hex
    from raypdm.data.layout import list_images
    from raypdm.data.manifest import Manifest

    from skimage import data as photos

    base = photos.astronaut()  # a real 512x512 photo: its PNG is the size a user's outputs have (~600 KB)
    data_root, out = work / "data", work / "out"
    for i in range(rows):
        img = np.roll(base, i, axis=1)  # a different file per row
        path = data_root / f"id{i // 100:03d}" / "set_A" / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_png(img))
    refs, _ = list_images(str(data_root), splits=("set_A",))
    manifest = Manifest(str(out))
    table_rows = []
    for ref in refs:
        data = Path(ref.src_uri).read_bytes()
        final = str(out / ref.identity / ref.split / ref.name)
        write_staged(final, data, manifest.run_id)
        table_rows.append({"identity": ref.identity, "split": ref.split, "name": ref.name, "src_uri": ref.src_uri,
                           "uri": final, "input_sha256": sha256_hex(data), "input_bytes": ref.size,
                           "input_mtime": ref.mtime, "output_sha256": sha256_hex(data), "output_bytes": len(data),
                           "stage": "copy", "config_hash": "bench"})
    table = manifest.stamp(pa.Table.from_pylist(table_rows))
    manifest.append(table)
    publish(table, manifest.run_id)
    manifest.compact()
    return refs, str(out)


def planner(work: Path, rows: int) -> list[dict]:
    from raypdm.data.layout import list_images
    from raypdm.data.manifest import Manifest
    from raypdm.data.resume import plan_resume

    refs, out = _finished_stage(work, rows)
    megabytes = sum(r.size for r in refs) * 2 / 1e6  # inputs + outputs
    results = []
    for verify in ("size", "full"):
        t0 = time.perf_counter()
        # What the driver does: list the inputs, read the manifest, plan (listing the outputs, hashing for full).
        fresh, _ = list_images(str(work / "data"), splits=("set_A",))
        plan = plan_resume(fresh, Manifest(out).read().to_pylist(), "bench", out, verify)
        seconds = time.perf_counter() - t0
        assert plan.skipped == rows and not plan.todo, plan
        results.append({"measurement": f"resume check, verify={verify}", "rows": rows, "seconds": seconds,
                        "megabytes_on_disk": megabytes})
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--skip-cli", action="store_true", help="only the resume check")
    args = ap.parse_args()
    import pandas as pd

    with tempfile.TemporaryDirectory(prefix="resume-bench-") as tmp:
        work = Path(tmp)
        results = [] if args.skip_cli else cli_rerun(work)
        results += planner(work, args.rows)
    frame = pd.DataFrame(results).assign(machine=f"{platform.node()} {os.cpu_count()} cpus", date=time.strftime("%F"))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    frame.to_parquet(Path(args.out) / "resume_cost.parquet")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(frame.drop(columns=["machine"]).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
