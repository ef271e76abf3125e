"""`raypdm demo`: the whole pipeline on tiny models and synthetic data, on an embedded local Ray.

The paper's story, end to end: synthetic dataset + check -> protect set_A with AdvDM (PGD, 11/255) ->
JPEG (q 75) purification, then the same stage again, which resumes and writes nothing new -> CodeSR
(CodeFormer then x4 super-resolution) on the protected split, in a Ray Data actor pool, faithfulness vs
the protected input and the clean image -> DreamBooth+CDL fine-tuning of two identities in parallel
(Ray Tune fan-out, one Ray Train + DeepSpeed run each) on the purified images -> decoupled negative-
guidance sampling -> scoring (IMS, FDFR, Q, latent mismatch) -> a 2-token × 2-w noise-token sweep on
Ray Tune -> the smoke red-team matrix (advdm × {none, codesr} × {CDL, vanilla}) with Tables 1/2/4 and
the HTML report.

Every model has random weights (nothing can be downloaded): the numbers show the plumbing, not quality.
LPIPS uses a random AlexNet trunk here for the same reason.
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
    protect_steps: int = Field(2, ge=1, le=1000, description="AdvDM PGD steps in the demo's protection")
    train_steps: int = Field(4, ge=1, le=10_000, description="DreamBooth+CDL steps per identity")
    train_identities: int = Field(2, ge=1, le=100, description="identities fine-tuned in parallel")
    train_backend: Literal["deepspeed", "ddp"] = "deepspeed"
    sample_images: int = Field(2, ge=1, le=64, description="images per prompt and identity")
    sample_steps: int = Field(4, ge=1, le=1000)
    sweep: bool = Field(True, description="run the 2-token × 2-w noise-token sweep")
    redteam: bool = Field(True, description="run the smoke red-team matrix and write report.html")
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
    console.print(f"[1/10] synthetic dataset: {len(n)} images -> {data}")
    report = check_dataset(data)
    print_table(
        "dataset check",
        ["identity", "split", "images"],
        [(i, s, c) for (i, s), c in report.counts.items()],
    )
    if not report.ok:
        raise RuntimeError(f"the synthetic dataset failed its check: {report.bad or report.problems}")

    # 2. protection: AdvDM on every identity's set_A (set_B/set_C copied through as clean references)
    from raypdm.pipelines.protect import ProtectJobConfig, run_protect

    protected = join(cfg.out, "protected", "advdm")
    protect_cfg = ProtectJobConfig(input=data, output=protected, method="advdm", preset="tiny",
                                   options={"steps": cfg.protect_steps, "resample": False},
                                   lpips_backbone="random", batch_size=4)
    with stage_progress("[2/10] protect: advdm (PGD, r = 11/255)", cfg.progress) as progress:
        result.summaries.extend(run_protect(protect_cfg, progress=progress))
    result.outputs["protected"] = protected
    _print_protection(protected)

    # 3. classic purification of the protected data, then the same stage again to show the resume
    jpeg_out = join(cfg.out, "purified", "jpeg")
    jpeg_cfg = PurifyConfig(input=protected, output=jpeg_out, purifier="jpeg", options={"jpeg": {"quality": 75}},
                            lpips_backbone="random", reference=data)
    with stage_progress("[3/10] purify: jpeg q75", cfg.progress) as progress:
        result.summaries.append(run_purify(jpeg_cfg, progress=progress))
    with stage_progress("[3/10] purify: jpeg q75 (re-run: resumes)", cfg.progress) as progress:
        rerun = run_purify(jpeg_cfg, progress=progress)
    rerun.stage = "jpeg (re-run)"
    result.summaries.append(rerun)
    result.outputs["jpeg"] = jpeg_out

    # 4. CodeSR (the paper's purifier) on the protected split; faithfulness vs its input and vs the clean image
    codesr_out = join(cfg.out, "purified", "codesr")
    codesr_cfg = PurifyConfig(input=protected, output=codesr_out, purifier="codesr", splits=["set_A"], preset="tiny",
                              options={"sr": {"steps": cfg.sr_steps}}, workers=cfg.workers, batch_size=4,
                              lpips_backbone="random", reference=data)
    with stage_progress("[4/10] purify: codesr (codeformer+sr)", cfg.progress) as progress:
        result.summaries.append(run_purify(codesr_cfg, progress=progress))
    result.outputs["codesr"] = codesr_out
    _print_faithfulness({"jpeg": jpeg_out, "codesr": codesr_out})

    # 5. DreamBooth + CDL on the purified set_A: one Ray Train (DeepSpeed) run per identity, in parallel.
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
    console.print(f"[5/10] train: DreamBooth+CDL ({cfg.train_backend}), {len(chosen)} identities in parallel, "
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

    # 6. Decoupled negative-guidance sampling (Eq. 6, w = 7.5) of every trained identity.
    samples_out = join(cfg.out, "samples")
    sample_cfg = SampleJobConfig(models=models_out, output=samples_out, identities=chosen, workers=1, batch_size=4,
                                 sampling={"num_images": cfg.sample_images, "steps": cfg.sample_steps,
                                           "height": 64, "width": 64})
    with stage_progress("[6/10] sample: decoupled guidance, w=7.5", cfg.progress) as progress:
        result.summaries.append(run_sample(sample_cfg, progress=progress))
    result.outputs["samples"] = samples_out

    # 7. Scoring: identity (IMS, FDFR) against the clean set_B, quality (Q), latent mismatch
    from raypdm.pipelines.evaluate import EvaluateConfig, run_evaluate

    scores_out = join(cfg.out, "scores")
    eval_cfg = EvaluateConfig(images=samples_out, reference=data, output=scores_out, preset="tiny",
                              metrics=["ims", "q", "mismatch"], lpips_backbone="random",
                              mismatch_groups={"protected": protected, "purified": codesr_out},
                              settings={"method": "codesr + cdl", "protection": "advdm"})
    with stage_progress("[7/10] evaluate: IMS, Q, latent mismatch", cfg.progress) as progress:
        result.summaries.append(run_evaluate(eval_cfg, progress=progress))
    result.outputs["scores"] = scores_out
    _print_scores(scores_out)

    # 8. Noise-token search: 2 tokens × 2 guidance weights, one fine-tune per token and identity
    if cfg.sweep:
        from raypdm.search.sweep import SweepConfig, run_sweep

        sweep_out = join(cfg.out, "sweep")
        sweep_cfg = SweepConfig(
            output=sweep_out, data=codesr_out, reference=data, identities=chosen[:1], preset="tiny",
            space={"tokens": ["t@j", "bhi"], "w": [3.0, 7.5]},
            train={"steps": 2, "resolution": 64, "gradient_checkpointing": False}, report_every=1, probe_images=1,
            sampling={"num_images": 1, "steps": 2, "size": 64, "batch_size": 1},
            class_prior={"count": 2, "steps": 2, "resolution": 64}, max_concurrent=2,
        )
        console.print("[8/10] sweep: noise tokens t@j, bhi × w 3.0, 7.5 on Ray Tune")
        t_sweep = time.perf_counter()
        swept = run_sweep(sweep_cfg, log=lambda msg: console.print(f"      {msg}"))
        _print_sweep(swept)
        result.summaries.append(_TrainSummary("sweep (2 tokens x 2 w)", sweep_out, len(swept["trials"]),
                                              time.perf_counter() - t_sweep))
        result.outputs["sweep"] = sweep_out

    # 9-10. The red-team matrix (smoke size), its tables and the HTML report
    if cfg.redteam:
        from raypdm.pipelines.redteam import RedteamConfig, run_redteam, smoke_overrides

        rt_out = join(cfg.out, "redteam")
        rt_cfg = RedteamConfig.model_validate({"data": data, "output": rt_out, "identities": chosen[:1],
                                               **smoke_overrides()})
        console.print("[9/10] red-team matrix: advdm × {none, codesr} × {cdl, vanilla}")
        t_rt = time.perf_counter()
        rt = run_redteam(rt_cfg, log=lambda msg: console.print(f"      {msg}"))
        result.summaries.append(_TrainSummary("red-team matrix (4 cells)", rt_out, len(rt["results"]),
                                              time.perf_counter() - t_rt))
        _print_table_md(rt["tables"].get("table1"))
        console.print(f"[10/10] report: {rt['report']}")
        result.outputs["redteam"] = rt_out
        result.outputs["report"] = rt["report"]

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


def _print_protection(uri: str) -> None:
    from raypdm.data.manifest import Manifest

    df = Manifest(uri).read().to_pandas()
    if "linf" not in df:
        return
    df = df[df["error"].isna() & df["linf"].notna()]
    rows = [(ident, len(g), f"{g['linf'].max() * 255:.0f}/255", f"{g['l2'].mean():.3f}",
             f"{g['loss_before'].mean():.4f}", f"{g['loss_after'].mean():.4f}") for ident, g in df.groupby("identity")]
    print_table("protection: advdm on set_A (saved PNGs)", ["identity", "images", "max ℓ∞", "mean ℓ2",
                                                             "loss before", "loss after"], rows)


def _print_scores(uri: str) -> None:
    import io

    import pandas as pd

    from raypdm.data.uri import read_bytes

    df = pd.read_parquet(io.BytesIO(read_bytes(join(uri, "summary.parquet"))))
    cols = [c for c in ("identity", "images", "ims", "ims_ip", "ims_vgg", "fdfr", "q", "liqe", "clip_iqac", "p_noise")
            if c in df.columns]
    print_table("scores of the generated images (random scorers: plumbing only)", cols,
                [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in df[cols].itertuples(index=False)])


def _print_sweep(swept: dict) -> None:
    res = swept["results"]
    final = res[res["final"] == True] if len(res) else res  # noqa: E712
    if len(final):
        g = final.groupby(["token", "w"])[["ims", "q", "score"]].mean().reset_index()
        print_table("sweep: mean over identities", ["token", "w", "IMS", "Q", "score"],
                    [(r.token, r.w, f"{r.ims:.3f}", f"{r.q:.3f}", f"{r.score:.3f}") for r in g.itertuples()])
    console.print(f"      best: {swept['best']}")


def _print_table_md(uris: dict | None) -> None:
    if not uris or "md" not in uris:
        return
    from raypdm.data.uri import read_bytes

    console.print("Table 1 (smoke matrix):")
    console.print(read_bytes(uris["md"]).decode(), highlight=False, soft_wrap=True)
