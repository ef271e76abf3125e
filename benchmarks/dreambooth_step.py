"""DreamBoothing step time and peak memory on Ray Train: DDP vs DeepSpeed ZeRO-2, 1 and 2 workers.

    python benchmarks/dreambooth_step.py --out benchmarks/results                     # tiny preset, CPU
    python benchmarks/dreambooth_step.py --out r --preset full --resolution 512 --device gpu \\
        --configs "bf16:1,zero2:1"                                                  # on a GPU node
    python benchmarks/dreambooth_step.py --out r --configs ddp:1 --log-every 1 --log-to none  # loggers' overhead:
    python benchmarks/dreambooth_step.py --out r --configs ddp:1 --log-every 1 --log-to tensorboard

Makes one synthetic identity (2 images) and 2 class-prior images once, then for every config trains that
identity with `run_identity_training` for --steps steps. Checkpoints and validation losses happen only at
the last step (checkpoint_every/quality_every > steps), so the timed steps carry no checkpoint cost.

Seconds per step: rank 0's `step_hook(rank, steps_done)` wall-clock timestamps, median of the step
intervals after the first 2 steps (warm-up: DeepSpeed/DDP set-up, allocator, first autograd graph).
Peak RSS: each worker's `resource.getrusage(RUSAGE_SELF).ru_maxrss`, written by the hook to one small JSON
file per rank; peak GPU memory (`torch.cuda.max_memory_allocated`) too on GPU. Total wall: the whole
`run_identity_training` call (Ray Train start-up, model build, latent caching, steps, final checkpoint,
export).

Configs: `<kind>:<workers>`, kind one of ddp (Torch DDP, fp32 on CPU / bf16 autocast on GPU), bf16 (same
as ddp, named for the GPU comparison "plain bf16"), zero0, zero1, zero2, zero3 (DeepSpeed at that stage).

Sets RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.2 before Ray starts (Ray Train V2's controller otherwise polls
every 2 s and a worker's report waits for that poll, which would add up to 2 s to the final step).

Writes dreambooth_step.parquet and dreambooth_step.png under --out and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

WARMUP = 2


class StepProbe:
    """Step hook: per-step wall-clock timestamps (rank 0) and peak memory (every rank) into JSON files."""

    def __init__(self, folder: str):
        self.folder = folder
        self.times: list[float] = []

    def __call__(self, rank: int, step: int) -> None:
        import resource

        now = time.time()
        if rank == 0:
            self.times.append(now)
        peak_gpu = None
        try:
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                peak_gpu = torch.cuda.max_memory_allocated() / 2**20
        except Exception:  # noqa: BLE001 - monitoring must never break training
            pass
        record = {
            "rank": rank,
            "step": step,
            "times": self.times if rank == 0 else [],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
            "peak_gpu_mb": peak_gpu,
            "pid": os.getpid(),
        }
        path = Path(self.folder) / f"rank{rank}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)


def parse_configs(text: str) -> list[tuple[str, str, int, int]]:
    """'ddp:1,zero2:2' -> [(name, backend, zero_stage, workers)]."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        kind, _, n = item.partition(":")
        workers = int(n or 1)
        if kind in ("ddp", "bf16"):
            out.append((item, "ddp", 0, workers))
        elif kind.startswith("zero") and kind[4:].isdigit():
            out.append((item, "deepspeed", int(kind[4:]), workers))
        else:
            raise SystemExit(f"unknown config {item!r}: use ddp|bf16|zero0..zero3 followed by :<workers>")
    return out


def make_data(root: Path, resolution: int, preset: str, gpu: bool) -> tuple[str, str, str]:
    """One synthetic identity (2 images) and 2 class-prior images; returns (data, class_images, how)."""
    from raypdm.data.synthetic import make_synthetic
    from raypdm.train.priors import ClassPriorConfig, generate_class_images

    data = root / "data"
    made = make_synthetic(str(data), identities=1, images=2, size=resolution, splits=("set_A",))
    identity = Path(sorted(made)[0]).parent.parent.name
    try:
        cfg = ClassPriorConfig(count=2, steps=2, resolution=resolution, preset="tiny", batch_size=2,
                               gpus_per_worker=1.0 if gpu else 0.0)  # fmt: skip
        classes = generate_class_images(cfg, str(root / "priors"))
        print("class priors: generate_class_images (tiny sd21-base, 2 images, 2 steps)", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001 - fall back to synthetic faces; the step cost is the same
        print(f"class priors: generate_class_images failed ({exc!r}); using synthetic images", file=sys.stderr)
        src = make_synthetic(str(root / "prior-src"), identities=1, images=2, size=resolution, seed=7,
                             splits=("set_A",))  # fmt: skip
        folder = root / "class_images"
        folder.mkdir()
        for i, uri in enumerate(sorted(src)):
            (folder / f"{i:04d}.png").write_bytes(Path(uri).read_bytes())
        classes = str(folder)
    return str(data), classes, identity


def run_one(name, backend, stage, workers, args, data, classes, identity, work: Path) -> dict:
    from raypdm.train import TrainConfig, cdl_prompts
    from raypdm.train.distributed import DistributedConfig, IdentityTrainJob, run_identity_training
    from raypdm.train.loggers import TrainLogging

    gpu = args.device == "gpu"
    probe_dir = Path(tempfile.mkdtemp(prefix=f"probe-{name.replace(':', '-')}-", dir=work))
    row = {"config": name, "backend": backend, "zero_stage": stage if backend == "deepspeed" else None,
           "workers": workers, "preset": args.preset, "resolution": args.resolution, "steps": args.steps,
           "device": args.device, "status": "ok", "error": ""}  # fmt: skip
    big = args.steps + 1000
    dist = {"backend": backend, "workers": workers, "gpus_per_worker": 1.0 if gpu else 0.0,
            "checkpoint_every": big, "quality_every": big, "report_every": big, "max_failures": 0}  # fmt: skip
    if backend == "deepspeed":
        dist["zero_stage"] = stage
    train = {"steps": args.steps, "lr": 1e-5, "resolution": args.resolution, "seed": 1}
    if gpu and name.startswith("bf16"):
        train["mixed_precision"] = "bf16"
    # --log-to none: no logger at all (the baseline for the loggers' overhead); otherwise those backends
    # log scalars every `log_every` steps; validation images only at the last step (outside the timed steps)
    log_to = [] if args.log_to == "none" else args.log_to.split(",")
    if args.log_every:  # reports (Ray Train metrics + the loggers' scalars) every N steps, in both runs
        dist["report_every"] = args.log_every
    logs = TrainLogging(log_to=log_to, validation_every=big)
    row["log_to"] = args.log_to
    job = IdentityTrainJob(identity=identity, data=data, output=str(work / "runs" / name.replace(":", "-")),
                           class_images=classes, preset=args.preset, train=TrainConfig(**train),
                           prompts=cdl_prompts(), distributed=DistributedConfig(**dist), logs=logs)  # fmt: skip
    t0 = time.perf_counter()
    try:
        result = run_identity_training(job, step_hook=StepProbe(str(probe_dir)))
        row["final_loss"] = result.final_loss
    except Exception as exc:  # noqa: BLE001 - record the failure, go on with the next config
        row["status"] = "failed"
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        traceback.print_exc()
    row["total_wall_s"] = time.perf_counter() - t0
    records = [json.loads(p.read_text()) for p in sorted(probe_dir.glob("rank*.json"))]
    r0 = next((r for r in records if r["rank"] == 0), None)
    times = r0["times"] if r0 else []
    gaps = [b - a for a, b in zip(times, times[1:])][WARMUP - 1 :] if len(times) > WARMUP else []
    row["timed_steps"] = len(gaps)
    row["s_per_step"] = statistics.median(gaps) if gaps else float("nan")
    row["steps_per_s"] = 1.0 / row["s_per_step"] if gaps else float("nan")
    row["first_steps_s"] = (times[WARMUP - 1] - times[0]) if len(times) >= WARMUP else float("nan")
    rss = [r["peak_rss_mb"] for r in records]
    row["peak_rss_mb_max"] = max(rss) if rss else float("nan")
    row["peak_rss_mb_per_rank"] = json.dumps([round(x) for x in rss])
    gpu_mb = [r["peak_gpu_mb"] for r in records if r.get("peak_gpu_mb") is not None]
    row["peak_gpu_mb_max"] = max(gpu_mb) if gpu_mb else float("nan")
    return row


def fmt(x, spec) -> str:
    return "" if x is None or x != x else format(x, spec)


def table(rows: list[dict], gpu: bool) -> str:
    head = ["config", "backend", "zero stage", "workers", "s/step", "steps/s", "peak RSS MB"]
    head += ["peak GPU MB"] if gpu else []
    head += ["total wall s", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["config"], r["backend"], "" if r["zero_stage"] is None else str(r["zero_stage"]),
                 str(r["workers"]), fmt(r["s_per_step"], ".3f"), fmt(r["steps_per_s"], ".2f"),
                 fmt(r["peak_rss_mb_max"], ".0f")]  # fmt: skip
        cells += [fmt(r["peak_gpu_mb_max"], ".0f")] if gpu else []
        cells += [fmt(r["total_wall_s"], ".1f"), r["status"] + (f": {r['error']}" if r["error"] else "")]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["s_per_step"] == r["s_per_step"]]
    fig, axes = plt.subplots(1, 2, figsize=(7, 2.6), dpi=90)
    names = [r["config"] for r in ok]
    axes[0].bar(names, [r["s_per_step"] for r in ok], color="#4c72b0")
    axes[0].set_ylabel("s / step (median)")
    axes[1].bar(names, [r["peak_rss_mb_max"] for r in ok], color="#dd8452")
    axes[1].set_ylabel("peak RSS per worker, MB")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle(f"DreamBooth step, {ok[0]['preset'] if ok else ''} preset, {ok[0]['resolution'] if ok else ''} px",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--preset", choices=["tiny", "full"], default="tiny")
    p.add_argument("--configs", default="ddp:1,ddp:2,zero2:1,zero2:2")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--log-to", default="tensorboard",
                   help="none, or loggers as `raypdm train --log-to` takes them (tensorboard,wandb,mlflow)")
    p.add_argument("--log-every", type=int, default=0,
                   help="steps between reports and logged scalars (0: only at the end; 1: the worst case)")
    args = p.parse_args(argv)
    if args.steps <= WARMUP + 1:
        p.error(f"--steps must be > {WARMUP + 1} (the first {WARMUP} steps are warm-up)")
    configs = parse_configs(args.configs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from raypdm.runtime import init_ray

    resources = init_ray()
    print(f"ray resources: {resources}", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory(prefix="raypdm-dbstep-") as tmp:
        work = Path(tmp)
        data, classes, identity = make_data(work, args.resolution, args.preset, args.device == "gpu")
        for name, backend, stage, workers in configs:
            print(f"== {name}: {backend} zero={stage} workers={workers}", file=sys.stderr, flush=True)
            row = run_one(name, backend, stage, workers, args, data, classes, identity, work)
            row.update(machine=platform.node(), cpus=os.cpu_count(), date=time.strftime("%Y-%m-%d"))
            rows.append(row)
            print(f"   {row['status']} s/step={row['s_per_step']:.3f} wall={row['total_wall_s']:.1f}s "
                  f"rss={row['peak_rss_mb_per_rank']} {row['error']}", file=sys.stderr, flush=True)  # fmt: skip

    import pandas as pd

    pd.DataFrame(rows).to_parquet(out / "dreambooth_step.parquet", index=False)
    try:
        plot(rows, out / "dreambooth_step.png")
    except Exception as exc:  # noqa: BLE001
        print(f"plot failed: {exc!r}", file=sys.stderr)
    print(table(rows, args.device == "gpu"))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
