"""What each job in the table runs, and what it prints: one `run_<job>(cfg, ctx)` per job.

A run function takes the validated config and a `RunContext` (progress on or off, a log function) and
returns a `JobResult`: the pipeline's own return value, plus whether the job failed (exit status 1).
Pipelines stay free of terminal concerns; everything a person reads at the end of a command is printed
here, so `raypdm <job>`, `jobs/<job>.py`, `raypdm submit` and the demo show the same tables.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from raypdm.ui import console, print_table, stage_progress, stage_summary_table

__all__ = ["RunContext", "JobResult", "print_frame"]


@dataclass
class RunContext:
    progress: bool = True
    verbose: bool = False
    log: Callable[[str], None] = field(default=console.print)
    # Printing the job's own tables (the demo sometimes prints its own summary instead).
    print_tables: bool = True


@dataclass
class JobResult:
    value: Any
    failed: bool = False
    message: str = ""
    summaries: list = field(default_factory=list)


def print_frame(df, title: str, digits: int = 3) -> None:
    """A pandas frame as a terminal table (floats to `digits` places)."""

    def fmt(v):
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    print_table(title, [str(c) for c in df.columns], [[fmt(v) for v in row] for row in df.itertuples(index=False)])


def _read_parquet(root: str, name: str):
    import pandas as pd

    from raypdm.data.uri import join, read_bytes

    return pd.read_parquet(io.BytesIO(read_bytes(join(root, name))))


def _errors_note(errors: int, manifest_root: str, what: str = "inputs") -> str:
    return f"{errors} {what} became error rows; see {manifest_root}/manifest.parquet" if errors else ""


# ------------------------------------------------------------------------------------------- stages
def run_purify(cfg, ctx: RunContext) -> JobResult:
    from raypdm.pipelines.purify import run_purify as purify

    with stage_progress(f"purify: {cfg.purifier}", ctx.progress) as progress:
        summary = purify(cfg, progress=progress)
    if ctx.print_tables:
        stage_summary_table([summary], title="purify")
    return JobResult(summary, message=_errors_note(summary.errors, cfg.output), summaries=[summary])


def list_protections() -> None:
    """`raypdm protect --list`: the protections, how they run and their default budgets."""
    from raypdm.pipelines.protect import _is_per_identity as is_per_identity
    from raypdm.protect import list_protections as names
    from raypdm.protect import protection_options_model

    rows = []
    for name in names():
        d = protection_options_model(name)()
        rows.append((name, "per identity" if is_per_identity(name) else "per image",
                     f"{d.radius * 255:.0f}/255", f"{d.step * 255:.2f}/255", d.steps,
                     f"{min(d.radius, d.steps * d.step) * 255:.1f}/255"))
    print_table("protections", ["method", "runs", "radius r", "step α", "steps K", "reachable min(r, K·α)"], rows)


def run_protect(cfg, ctx: RunContext) -> JobResult:
    from raypdm.pipelines.protect import run_protect as protect

    with stage_progress(f"protect: {cfg.method}", ctx.progress) as progress:
        summaries = protect(cfg, progress=progress)
    if ctx.print_tables:
        stage_summary_table(summaries, title="protect")
        _print_protection_budget(cfg)
    errors = sum(s.errors for s in summaries)
    return JobResult(summaries, message=_errors_note(errors, cfg.output), summaries=list(summaries))


def _print_protection_budget(cfg) -> None:
    """The measured ℓ∞ of the saved PNGs per method and identity beside the radius: what the protection
    really achieved. An identity whose largest change stays under 0.9·r gets a warning line."""
    from raypdm.data.manifest import Manifest
    from raypdm.pipelines.protect import protection_options

    method = cfg.method.strip().lower().replace("-", "_")
    radius = float(protection_options(method, cfg.options)["radius"])
    df = Manifest(cfg.output).read().to_pandas()
    if "linf" not in df or not len(df):
        return
    df = df[df["error"].isna() & df["linf"].notna() & (df["stage"] == method)]
    if not len(df):
        return
    cols = [c for c in ("loss_before", "loss_after") if c in df]
    rows, short = [], []
    for ident, g in df.groupby("identity"):
        reached = g["linf"].max() / radius
        if reached < 0.9:
            short.append(ident)
        rows.append((method, ident, len(g), f"{radius * 255:.3g}/255", f"{g['linf'].max() * 255:.1f}/255",
                     f"{reached:.0%}", f"{g['linf'].mean() * 255:.1f}/255",
                     f"{g['l2'].mean():.3f}" if "l2" in g else "-", *[f"{g[c].mean():.4f}" for c in cols]))
    print_table("protection (measured on the saved PNGs)",
                ["method", "identity", "images", "radius", "max ℓ∞", "of radius", "mean ℓ∞", "mean ℓ2",
                 *[c.replace("_", " ") for c in cols]], rows)
    if short:
        console.print(f"[yellow]warning:[/] {method} stayed under 0.9 × the radius for {', '.join(short)}: "
                      "its steps × step may not reach it (see the warning above), or the objective's gradient "
                      "vanished there")


def _outcome_rows(outcomes) -> list[tuple]:
    return [(o["identity"], o["status"], o["steps"], o["final_loss"], f"{o['seconds']:.1f}",
             o["export"] or (o["error"] or "")[:120]) for o in outcomes]


def run_train(cfg, ctx: RunContext) -> JobResult:
    from raypdm.pipelines.train import run_train as train

    outcomes = train(cfg, log=ctx.log)
    if ctx.print_tables:
        print_table("train", ["identity", "status", "steps", "final loss", "seconds", "export / error"],
                    _outcome_rows(outcomes))
    failed = [o["identity"] for o in outcomes if o["status"] == "failed"]
    return JobResult(outcomes, failed=bool(failed),
                     message=f"training failed for {', '.join(failed)}" if failed else "")


def run_sample(cfg, ctx: RunContext) -> JobResult:
    from raypdm.pipelines.sample import run_sample as sample

    with stage_progress("sample", ctx.progress) as progress:
        summary = sample(cfg, progress=progress)
    if ctx.print_tables:
        stage_summary_table([summary], title="sample")
    return JobResult(summary, message=_errors_note(summary.errors, cfg.output, "images"), summaries=[summary])


def run_evaluate(cfg, ctx: RunContext) -> JobResult:
    from raypdm.pipelines.evaluate import run_evaluate as evaluate

    with stage_progress("evaluate", ctx.progress) as progress:
        summary = evaluate(cfg, progress=progress)
    if ctx.print_tables:
        stage_summary_table([summary], title="evaluate")
        print_frame(_read_parquet(cfg.output, "summary.parquet"), f"scores: {cfg.images}")
    return JobResult(summary, message=_errors_note(summary.errors, cfg.output, "images"), summaries=[summary])


def run_sweep(cfg, ctx: RunContext) -> JobResult:
    from raypdm.search.sweep import run_sweep as sweep

    out = sweep(cfg, log=ctx.log)
    if ctx.print_tables:
        print_sweep(cfg, out)
    return JobResult(out)


def print_sweep(cfg, out: dict) -> None:
    """The sweep's terminal tables: mean score per (token, template, w), the trials, the best setting."""
    results = out["results"]
    final = results[results["final"] == True] if len(results) else results  # noqa: E712
    if len(final):
        table = (final.groupby(["token", "template", "w"], dropna=False)[["ims", "q", "fdfr", "score"]]
                 .mean().reset_index().sort_values("score", ascending=False))
        print_frame(table, f"sweep: mean over identities ({cfg.metric} is the score)")
    trials = out["trials"]
    print_frame(trials.drop(columns=[c for c in ("error",) if c in trials]), "trials")
    if out["best"]:
        console.print(f"best: {out['best']}")
    console.print(f"results: {cfg.output}/results.parquet, plot: {cfg.output}/sweep_scores.png")


def run_bench(cfg, ctx: RunContext) -> JobResult:
    from raypdm.bench.purifiers import markdown_table, run_purifier_bench

    df = run_purifier_bench(cfg)
    if ctx.print_tables:
        console.print(markdown_table(df), highlight=False, soft_wrap=True)
        console.print(f"results: {cfg.output}/purifier_throughput.parquet, plot: {cfg.output}/purifier_throughput.png")
    return JobResult(df)


def run_redteam(cfg, ctx: RunContext) -> JobResult:
    from raypdm.pipelines.redteam import run_redteam as redteam

    result = redteam(cfg, log=ctx.log)
    if ctx.print_tables:
        console.print(f"report: {result['report']}")
    return JobResult(result, summaries=list(result.get("summaries", [])))


def run_demo(cfg, ctx: RunContext) -> JobResult:
    from raypdm.demo import run_demo as demo

    result = demo(cfg, ctx)
    return JobResult(result, summaries=list(result.summaries))
