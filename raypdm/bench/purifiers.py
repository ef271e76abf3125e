"""Purifier throughput benchmark: the same images through three ways of running a purifier.

(a) per-image: one process per image that imports everything and loads the model each time, as the
    field's scripts ran (the paper's Table 2 "seconds per sample" includes all of that);
(b) batched: one process, model loaded once, batches on the device;
(c) ray: the raypdm Ray Data pipeline (`run_purify`), with 1 and 2 workers; chains of model purifiers
    also in both layouts (one actor for the whole chain, "fused", or one pool per model, "pools").

Every mode reads PNGs, decodes, purifies, encodes and writes PNGs, so the work is the same. Seconds per
sample include model loading. Peak memory is the peak RSS of the process (modes a, b) or of the largest
transform actor (mode c), plus peak GPU memory where there is a GPU. Faithfulness scoring is off in (c)
so that it does the same work as (a) and (b).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Literal

from pydantic import Field

from raypdm.config import JobConfig, Uri
from raypdm.data.uri import join
from raypdm.pipelines.purify import _chain_uses_gpu

__all__ = ["PurifierBenchConfig", "run_purifier_bench", "MODEL_CHAINS"]

MODEL_CHAINS = {"codesr"}


class PurifierBenchConfig(JobConfig):
    output: Uri = Field(description="where purifier_throughput.parquet and the plot go")
    purifiers: list[str] = Field(default_factory=lambda: ["jpeg", "gaussian", "tvm", "codeformer", "sr", "codesr"])
    preset: Literal["tiny", "full"] = "tiny"
    weights_dir: Uri | None = None
    images: int = Field(64, ge=1, description="images per mode (b) and (c)")
    per_image_samples: int = Field(4, ge=1, description="mode (a) is slow: time this many processes")
    size: int = Field(512, ge=32, description="side of the synthetic input images")
    batch_size: int = Field(8, ge=1)
    workers: list[int] = Field(default_factory=lambda: [1, 2])
    # Few-step settings so the tiny CPU run finishes in minutes; full-size GPU runs pass the real ones.
    options: dict[str, dict[str, Any]] = Field(default_factory=lambda: {
        "sr": {"steps": 4},
        "latent_diffpure": {"steps": 10},
        "latent_diffpure_null": {"steps": 10},
        "impress": {"iterations": 10, "lpips_net": "alex", "lpips_backbone": "random"},
    })
    modes: list[Literal["per-image", "batched", "ray"]] = Field(default_factory=lambda: ["per-image", "batched", "ray"])


def _worker_cmd(cfg: PurifierBenchConfig, purifier: str, mode: str, inputs: list[str], outdir: str) -> list[str]:
    opts = {k: v for k, v in cfg.options.items() if k in _parts(purifier)}
    cmd = [sys.executable, "-m", "raypdm.bench.worker", "--mode", mode, "--purifier", purifier, "--preset", cfg.preset,
           "--options", json.dumps(opts), "--batch-size", str(cfg.batch_size), "--outdir", outdir, "--inputs", *inputs]
    if cfg.weights_dir:
        cmd += ["--weights-dir", cfg.weights_dir]
    return cmd


def _parts(purifier: str) -> list[str]:
    from raypdm.purify import parse_spec

    return parse_spec(purifier)


def _run_worker(cmd: list[str]) -> tuple[float, dict]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker failed ({proc.returncode}): {proc.stderr[-2000:]}")
    report = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    return wall, report


def _row(purifier: str, mode: str, workers: int | None, layout: str | None, n: int, wall: float, **extra) -> dict:
    return {"purifier": purifier, "mode": mode, "workers": workers, "layout": layout, "images": n,
            "wall_s": wall, "images_per_s": n / wall if wall > 0 else float("nan"),
            "s_per_sample": wall / n if n else float("nan"), **extra}


def _ray_mode(cfg: PurifierBenchConfig, purifier: str, data: str, workers: int, layout: str, tmp: str) -> dict:
    from raypdm.pipelines.purify import PurifyConfig, run_purify

    out = os.path.join(tmp, f"ray-{purifier}-{workers}-{layout}")
    shutil.rmtree(out, ignore_errors=True)
    opts = {k: v for k, v in cfg.options.items() if k in _parts(purifier)}
    pcfg = PurifyConfig(input=data, output=out, purifier=purifier, preset=cfg.preset, weights_dir=cfg.weights_dir,
                        options=opts, batch_size=cfg.batch_size, workers=workers, splits=["set_A"],
                        faithfulness=False, chain_layout=layout)
    t0 = time.perf_counter()
    summary = run_purify(pcfg)
    wall = time.perf_counter() - t0
    if summary.errors:
        raise RuntimeError(f"{summary.errors} errors in the ray mode of {purifier}")
    return _row(purifier, "ray", workers, layout, summary.processed, wall, peak_rss_mb=_ray_peak_rss_mb())


def _warm_up_ray_workers(data: str, tmp: str) -> None:
    """Start and import-warm Ray's task workers once, so no Ray run pays another's process start-up.
    Actor pools still start (and load their models) inside each measured run, as they do for users."""
    from raypdm.pipelines.purify import PurifyConfig, run_purify

    run_purify(PurifyConfig(input=data, output=os.path.join(tmp, "warm-up"), purifier="jpeg", faithfulness=False,
                            splits=["set_A"]))


def _ray_peak_rss_mb() -> float:
    """Largest current RSS among this node's Ray worker processes (the actors still alive after a run)."""
    try:
        import psutil

        peak = 0.0
        for p in psutil.process_iter(["name", "cmdline", "memory_info"]):
            cmd = " ".join(p.info.get("cmdline") or [])
            if "ray::" in (p.info.get("name") or "") or "default_worker.py" in cmd:
                peak = max(peak, p.info["memory_info"].rss / 2**20)
        return peak
    except Exception:
        return float("nan")


def run_purifier_bench(cfg: PurifierBenchConfig, *, log=print) -> "Any":
    """Run every purifier in every mode; write results.parquet and throughput.png under cfg.output."""
    import pandas as pd

    from raypdm.data.synthetic import make_synthetic
    from raypdm.runtime import init_ray

    init_ray()
    tmp = tempfile.mkdtemp(prefix="raypdm-bench-")
    data = os.path.join(tmp, "data")
    per_id = max(1, cfg.images // 4)
    make_synthetic(data, identities=max(1, -(-cfg.images // per_id)), images=per_id, size=cfg.size, splits=("set_A",))
    inputs = sorted(str(p) for p in __import__("pathlib").Path(data).rglob("*.png"))[: cfg.images]
    rows: list[dict] = []
    try:
        for purifier in cfg.purifiers:
            if "per-image" in cfg.modes:
                walls, reports = [], []
                for i, src in enumerate(inputs[: cfg.per_image_samples]):
                    w, r = _run_worker(_worker_cmd(cfg, purifier, "per-image", [src], os.path.join(tmp, f"a-{purifier}-{i}")), )
                    walls.append(w)
                    reports.append(r)
                n = len(walls)
                rows.append(_row(purifier, "per-image", None, None, n, sum(walls),
                                 load_s=sum(r["load_s"] + r["import_s"] for r in reports) / n,
                                 peak_rss_mb=max(r["peak_rss_mb"] for r in reports),
                                 peak_gpu_mb=max(r["peak_gpu_mb"] for r in reports)))
                log(f"{purifier:12s} per-image   {sum(walls) / n:8.2f} s/sample")
            if "batched" in cfg.modes:
                w, r = _run_worker(_worker_cmd(cfg, purifier, "batched", inputs, os.path.join(tmp, f"b-{purifier}")))
                rows.append(_row(purifier, "batched", None, None, r["images"], w, load_s=r["load_s"] + r["import_s"],
                                 compute_s=r["compute_s"], peak_rss_mb=r["peak_rss_mb"], peak_gpu_mb=r["peak_gpu_mb"]))
                log(f"{purifier:12s} batched     {w / r['images']:8.3f} s/sample  {r['images'] / w:7.2f} images/s")
            if "ray" in cfg.modes:
                _warm_up_ray_workers(data, tmp)
                layouts = ["fused", "pools"] if len(_parts(purifier)) > 1 and purifier in MODEL_CHAINS else ["fused"]
                # Classic purifiers run as Ray tasks: a worker count does not apply, one row says it all.
                model = _chain_uses_gpu(_parts(purifier))
                for workers in cfg.workers if model else cfg.workers[:1]:
                    for layout in layouts:
                        row = _ray_mode(cfg, purifier, data, workers, layout, tmp)
                        rows.append(row)
                        log(f"{purifier:12s} ray w={workers} {layout:6s} {row['s_per_sample']:8.3f} s/sample  "
                            f"{row['images_per_s']:7.2f} images/s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    df = pd.DataFrame(rows)
    df["preset"] = cfg.preset
    df["cpus"] = os.cpu_count()
    df["gpu"] = _gpu_name()
    df["date"] = time.strftime("%Y-%m-%d")
    _write(cfg.output, df)
    return df


def _gpu_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except Exception:
        return "none"


def _write(out: str, df) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from raypdm.data.uri import write_bytes

    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    write_bytes(join(out, "purifier_throughput.parquet"), buf.getvalue())

    labels = df.apply(lambda r: r["mode"] + (f" w={int(r['workers'])} {r['layout']}" if r["mode"] == "ray" else ""), axis=1)
    df = df.assign(label=labels)
    pivot = df.pivot_table(index="purifier", columns="label", values="s_per_sample", sort=False)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    pivot.plot.bar(ax=ax, logy=True, rot=0)
    ax.set_ylabel("seconds per sample (log), model loading included")
    ax.set_title(f"purifier throughput, preset {df['preset'].iloc[0]}, {df['cpus'].iloc[0]} CPUs, GPU: {df['gpu'].iloc[0]}")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    write_bytes(join(out, "purifier_throughput.png"), png.getvalue())


def markdown_table(df) -> str:
    """The RESULTS.md table: one row per purifier and mode."""
    lines = ["| purifier | mode | workers | layout | images | s/sample | images/s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in df.itertuples():
        workers = "" if r.mode != "ray" else int(r.workers)
        layout = "" if r.mode != "ray" else r.layout
        lines.append(f"| {r.purifier} | {r.mode} | {workers} | {layout} | {r.images} | {r.s_per_sample:.3f} | "
                     f"{r.images_per_s:.2f} | {r.peak_rss_mb:.0f} |")
    return "\n".join(lines)
