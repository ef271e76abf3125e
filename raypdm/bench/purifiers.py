"""Purifier throughput benchmark: the same images through the ways a purifier can be run, at several job sizes.

    paper:     the paper's own scripts: a fresh process per identity folder (imports, model load), batch 1;
    plain:     ten lines of Python: one process, model loaded once, one image at a time;
    batched:   one process, model loaded once, batches on the device;
    per-image: a fresh process per image (the worst case; not in the default modes);
    ray:       the raypdm Ray Data pipeline (`run_purify`), with each of `workers`; chains of model
               purifiers also in both layouts (one actor for the whole chain, "fused", or one pool per
               model, "pools").

Every mode reads PNGs, decodes, purifies, encodes and writes PNGs, so the work is the same. Wall times
include imports and model loading: what a user waits for. Each size (`images`, e.g. 16, 64, 1000, 10000) is
its own synthetic dataset of `images_per_identity` images per identity folder. The paper's way at large
sizes would run thousands of processes: it is timed on `paper_folders` folders and scaled to all of them
(`extrapolated` says so; the folders are alike, so the scale is linear). Every row carries its throughput
relative to the paper's way and to the plain loop at the same purifier and size (`vs_paper`, `vs_plain`).
Peak memory is the peak RSS of the process (paper, plain, batched, per-image) or of the largest transform
actor (ray), plus peak GPU memory where there is a GPU. Faithfulness scoring is off in the ray mode so that
it does the same work as the others.
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

from pydantic import Field, field_validator

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
    images: list[int] = Field(default_factory=lambda: [16, 64],
                              description="job sizes: each mode runs each purifier on this many images")
    images_per_identity: int = Field(4, ge=1, description="images per identity folder (the paper's set_A: 4)")
    paper_folders: int = Field(8, ge=1, description="the paper's way is timed on at most this many identity "
                                                    "folders per size and scaled to the rest")
    per_image_samples: int = Field(4, ge=1, description="per-image mode is slow: time this many processes")
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
    modes: list[Literal["paper", "plain", "batched", "per-image", "ray"]] = Field(
        default_factory=lambda: ["paper", "plain", "batched", "ray"])

    @field_validator("purifiers")
    @classmethod
    def _known_purifiers(cls, v: list[str]) -> list[str]:
        for name in v:
            _parts(name)  # ValueError naming the known purifiers: the config error names the field
        return v

    @field_validator("images", mode="before")
    @classmethod
    def _one_size(cls, v):
        return [v] if isinstance(v, int) else v

    @field_validator("images")
    @classmethod
    def _positive_sizes(cls, v: list[int]) -> list[int]:
        if not v or any(n < 1 for n in v):
            raise ValueError("every job size must be at least 1 image")
        return sorted(set(v))


def _worker_cmd(cfg: PurifierBenchConfig, purifier: str, mode: str, inputs: list[str], outdir: str,
                batch_size: int | None = None) -> list[str]:
    opts = {k: v for k, v in cfg.options.items() if k in _parts(purifier)}
    cmd = [sys.executable, "-m", "raypdm.bench.worker", "--mode", mode, "--purifier", purifier, "--preset", cfg.preset,
           "--options", json.dumps(opts), "--batch-size", str(batch_size or cfg.batch_size), "--outdir", outdir,
           "--inputs", *inputs]
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
    """`raypdm purify` as a user types it, in its own process with its own embedded Ray (or the cluster at
    RAY_ADDRESS): the wall time includes imports, Ray's start and shutdown, as the other modes' do."""
    out = os.path.join(tmp, f"ray-{purifier}-{workers}-{layout}")
    shutil.rmtree(out, ignore_errors=True)
    opts = {k: v for k, v in cfg.options.items() if k in _parts(purifier)}
    cmd = [sys.executable, "-m", "raypdm.cli", "purify", "--input", data, "--output", out, "--purifier", purifier,
           "--preset", cfg.preset, "--batch-size", str(cfg.batch_size), "--workers", str(workers),
           "--splits", "set_A", "--no-faithfulness", "--chain-layout", layout, "--no-progress"]
    if cfg.weights_dir:
        cmd += ["--weights-dir", cfg.weights_dir]
    for name, values in opts.items():
        for key, value in values.items():
            cmd += ["--set", f"options.{name}.{key}={json.dumps(value)}"]
    wall, peak, proc = _timed(cmd)
    if proc.returncode != 0:
        raise RuntimeError(f"raypdm purify failed ({proc.returncode}) in the ray mode of {purifier}: "
                           f"{proc.stderr[-2000:]}")
    from raypdm.data.manifest import Manifest

    rows = Manifest(out).read().to_pylist()
    errors = sum(r["error"] is not None for r in rows)
    if errors:
        raise RuntimeError(f"{errors} errors in the ray mode of {purifier}")
    shutil.rmtree(out, ignore_errors=True)  # 10k outputs per run add up in the temporary folder
    return _row(purifier, "ray", workers, layout, len(rows), wall, peak_rss_mb=peak)


def _timed(cmd: list[str]) -> tuple[float, float, subprocess.CompletedProcess]:
    """Run `cmd`; (wall seconds, the largest RSS any process of its tree reached in MB, the result)."""
    import threading

    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0.0]
    done = threading.Event()

    def watch() -> None:  # Ray's workers are the driver's descendants (raylet's children) on this node
        root = psutil.Process(proc.pid)
        while not done.wait(0.2):
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        peak[0] = max(peak[0], p.memory_info().rss / 2**20)
                    except psutil.Error:
                        pass
            except psutil.Error:
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    watcher.join()
    return wall, peak[0], subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _dataset(cfg: PurifierBenchConfig, n: int, root: str) -> tuple[str, list[list[str]]]:
    """`n` images in identity folders of `images_per_identity` (the last one may hold fewer); (root, folders)."""
    from pathlib import Path

    from raypdm.data.synthetic import make_synthetic

    per = cfg.images_per_identity
    data = os.path.join(root, f"data-{n}")
    make_synthetic(data, identities=-(-n // per), images=per, size=cfg.size, splits=("set_A",))
    folders = [sorted(str(p) for p in (d / "set_A").glob("*.png")) for d in sorted(Path(data).iterdir()) if d.is_dir()]
    extra = len(folders) * per - n
    for path in folders[-1][per - extra:] if extra else []:
        os.remove(path)
    folders[-1] = folders[-1][: per - extra]
    return data, [f for f in folders if f]


def _paper_mode(cfg, purifier: str, folders: list[list[str]], tmp: str) -> dict:
    """A fresh process per identity folder, batch 1; timed on `paper_folders` folders, scaled to all."""
    timed = folders[: cfg.paper_folders]
    walls, reports = [], []
    for i, folder in enumerate(timed):
        w, r = _run_worker(_worker_cmd(cfg, purifier, "batched", folder, os.path.join(tmp, f"paper-{purifier}-{i}"),
                                       batch_size=1))
        walls.append(w)
        reports.append(r)
    n_all = sum(len(f) for f in folders)
    n_timed = sum(len(f) for f in timed)
    wall = sum(walls) * n_all / n_timed
    return _row(purifier, "paper", None, None, n_all, wall, timed_images=n_timed, extrapolated=n_timed < n_all,
                load_s=sum(r["load_s"] + r["import_s"] for r in reports) / len(reports),
                peak_rss_mb=max(r["peak_rss_mb"] for r in reports), peak_gpu_mb=max(r["peak_gpu_mb"] for r in reports))


def run_purifier_bench(cfg: PurifierBenchConfig, *, log=print) -> "Any":
    """Run every purifier in every mode at every size; write the Parquet table and the plot under cfg.output."""
    import pandas as pd

    tmp = tempfile.mkdtemp(prefix="raypdm-bench-")
    rows: list[dict] = []
    try:
        for n in cfg.images:
            data, folders = _dataset(cfg, n, tmp)
            inputs = [p for f in folders for p in f]
            for purifier in cfg.purifiers:
                def say(row: dict) -> None:
                    label = row["mode"] + (f" w={row['workers']} {row['layout']}" if row["mode"] == "ray" else "")
                    log(f"{n:6d} images  {purifier:12s} {label:18s} {row['wall_s']:9.2f} s  "
                        f"{row['images_per_s']:9.2f} images/s" + ("  (scaled)" if row.get("extrapolated") else ""))

                def add(row: dict) -> None:
                    rows.append(row)
                    say(row)

                if "paper" in cfg.modes:
                    add(_paper_mode(cfg, purifier, folders, tmp))
                for mode, batch in (("plain", 1), ("batched", cfg.batch_size)):
                    if mode in cfg.modes:
                        w, r = _run_worker(_worker_cmd(cfg, purifier, "batched", inputs,
                                                       os.path.join(tmp, f"{mode}-{purifier}-{n}"), batch_size=batch))
                        add(_row(purifier, mode, None, None, r["images"], w, load_s=r["load_s"] + r["import_s"],
                                 compute_s=r["compute_s"], peak_rss_mb=r["peak_rss_mb"], peak_gpu_mb=r["peak_gpu_mb"]))
                        shutil.rmtree(os.path.join(tmp, f"{mode}-{purifier}-{n}"), ignore_errors=True)
                if "per-image" in cfg.modes:
                    walls, reports = [], []
                    for i, src in enumerate(inputs[: cfg.per_image_samples]):
                        w, r = _run_worker(_worker_cmd(cfg, purifier, "per-image", [src],
                                                       os.path.join(tmp, f"a-{purifier}-{i}")))
                        walls.append(w)
                        reports.append(r)
                    k = len(walls)
                    add(_row(purifier, "per-image", None, None, n, sum(walls) * n / k, timed_images=k,
                             extrapolated=k < n, load_s=sum(r["load_s"] + r["import_s"] for r in reports) / k,
                             peak_rss_mb=max(r["peak_rss_mb"] for r in reports),
                             peak_gpu_mb=max(r["peak_gpu_mb"] for r in reports)))
                if "ray" in cfg.modes:
                    layouts = ["fused", "pools"] if len(_parts(purifier)) > 1 and purifier in MODEL_CHAINS else ["fused"]
                    # Classic purifiers run as Ray tasks: a worker count does not apply, one row says it all.
                    model = _chain_uses_gpu(_parts(purifier))
                    for workers in cfg.workers if model else cfg.workers[:1]:
                        for layout in layouts:
                            add(_ray_mode(cfg, purifier, data, workers, layout, tmp))
            shutil.rmtree(data, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    df = with_ratios(pd.DataFrame(rows))
    df["preset"] = cfg.preset
    df["size"] = cfg.size
    df["cpus"] = os.cpu_count()
    df["gpu"] = _gpu_name()
    df["date"] = time.strftime("%Y-%m-%d")
    _write(cfg.output, df)
    return df


def with_ratios(df):
    """`vs_paper` and `vs_plain`: each row's images/s over that mode's at the same purifier and size (NaN
    where that mode did not run)."""
    if "timed_images" not in df:
        df["timed_images"] = df["images"]
    df["timed_images"] = df["timed_images"].fillna(df["images"]).astype(int)
    if "extrapolated" not in df:
        df["extrapolated"] = False
    df["extrapolated"] = df["extrapolated"].fillna(False).astype(bool)
    for mode in ("paper", "plain"):
        base = df[df["mode"] == mode].set_index(["purifier", "images"])["images_per_s"]
        keys = list(zip(df["purifier"], df["images"]))
        df[f"vs_{mode}"] = [df["images_per_s"].iloc[i] / base[k] if k in base.index else float("nan")
                            for i, k in enumerate(keys)]
    return df


def _gpu_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except Exception:
        return "none"


def _label(row) -> str:
    return row["mode"] + (f" w={int(row['workers'])} {row['layout']}" if row["mode"] == "ray" else "")


def _write(out: str, df) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from raypdm.data.uri import write_bytes

    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    write_bytes(join(out, "purifier_throughput.parquet"), buf.getvalue())

    # images/s against job size, a line per purifier and mode: where the fixed costs stop deciding.
    df = df.assign(label=df.apply(_label, axis=1))
    purifiers = list(dict.fromkeys(df["purifier"]))
    fig, axes = plt.subplots(1, len(purifiers), figsize=(4.2 * len(purifiers) + 1, 4), squeeze=False)
    for ax, purifier in zip(axes[0], purifiers):
        part = df[df["purifier"] == purifier]
        for label, line in part.groupby("label", sort=False):
            line = line.sort_values("images")
            ax.plot(line["images"], line["images_per_s"], marker="o", label=label,
                    linestyle="--" if line["extrapolated"].any() else "-")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("images in the job")
        ax.set_title(purifier)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("images/s (wall, loading included)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"purifier throughput, preset {df['preset'].iloc[0]}, {df['cpus'].iloc[0]} CPUs, "
                 f"GPU: {df['gpu'].iloc[0]} (dashed: scaled from a sample)", fontsize=9)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    write_bytes(join(out, "purifier_throughput.png"), png.getvalue())


def markdown_table(df) -> str:
    """The RESULTS.md table: one row per size, purifier and mode, with the ratios to the paper's way and
    the plain loop."""
    def ratio(v) -> str:
        return "" if v != v else f"{v:.2f}×"

    lines = ["| images | purifier | mode | wall s | images/s | vs paper | vs plain | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in df.sort_values(["images", "purifier"], kind="stable").itertuples():
        mode = _label(r._asdict()) + (" (scaled)" if r.extrapolated else "")
        lines.append(f"| {r.images} | {r.purifier} | {mode} | {r.wall_s:.1f} | {r.images_per_s:.2f} | "
                     f"{ratio(r.vs_paper)} | {ratio(r.vs_plain)} | {r.peak_rss_mb:.0f} |")
    return "\n".join(lines)
