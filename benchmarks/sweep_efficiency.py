"""Noise-token sweep efficiency: the full grid against ASHA early stopping on the same candidates.

    python benchmarks/sweep_efficiency.py --out benchmarks/results                   # tiny preset, CPU
    python benchmarks/sweep_efficiency.py --out r --tokens 8 --steps 40 --report-every 10

Both runs search the same token candidates (the paper's two named tokens plus seeded random strings) ×
the same guidance weights on one synthetic identity, with identical training/sampling settings and
seeds. ASHA (grace period 1 report, reduction factor 2) may stop a token at any intermediate report. For
each mode the benchmark records: total training steps spent (the sum over trials of `steps_trained`),
wall time of the sweep, trials stopped early, and the best (token, w) found; then whether ASHA found
the same best configuration as the grid.

With random tiny models the scores are noise, so "same best" measures whether early stopping keeps the
grid's winner under noisy scores, not a real quality ranking; the training-steps saving is the figure
that carries over to real runs. Writes sweep_efficiency.parquet and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tokens", type=int, default=4, help="candidate tokens (2 named + random strings)")
    p.add_argument("--steps", type=int, default=6, help="training steps per identity")
    p.add_argument("--report-every", type=int, default=2)
    p.add_argument("--w", default="3.0,7.5")
    p.add_argument("--max-concurrent", type=int, default=2)
    args = p.parse_args(argv)

    import pandas as pd

    from raypdm.data.synthetic import make_synthetic
    from raypdm.runtime import init_ray
    from raypdm.search.space import random_tokens
    from raypdm.search.sweep import SweepConfig, run_sweep

    tmp = Path(tempfile.mkdtemp(prefix="rp-sweep-bench-"))
    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="rp", dir="/tmp"))
    init_ray()
    data = tmp / "data"
    make_synthetic(str(data), identities=1, images=2, seed=0, size=64, real_photos=True)
    tokens = ["t@j", "bhi"] + random_tokens(max(0, args.tokens - 2), 3, seed=0)
    ws = [float(x) for x in args.w.split(",")]
    rows = []
    best = {}
    for mode in ("grid", "asha"):
        cfg = SweepConfig(
            output=str(tmp / mode), data=str(data), reference=str(data), preset="tiny",
            space={"tokens": tokens, "w": ws},
            train={"steps": args.steps, "resolution": 64, "gradient_checkpointing": False},
            report_every=args.report_every, probe_images=1,
            sampling={"num_images": 1, "steps": 2, "size": 64, "batch_size": 1},
            class_prior={"count": 2, "steps": 2, "resolution": 64},
            scheduler="asha" if mode == "asha" else "none", asha={"grace_period": 1, "reduction_factor": 2},
            max_concurrent=args.max_concurrent,
        )
        t0 = time.perf_counter()
        out = run_sweep(cfg, log=lambda m: None)
        wall = time.perf_counter() - t0
        trials = out["trials"]
        best[mode] = (out["best"].get("token"), out["best"].get("w"))
        rows.append({"mode": mode, "trials": len(trials), "stopped_early": int((trials["status"] == "stopped").sum()),
                     "errors": int((trials["status"] == "error").sum()),
                     "training_steps": int(trials["steps_trained"].sum()), "wall_s": round(wall, 1),
                     "best_token": best[mode][0], "best_w": best[mode][1]})
    df = pd.DataFrame(rows)
    df["same_best_as_grid"] = [b == best["grid"] for b in (best[m] for m in df["mode"])]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    df.to_parquet(Path(args.out) / "sweep_efficiency.parquet", index=False)
    cols = list(df.columns)
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in df.itertuples(index=False):
        print("| " + " | ".join(str(v) for v in r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
