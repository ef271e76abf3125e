"""`raypdm demo`: the whole pipeline on tiny models and synthetic data, on an embedded local Ray.

Stages so far: synthetic dataset -> data check -> JPEG (q 75) purification -> the same stage again,
which resumes and writes nothing new. Later stages (CodeSR, protection, DreamBooth+CDL, sampling,
scoring, search, report) join here as they land.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pydantic import Field

from raypdm.config import JobConfig, save_resolved_config
from raypdm.data.uri import join
from raypdm.ui import console, print_table, stage_progress, stage_summary_table

__all__ = ["DemoConfig", "DemoResult", "run_demo"]


class DemoConfig(JobConfig):
    out: str = Field(description="output root (fsspec URI)")
    identities: int = Field(2, ge=1, le=100)
    images: int = Field(4, ge=1, le=100, description="images per split and identity")
    size: int = Field(128, ge=32, le=1024, description="synthetic image side in pixels")
    seed: int = 0
    real_photos: bool = Field(True, description="add an identity cut from scikit-image's astronaut photo")
    progress: bool = True


@dataclass
class DemoResult:
    out: str
    summaries: list = field(default_factory=list)
    seconds: float = 0.0
    data_uri: str = ""
    outputs: dict[str, str] = field(default_factory=dict)


def run_demo(cfg: DemoConfig) -> DemoResult:
    from raypdm.data.check import check_dataset
    from raypdm.data.synthetic import make_synthetic
    from raypdm.pipelines.purify import PurifyConfig, run_purify
    from raypdm.runtime import init_ray

    t0 = time.perf_counter()
    result = DemoResult(out=cfg.out)
    save_resolved_config(cfg, cfg.out, "demo_config.yaml")

    console.rule("[bold]raypdm demo")
    resources = init_ray()
    console.print(f"Ray: {resources.get('CPU', 0):.0f} CPUs, {resources.get('GPU', 0):.0f} GPUs")

    # 1. data
    data = join(cfg.out, "data")
    n = make_synthetic(data, identities=cfg.identities, images=cfg.images, seed=cfg.seed, size=cfg.size,
                       real_photos=cfg.real_photos)
    result.data_uri = data
    console.print(f"[1/3] synthetic dataset: {len(n)} images -> {data}")
    report = check_dataset(data)
    print_table(
        "dataset check",
        ["identity", "split", "images"],
        [(i, s, c) for (i, s), c in report.counts.items()],
    )
    if not report.ok:
        raise RuntimeError(f"the synthetic dataset failed its check: {report.bad or report.problems}")

    # 2. classic purification, then the same stage again to show the resume
    jpeg_out = join(cfg.out, "purified", "jpeg")
    jpeg_cfg = PurifyConfig(input=data, output=jpeg_out, purifier="jpeg", options={"jpeg": {"quality": 75}})
    with stage_progress("[2/3] purify: jpeg q75", cfg.progress) as progress:
        result.summaries.append(run_purify(jpeg_cfg, progress=progress))
    with stage_progress("[3/3] purify: jpeg q75 (re-run: resumes)", cfg.progress) as progress:
        rerun = run_purify(jpeg_cfg, progress=progress)
    rerun.stage = "jpeg (re-run)"
    result.summaries.append(rerun)
    result.outputs["jpeg"] = jpeg_out

    result.seconds = time.perf_counter() - t0
    stage_summary_table(result.summaries, title="demo stages")
    console.print(f"[green]demo finished in {result.seconds:.1f} s[/green]; outputs under {cfg.out}")
    return result
