"""`raypdm demo`: the whole pipeline on tiny models and synthetic data, on an embedded local Ray.

Stages so far: synthetic dataset -> data check -> JPEG (q 75) purification -> the same stage again,
which resumes and writes nothing new -> CodeSR (CodeFormer then x4 super-resolution, tiny random
weights) on the protected split, in a Ray Data actor pool, with faithfulness per image ->
DreamBooth+CDL fine-tuning of two identities in parallel (Ray Tune fan-out, one Ray Train + DeepSpeed
run each) on the purified images -> decoupled negative-guidance sampling of both. Later stages
(protection, scoring, search, report) join here as they land.

LPIPS uses a random AlexNet trunk here (no download): its values show the plumbing, not quality.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from typing import Literal

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
    train_steps: int = Field(4, ge=1, le=10_000, description="DreamBooth+CDL steps per identity")
    train_identities: int = Field(2, ge=1, le=100, description="identities fine-tuned in parallel")
    train_backend: Literal["deepspeed", "ddp"] = "deepspeed"
    sample_images: int = Field(2, ge=1, le=64, description="images per prompt and identity")
    sample_steps: int = Field(4, ge=1, le=1000)
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
    console.print(f"[1/6] synthetic dataset: {len(n)} images -> {data}")
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
    with stage_progress("[2/6] purify: jpeg q75", cfg.progress) as progress:
        result.summaries.append(run_purify(jpeg_cfg, progress=progress))
    with stage_progress("[3/6] purify: jpeg q75 (re-run: resumes)", cfg.progress) as progress:
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
    with stage_progress("[4/6] purify: codesr (codeformer+sr)", cfg.progress) as progress:
        result.summaries.append(run_purify(codesr_cfg, progress=progress))
    result.outputs["codesr"] = codesr_out
    _print_faithfulness({"jpeg": jpeg_out, "codesr": codesr_out})

    # 4. DreamBooth + CDL on the purified set_A: one Ray Train (DeepSpeed) run per identity, in parallel.
    from raypdm.pipelines.sample import SampleJobConfig, run_sample
    from raypdm.pipelines.train import TrainJobConfig, run_train

    models_out = join(cfg.out, "models")
    chosen = sorted(report.identities)[: cfg.train_identities]
    train_cfg = TrainJobConfig(
        data=codesr_out, output=models_out, identities=chosen, preset="tiny",
        train={"steps": cfg.train_steps, "resolution": 64, "gradient_checkpointing": False},
        distributed={"backend": cfg.train_backend, "zero_stage": 2, "workers": 1, "gpus_per_worker": 1.0,
                     "checkpoint_every": max(1, cfg.train_steps // 2), "report_every": 1,
                     "quality_every": max(1, cfg.train_steps // 2)},
        class_prior={"count": 4, "steps": 4, "resolution": 64, "workers": 1, "batch_size": 4},
        max_concurrent=cfg.train_identities,
    )
    console.print(f"[5/6] train: DreamBooth+CDL ({cfg.train_backend}), {len(chosen)} identities in parallel, "
                  f"{cfg.train_steps} steps, token {train_cfg.prompts().token!r}")
    t_train = time.perf_counter()
    outcomes = run_train(train_cfg, log=lambda msg: console.print(f"      {msg}"))
    print_table("train", ["identity", "status", "steps", "final loss", "seconds", "export / error"],
                [(o["identity"], o["status"], o["steps"], o["final_loss"], f"{o['seconds']:.1f}",
                  o["export"] or (o["error"] or "")[:100]) for o in outcomes])
    if any(o["status"] == "failed" for o in outcomes):
        raise RuntimeError("a demo identity failed to train; see the table above")
    result.summaries.append(_TrainSummary("train (dreambooth+cdl)", models_out, len(chosen),
                                          time.perf_counter() - t_train))
    result.outputs["models"] = models_out

    # 5. Decoupled negative-guidance sampling (Eq. 6, w = 7.5) of every trained identity.
    samples_out = join(cfg.out, "samples")
    sample_cfg = SampleJobConfig(models=models_out, output=samples_out, identities=chosen, workers=1, batch_size=4,
                                 sampling={"num_images": cfg.sample_images, "steps": cfg.sample_steps,
                                           "height": 64, "width": 64})
    with stage_progress("[6/6] sample: decoupled guidance, w=7.5", cfg.progress) as progress:
        result.summaries.append(run_sample(sample_cfg, progress=progress))
    result.outputs["samples"] = samples_out

    result.seconds = time.perf_counter() - t0
    stage_summary_table(result.summaries, title="demo stages")
    console.print(f"[green]demo finished in {result.seconds:.1f} s[/green]; outputs under {cfg.out}")
    return result


@dataclass
class _TrainSummary:
    """Shaped like a StageSummary so the stage table shows training too (images = identities here)."""

    stage: str
    output: str
    total: int
    seconds: float
    skipped: int = 0
    errors: int = 0

    @property
    def processed(self) -> int:
        return self.total

    @property
    def images_per_s(self) -> float:
        return 0.0


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
