"""`raypdm demo`: the whole pipeline on tiny models and synthetic data, on an embedded local Ray.

Stages so far: synthetic dataset -> data check -> JPEG (q 75) purification -> the same stage again,
which resumes and writes nothing new -> CodeSR (CodeFormer then x4 super-resolution, tiny random
weights) on the protected split, in a Ray Data actor pool, with faithfulness per image. Later stages
(protection, DreamBooth+CDL, sampling, scoring, search, report) join here as they land.

LPIPS uses a random AlexNet trunk here (no download): its values show the plumbing, not quality.
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
    sr_steps: int = Field(4, ge=1, le=1000, description="x4 upscaler denoising steps in the demo's CodeSR")
    workers: int = Field(2, ge=1, le=64, description="actors in the CodeSR pool")
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
    console.print(f"[1/4] synthetic dataset: {len(n)} images -> {data}")
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
    jpeg_cfg = PurifyConfig(input=data, output=jpeg_out, purifier="jpeg", options={"jpeg": {"quality": 75}},
                            lpips_backbone="random")
    with stage_progress("[2/4] purify: jpeg q75", cfg.progress) as progress:
        result.summaries.append(run_purify(jpeg_cfg, progress=progress))
    with stage_progress("[3/4] purify: jpeg q75 (re-run: resumes)", cfg.progress) as progress:
        rerun = run_purify(jpeg_cfg, progress=progress)
    rerun.stage = "jpeg (re-run)"
    result.summaries.append(rerun)
    result.outputs["jpeg"] = jpeg_out

    # 3. CodeSR (the paper's purifier) on the protected split, faithfulness vs the clean set_A... which is
    # the input itself until protection joins the demo; the reference argument is wired all the same.
    codesr_out = join(cfg.out, "purified", "codesr")
    codesr_cfg = PurifyConfig(input=data, output=codesr_out, purifier="codesr", splits=["set_A"], preset="tiny",
                              options={"sr": {"steps": cfg.sr_steps}}, workers=cfg.workers, batch_size=4,
                              lpips_backbone="random", reference=data)
    with stage_progress("[4/4] purify: codesr (codeformer+sr)", cfg.progress) as progress:
        result.summaries.append(run_purify(codesr_cfg, progress=progress))
    result.outputs["codesr"] = codesr_out
    _print_faithfulness({"jpeg": jpeg_out, "codesr": codesr_out})

    result.seconds = time.perf_counter() - t0
    stage_summary_table(result.summaries, title="demo stages")
    console.print(f"[green]demo finished in {result.seconds:.1f} s[/green]; outputs under {cfg.out}")
    return result


def _print_faithfulness(outputs: dict[str, str]) -> None:
    import math

    from raypdm.data.manifest import Manifest

    rows = []
    for name, uri in outputs.items():
        table = Manifest(uri).read()
        if "lpips" not in table.column_names:
            continue
        df = table.to_pandas()
        df = df[df["error"].isna()]

        def mean(col: str) -> str:
            if col not in df or df[col].isna().all():
                return "-"
            v = df[col].replace([math.inf], float("nan")).mean()
            return f"{v:.3f}"

        rows.append((name, len(df), mean("lpips"), mean("ssim"), mean("ms_ssim"), mean("psnr"), mean("ref_ssim")))
    print_table("faithfulness vs input (means; LPIPS with a random trunk)",
                ["purifier", "images", "LPIPS", "SSIM", "MS-SSIM", "PSNR dB", "SSIM vs clean"], rows)
