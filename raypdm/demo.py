"""`raypdm demo`: the whole pipeline on tiny models and synthetic data, on an embedded local Ray.

The paper's story, end to end, built as the smoke red-team matrix (advdm × {none, codesr} × {CDL,
vanilla}) whose stages the demo runs one by one, showing each, before the matrix itself:

    1 synthetic dataset + check            6 decoupled negative-guidance sampling (w = 7.5) of codesr + cdl
    2 protect set_A with AdvDM (11/255)    7 scoring (IMS, FDFR, Q, faithfulness) + CLIP latent mismatch
    3 JPEG q75, then again (resumes)       8 a 2-token × 2-w noise-token sweep on Ray Tune
    4 CodeSR (CodeFormer → x4 SR)          9 the matrix: Tables 1/2/4 (the stages above are resumed, not rerun)
    5 DreamBooth+CDL and vanilla fine-tunes of every cell, one Ray Train run per identity, in parallel
   10 the HTML report

Stages 2, 4–7 take their configs from the matrix's `RedteamPlan` and write where the matrix reads, so
stage 9 finds them finished (same inputs, same config: the content-hashed resume skips them) and only
samples and scores the three other cells. A re-run of a finished demo resumes every stage.

Every model has random weights (nothing can be downloaded): the numbers show the plumbing, not quality.
LPIPS uses a random AlexNet trunk here for the same reason.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, field_validator

from raypdm.config import JobConfig, Uri, save_resolved_config
from raypdm.data.uri import join
from raypdm.ui import console, print_table, stage_progress, stage_summary_table
from raypdm.data.manifest import in_run_scope

__all__ = ["DemoConfig", "DemoResult", "run_demo", "demo_redteam_config"]

STAGES = 10


class DemoConfig(JobConfig):
    output: Uri = Field("raypdm-demo", description="output root (fsspec URI)")
    num_identities: int = Field(2, ge=1, le=100, description="synthetic identities")
    images: int = Field(4, ge=1, le=100, description="images per split and identity")
    size: int = Field(128, ge=32, le=1024, description="synthetic image side in pixels")
    seed: int = 0
    real_photos: bool = Field(True, description="add an identity cut from scikit-image's astronaut photo")
    sr_steps: int = Field(4, ge=1, le=1000, description="x4 upscaler denoising steps in the demo's CodeSR")
    workers: int = Field(2, ge=1, le=64, description="actors per model stage")
    protect_steps: int = Field(2, ge=1, le=1000, description="AdvDM PGD steps in the demo's protection")
    train_steps: int = Field(4, ge=1, le=10_000, description="DreamBooth(+CDL) steps per identity and cell")
    train_identities: int = Field(2, ge=1, le=100, description="identities in the matrix (fine-tuned in parallel)")
    train_backend: Literal["deepspeed", "ddp"] = "deepspeed"
    methods: list[str] = Field(
        default_factory=lambda: ["none + vanilla", "codesr + cdl"],
        description="the matrix's methods: the paper's baseline and its method; add 'none + cdl' and "
                    "'codesr + vanilla' for the full 2 × 2 ablation (twice the fine-tunes)")
    train_concurrency: int | None = Field(
        None, ge=1, description="fine-tunes at once (None: one per CPU on a CPU-only cluster, else all)")
    sample_images: int = Field(2, ge=1, le=64, description="images per prompt and identity")
    sample_steps: int = Field(4, ge=1, le=1000)
    sweep: bool = Field(True, description="run the 2-token × 2-w noise-token sweep")
    redteam: bool = Field(True, description="run the smoke red-team matrix and write report.html")


    @field_validator("methods")
    @classmethod
    def _has_the_papers_method(cls, v: list[str]) -> list[str]:
        from raypdm.pipelines.redteam import split_method

        v = list(dict.fromkeys("{} + {}".format(*split_method(m)) for m in v))
        bad = [m for m in v if split_method(m)[0] not in ("none", "codesr")]
        if bad:
            raise ValueError(f"the demo's purifiers are none and codesr; got {bad}")
        if "codesr + cdl" not in v:
            raise ValueError("the demo's story stages (6, 7) sample and score 'codesr + cdl': keep it")
        return v


@dataclass
class DemoResult:
    out: str
    summaries: list = field(default_factory=list)
    seconds: float = 0.0
    data_uri: str = ""
    outputs: dict[str, str] = field(default_factory=dict)


def demo_redteam_config(cfg: DemoConfig, data: str, identities: list[str]):
    """The demo's matrix: the red-team smoke settings at the demo's sizes (one place, so every stage the
    demo runs before the matrix is the matrix's own)."""
    from raypdm.pipelines.redteam import RedteamConfig, smoke_overrides

    smoke = smoke_overrides()
    overrides: dict[str, Any] = {
        # Few steps, each large enough that together they reach the paper's 11/255 (K·α ≥ r): a demo whose
        # protection fell short of its radius would show a weaker protection than the one it names.
        "protections": [{"name": "advdm", "options": {"steps": cfg.protect_steps, "resample": False,
                                                       "step": f"{math.ceil(11 / cfg.protect_steps)}/255"}}],
        "purifiers": ["none", "codesr"],
        "purifier_options": {"sr": {"steps": cfg.sr_steps}},
        "train": {"steps": cfg.train_steps, "resolution": 64, "gradient_checkpointing": False},
        "distributed": {"backend": cfg.train_backend, "zero_stage": 2, "workers": 1, "gpus_per_worker": 0,
                        # one checkpoint, at the end (mid-run restarts are the integration tests' job)
                        "checkpoint_every": cfg.train_steps, "report_every": 1,
                        "quality_every": max(1, cfg.train_steps // 2)},
        "class_prior": {"count": 4, "steps": 4, "resolution": 64, "workers": 1, "batch_size": 4},
        "sampling": {"num_images": cfg.sample_images, "steps": cfg.sample_steps, "size": 64, "batch_size": 4},
        "metrics": ["ims", "q", "ssim", "psnr"],
        "methods": cfg.methods,
        "workers": cfg.workers,
    }
    return RedteamConfig.model_validate({**smoke, **overrides, "data": data, "output": join(cfg.output, "redteam"),
                                         "identities": identities})


@in_run_scope
def run_demo(cfg: DemoConfig, ctx=None) -> DemoResult:
    from raypdm.data.check import check_dataset
    from raypdm.data.synthetic import make_synthetic
    from raypdm.pipelines.evaluate import run_evaluate
    from raypdm.pipelines.protect import run_protect
    from raypdm.pipelines.purify import PurifyConfig, run_purify
    from raypdm.pipelines.redteam import RedteamPlan, run_redteam
    from raypdm.pipelines.sample import run_sample
    from raypdm.pipelines.stage import StageSummary
    from raypdm.pipelines.train import run_train_many
    from raypdm.runtime import init_ray

    t0 = time.perf_counter()
    show = ctx.progress if ctx is not None else True
    result = DemoResult(out=cfg.output)
    save_resolved_config(cfg, cfg.output, "demo_config.yaml")

    def step(k: int, text: str) -> str:
        return f"[{k}/{STAGES}] {text}"

    def say(message: str) -> None:
        console.print(f"      {message}", highlight=False)

    console.rule("[bold]raypdm demo")
    resources = init_ray()
    console.print(f"Ray: {resources.get('CPU', 0):.0f} CPUs, {resources.get('GPU', 0):.0f} GPUs")

    # 1. data
    data = join(cfg.output, "data")
    n = make_synthetic(data, identities=cfg.num_identities, images=cfg.images, seed=cfg.seed, size=cfg.size,
                       real_photos=cfg.real_photos)
    result.data_uri = data
    console.print(step(1, f"synthetic dataset: {len(n)} images -> {data}"))
    report = check_dataset(data)
    print_table("dataset check", ["identity", "split", "images"],
                [(i, s, c) for (i, s), c in report.counts.items()])
    if not report.ok:
        raise RuntimeError(f"the synthetic dataset failed its check: {report.bad or report.problems}")
    chosen = sorted(report.identities)[: cfg.train_identities]
    rt_cfg = demo_redteam_config(cfg, data, chosen)
    plan = RedteamPlan(rt_cfg)
    cells = plan.cells()
    ours = next(c for c in cells if c.method == "codesr + cdl")  # the validator keeps it in `methods`

    # 2. protection: AdvDM on set_A of the matrix's identities (set_B/set_C copied through as clean references)
    protect_cfg = plan.protect_config(rt_cfg.protections[0])
    with stage_progress(step(2, "protect: advdm (PGD, r = 11/255)"), show) as progress:
        result.summaries.extend(run_protect(protect_cfg, progress=progress))
    protected = protect_cfg.output
    result.outputs["protected"] = protected
    _print_protection(protected)

    # 3. classic purification of the protected data, then the same stage again to show the resume
    jpeg_out = join(cfg.output, "purify", "jpeg")
    jpeg_cfg = PurifyConfig(input=protected, output=jpeg_out, purifier="jpeg", options={"jpeg": {"quality": 75}},
                            lpips_backbone="random", reference=data)
    with stage_progress(step(3, "purify: jpeg q75"), show) as progress:
        result.summaries.append(run_purify(jpeg_cfg, progress=progress))
    with stage_progress(step(3, "purify: jpeg q75 (re-run: resumes)"), show) as progress:
        rerun = run_purify(jpeg_cfg, progress=progress)
    rerun.stage = "jpeg (re-run)"
    result.summaries.append(rerun)
    result.outputs["jpeg"] = jpeg_out

    # 4. CodeSR (the paper's purifier) on the protected split; faithfulness vs its input and vs the clean image
    codesr_cfg = plan.purify_config("advdm", "codesr")
    with stage_progress(step(4, "purify: codesr (codeformer+sr)"), show) as progress:
        result.summaries.append(run_purify(codesr_cfg, progress=progress))
    codesr_out = codesr_cfg.output
    result.outputs["codesr"] = codesr_out
    _print_faithfulness({"jpeg": jpeg_out, "codesr": codesr_out})

    # 5. Every cell's fine-tunes in one Ray Tune fan-out: one Ray Train run per identity and cell.
    train_cfgs = [plan.train_config(cell) for cell in cells]
    methods = " / ".join(c.method for c in cells)
    console.print(step(5, f"train: {len(cells)} cells ({methods}) × {len(chosen)} identities, {cfg.train_backend}, "
                          f"{cfg.train_steps} steps, noise token {plan.train_config(ours).prompts().token!r}"))
    t_train = time.perf_counter()
    # On a CPU-only machine fine-tunes beyond one per core only slow each other down (measured on 2 cores:
    # 8 runs took 190 s at 3-4 at once, 165 s at 2).
    concurrency = cfg.train_concurrency or (None if resources.get("GPU", 0) else max(1, int(resources.get("CPU", 1))))
    all_outcomes = run_train_many(train_cfgs, max_concurrent=concurrency, log=say, progress=show)
    rows = [(cell.path(), o["identity"], o["status"], o["steps"], o["final_loss"], f"{o['seconds']:.1f}")
            for cell, outcomes in zip(cells, all_outcomes) for o in outcomes]
    print_table("train", ["cell", "identity", "status", "steps", "final loss", "seconds"], rows)
    failed = [(cell.path(), o) for cell, outcomes in zip(cells, all_outcomes) for o in outcomes
              if o["status"] == "failed"]
    if failed:
        raise RuntimeError(f"{len(failed)} demo fine-tune(s) failed, first {failed[0][0]}: {failed[0][1]['error']}")
    result.summaries.append(_TrainSummary(f"train ({len(cells)} cells)", rt_cfg.output, len(rows), time.perf_counter() - t_train,
                                          skipped=sum(r[2] == "skipped" for r in rows)))
    result.outputs["models"] = train_cfgs[cells.index(ours)].output

    # 6. Decoupled negative-guidance sampling (Eq. 6, w = 7.5) of codesr + cdl
    sample_cfg = plan.sample_config(ours)
    with stage_progress(step(6, f"sample: {ours.method}, decoupled guidance w={rt_cfg.sampling.w}"), show) as progress:
        result.summaries.append(run_sample(sample_cfg, progress=progress))
    result.outputs["samples"] = sample_cfg.output

    # 7. Scoring: identity (IMS, FDFR) against the clean set_B, quality (Q), faithfulness; latent mismatch
    eval_cfg = plan.evaluate_config(ours)
    with stage_progress(step(7, "evaluate: IMS, FDFR, Q, SSIM, PSNR"), show) as progress:
        result.summaries.append(run_evaluate(eval_cfg, progress=progress))
    result.outputs["scores"] = eval_cfg.output
    _print_scores(eval_cfg.output)
    mismatch_cfg = plan.mismatch_config()
    with stage_progress(step(7, "evaluate: CLIP latent mismatch (clean / protected / purified)"), show) as progress:
        result.summaries.append(run_evaluate(mismatch_cfg, progress=progress))
    result.outputs["mismatch"] = join(mismatch_cfg.output, "mismatch.png")
    say(f"plot: {result.outputs['mismatch']}")

    # 8. Noise-token search: 2 tokens × 2 guidance weights, one fine-tune per token and identity
    if cfg.sweep:
        from raypdm.search.sweep import SweepConfig, run_sweep

        sweep_out = join(cfg.output, "sweep")
        sweep_cfg = SweepConfig(
            output=sweep_out, data=codesr_out, reference=data, identities=chosen[:1], preset="tiny",
            space={"tokens": ["t@j", "bhi"], "w": [3.0, 7.5]},
            train={"steps": 2, "resolution": 64, "gradient_checkpointing": False}, report_every=1, probe_images=1,
            sampling={"num_images": 1, "steps": 2, "size": 64, "batch_size": 1},
            class_prior={"count": 2, "steps": 2, "resolution": 64}, max_concurrent=2,
        )
        console.print(step(8, "sweep: noise tokens t@j, bhi × w 3.0, 7.5 on Ray Tune"))
        t_sweep = time.perf_counter()
        swept = run_sweep(sweep_cfg, log=say)
        _print_sweep(swept)
        result.summaries.append(_TrainSummary("sweep (2 tokens x 2 w)", sweep_out, len(swept["trials"]),
                                              time.perf_counter() - t_sweep))
        result.outputs["sweep"] = sweep_out

    # 9-10. The red-team matrix: the stages above resume; the other cells are sampled and scored
    if cfg.redteam:
        console.print(step(9, f"red-team matrix: advdm × {{{', '.join(c.method for c in cells)}}} "
                              "(stages 2, 4-7 resume)"))
        t_rt = time.perf_counter()
        rt = run_redteam(rt_cfg, log=say, progress=show, show_stages=False)
        # The matrix's row adds up its own stages (images, and identity trainings): what the stages above
        # had already done shows as resumed, so the table says the matrix reused them.
        inner = rt["summaries"]
        result.summaries.append(StageSummary(
            f"red-team matrix ({len(cells)} cells)", rt_cfg.output, total=sum(s.total for s in inner),
            processed=sum(s.processed for s in inner), skipped=sum(s.skipped for s in inner),
            errors=sum(s.errors for s in inner), seconds=time.perf_counter() - t_rt))  # fmt: skip
        _print_table_md(rt["tables"].get("table1"))
        console.print(step(10, f"report: {rt['report']}"))
        result.outputs["redteam"] = rt_cfg.output
        result.outputs["report"] = rt["report"]

    result.seconds = time.perf_counter() - t0
    stage_summary_table(result.summaries, title="demo stages")
    console.print(f"[green]demo finished in {result.seconds:.1f} s[/green]; outputs under {cfg.output}")
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
        return self.total - self.skipped - self.errors

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
