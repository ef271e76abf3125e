"""`raypdm ...`: one CLI for every job. Each command builds a typed config (flags, --config YAML,
--set key=value overrides), validates it before any work starts, and runs on Ray."""

from __future__ import annotations

import functools
import logging
import sys

import click

from raypdm import __version__
from raypdm.config import ConfigError, resolve_config
from raypdm.data.layout import LayoutError

__all__ = ["main", "cli"]


def _friendly_errors(fn):
    """Config, layout and weights errors are the user's to fix: print the message, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ConfigError, LayoutError) as exc:
            raise click.ClickException(str(exc)) from None
        except FileNotFoundError as exc:
            # MissingWeightsError is a FileNotFoundError whose message names the file and the fetch command.
            raise click.ClickException(str(exc)) from None

    return wrapper


def _config_options(fn):
    fn = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                      help="override any config field, e.g. --set options.jpeg.quality=90")(fn)
    fn = click.option("--config", "config_path", default=None, metavar="FILE",
                      help="YAML config (fsspec URI); flags and --set override it")(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="raypdm")
@click.option("-v", "--verbose", is_flag=True, help="show Ray's own logs and progress bars")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """raypdm: red-team protective perturbations on personalized diffusion models, on Ray."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ctx.obj = {"verbose": verbose}


# ------------------------------------------------------------------------------------------------ demo
@cli.command()
@click.option("--out", default="raypdm-demo", show_default=True, help="output folder (fsspec URI)")
@click.option("--identities", type=int, default=None, help="synthetic identities [2]")
@click.option("--images", type=int, default=None, help="images per split and identity [4]")
@click.option("--size", type=int, default=None, help="image side in pixels [128]")
@click.option("--seed", type=int, default=None)
@click.option("--no-progress", is_flag=True, help="plain output (logs, CI)")
@_config_options
@_friendly_errors
def demo(out, identities, images, size, seed, no_progress, config_path, overrides) -> None:
    """Run the whole pipeline on tiny models and synthetic data, on an embedded local Ray."""
    from raypdm.demo import DemoConfig, run_demo

    cfg = resolve_config(
        DemoConfig,
        path=config_path,
        flags={"out": out, "identities": identities, "images": images, "size": size, "seed": seed,
               "progress": False if no_progress else None},
        overrides=overrides,
    )
    run_demo(cfg)


# ------------------------------------------------------------------------------------------------ data
@cli.group()
def data() -> None:
    """Datasets in the <root>/<identity>/<set_A|set_B|set_C>/<image> layout."""


@data.command("make-synthetic")
@click.option("--out", required=True, help="dataset root to write (fsspec URI)")
@click.option("--identities", type=int, default=2, show_default=True)
@click.option("--images", type=int, default=4, show_default=True, help="images per split and identity")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--size", type=int, default=512, show_default=True)
@click.option("--real-photos/--no-real-photos", default=False, show_default=True,
              help="add an identity cut from scikit-image's astronaut portrait")
@_friendly_errors
def make_synthetic_cmd(out, identities, images, seed, size, real_photos) -> None:
    """Write a deterministic synthetic face-like dataset."""
    from raypdm.data.synthetic import make_synthetic

    try:
        written = make_synthetic(out, identities=identities, images=images, seed=seed, size=size, real_photos=real_photos)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    click.echo(f"wrote {len(written)} images under {out}")


@data.command("check")
@click.argument("uri")
@_friendly_errors
def check_cmd(uri) -> None:
    """Validate a dataset: counts per identity and split, every bad file. Exit 1 when anything is wrong."""
    from raypdm.data.check import check_dataset
    from raypdm.runtime import init_ray
    from raypdm.ui import console, print_table

    init_ray()
    report = check_dataset(uri)
    rows = [(i, s, c) for (i, s), c in report.counts.items()]
    print_table(f"dataset {uri}", ["identity", "split", "good images"], rows)
    if report.sizes:
        sizes = ", ".join(f"{h}x{w}: {n}" for (h, w), n in report.sizes.most_common(5))
        console.print(f"image sizes: {sizes}")
    if report.bad:
        # One line per file: whole paths stay copyable (a table would wrap them).
        console.print(f"[red]bad files ({len(report.bad)}):[/red]")
        for uri, reason in report.bad:
            console.print(f"  {uri}: {reason}", soft_wrap=True, highlight=False)
    for p in report.problems:
        console.print(f"[yellow]layout problem:[/yellow] {p}")
    if not report.ok:
        console.print(f"[red]{len(report.bad)} bad files, {len(report.problems)} layout problems[/red]")
        sys.exit(1)
    console.print("[green]ok[/green]")


# ---------------------------------------------------------------------------------------------- purify
@cli.command()
@click.option("--input", "input_", default=None, help="dataset root (fsspec URI)")
@click.option("--output", default=None, help="output root (fsspec URI)")
@click.option("--purifier", default=None, help="name or chain: jpeg, gaussian, tvm, codeformer, sr, codesr, a+b")
@click.option("--preset", type=click.Choice(["tiny", "full"]), default=None)
@click.option("--weights-dir", default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--workers", type=int, default=None)
@click.option("--gpus-per-worker", type=float, default=None)
@click.option("--identities", default=None, help="comma-separated identities (default: all)")
@click.option("--reference", default=None, help="clean dataset root: faithfulness vs the clean image too")
@click.option("--chain-layout", type=click.Choice(["fused", "pools"]), default=None,
              help="model chains: one actor runs the chain, or one actor pool per model")
@click.option("--lpips", "lpips_backbone", type=click.Choice(["pretrained", "random"]), default=None,
              help="LPIPS AlexNet trunk: ImageNet weights (from TORCH_HOME) or random (tests, smoke runs)")
@click.option("--no-faithfulness", is_flag=True, help="skip LPIPS/SSIM/MS-SSIM/PSNR columns")
@click.option("--no-progress", is_flag=True)
@_config_options
@_friendly_errors
def purify(input_, output, purifier, preset, weights_dir, batch_size, workers, gpus_per_worker, identities,
           reference, chain_layout, lpips_backbone, no_faithfulness, no_progress, config_path, overrides) -> None:
    """Purify images with a purifier or chain; resumable, with a Parquet manifest."""
    from raypdm.pipelines.purify import PurifyConfig, run_purify
    from raypdm.ui import stage_progress, stage_summary_table

    cfg = resolve_config(
        PurifyConfig,
        path=config_path,
        flags={"input": input_, "output": output, "purifier": purifier, "preset": preset, "weights_dir": weights_dir,
               "batch_size": batch_size, "workers": workers, "gpus_per_worker": gpus_per_worker,
               "identities": identities.split(",") if identities else None, "reference": reference,
               "chain_layout": chain_layout, "lpips_backbone": lpips_backbone,
               "faithfulness": False if no_faithfulness else None},
        overrides=overrides,
    )
    with stage_progress(f"purify: {cfg.purifier}", not no_progress) as progress:
        summary = run_purify(cfg, progress=progress)
    stage_summary_table([summary], title="purify")
    if summary.errors:
        click.echo(f"{summary.errors} inputs became error rows; see {cfg.output}/manifest.parquet")


# ----------------------------------------------------------------------------------------------- train
@cli.command()
@click.option("--data", default=None, help="dataset root (fsspec URI); trains on each identity's set_A")
@click.option("--output", default=None, help="output root: <output>/<identity>/export")
@click.option("--identities", default=None, help="comma-separated identities, or 'all' [all]")
@click.option("--preset", type=click.Choice(["tiny", "full"]), default=None)
@click.option("--weights-dir", default=None)
@click.option("--steps", type=int, default=None, help="optimisation steps per identity [1000]")
@click.option("--noise-token", default=None, help="CDL noise token [t@j]")
@click.option("--no-cdl", is_flag=True, help="vanilla DreamBooth (no noise token)")
@click.option("--prompt-preset", type=click.Choice(["paper", "official-code"]), default=None)
@click.option("--workers-per-identity", type=int, default=None, help="Ray Train workers per identity [1]")
@click.option("--gpus-per-worker", type=float, default=None)
@click.option("--deepspeed-stage", type=click.IntRange(0, 3), default=None, help="ZeRO stage [2]")
@click.option("--ddp", is_flag=True, help="plain DDP instead of DeepSpeed")
@click.option("--max-concurrent", type=int, default=None, help="identities training at once [all that fit]")
@_config_options
@_friendly_errors
def train(data, output, identities, preset, weights_dir, steps, noise_token, no_cdl, prompt_preset,
          workers_per_identity, gpus_per_worker, deepspeed_stage, ddp, max_concurrent, config_path, overrides) -> None:
    """DreamBooth + CDL fine-tuning, one Ray Train run per identity, many in parallel."""
    from raypdm.pipelines.train import TrainJobConfig, run_train
    from raypdm.ui import print_table

    distributed = {k: v for k, v in {"workers": workers_per_identity, "gpus_per_worker": gpus_per_worker,
                                     "zero_stage": deepspeed_stage, "backend": "ddp" if ddp else None}.items()
                   if v is not None}
    cfg = resolve_config(
        TrainJobConfig,
        path=config_path,
        flags={"data": data, "output": output, "preset": preset, "weights_dir": weights_dir,
               "identities": (identities if identities in (None, "all") else identities.split(",")),
               "noise_token": noise_token, "cdl": False if no_cdl else None, "prompt_preset": prompt_preset,
               "max_concurrent": max_concurrent, "train": {"steps": steps} if steps else None,
               "distributed": distributed or None},
        overrides=overrides,
    )
    try:
        outcomes = run_train(cfg)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    print_table("train", ["identity", "status", "steps", "final loss", "seconds", "export / error"],
                [(o["identity"], o["status"], o["steps"], o["final_loss"], f"{o['seconds']:.1f}",
                  o["export"] or (o["error"] or "")[:120]) for o in outcomes])
    if any(o["status"] == "failed" for o in outcomes):
        sys.exit(1)


# ---------------------------------------------------------------------------------------------- sample
@cli.command()
@click.option("--models", default=None, help="training output root with <identity>/export pipelines")
@click.option("--output", default=None, help="output root (fsspec URI)")
@click.option("--identities", default=None, help="comma-separated identities [every export]")
@click.option("--w-neg", "w", type=float, default=None, help="decoupled negative-guidance weight w of Eq. 6 [7.5]")
@click.option("--num-images", type=int, default=None, help="images per prompt [16]")
@click.option("--steps", type=int, default=None, help="denoising steps [100]")
@click.option("--prompts", "prompts", multiple=True, help="generation prompt (repeatable) [the paper's two]")
@click.option("--size", type=int, default=None, help="image side [512]")
@click.option("--workers", type=int, default=None)
@click.option("--gpus-per-worker", type=float, default=None)
@click.option("--no-progress", is_flag=True)
@_config_options
@_friendly_errors
def sample(models, output, identities, w, num_images, steps, prompts, size, workers, gpus_per_worker, no_progress,
           config_path, overrides) -> None:
    """Decoupled negative-guidance sampling (paper Eq. 6) of every trained identity."""
    from raypdm.pipelines.sample import SampleJobConfig, run_sample
    from raypdm.ui import stage_progress, stage_summary_table

    sampling = {k: v for k, v in {"w": w, "num_images": num_images, "steps": steps,
                                  "prompts": list(prompts) or None, "height": size, "width": size}.items()
                if v is not None}
    cfg = resolve_config(
        SampleJobConfig,
        path=config_path,
        flags={"models": models, "output": output, "identities": identities.split(",") if identities else None,
               "workers": workers, "gpus_per_worker": gpus_per_worker, "sampling": sampling or None},
        overrides=overrides,
    )
    with stage_progress("sample", not no_progress) as progress:
        summary = run_sample(cfg, progress=progress)
    stage_summary_table([summary], title="sample")


# --------------------------------------------------------------------------------------------- protect
@cli.command()
@click.option("--input", "input_", default=None, help="clean dataset root (fsspec URI)")
@click.option("--output", default=None, help="output root: protected dataset + manifest.parquet")
@click.option("--method", default=None, help="advdm, photoguard-encoder, photoguard-diffusion, glaze, "
                                              "adaptive-codesr, fsmg, aspl, easpl, metacloak")
@click.option("--radius", default=None, help="ℓ∞ radius, e.g. 11/255 [method default]")
@click.option("--step", default=None, help="PGD step size, e.g. 1/255")
@click.option("--steps", type=int, default=None, help="PGD steps")
@click.option("--preset", type=click.Choice(["tiny", "full"]), default=None)
@click.option("--weights-dir", default=None)
@click.option("--workers", type=int, default=None, help="actors for per-image methods")
@click.option("--gpus-per-worker", type=float, default=None)
@click.option("--identities", default=None, help="comma-separated identities [all]")
@click.option("--lpips", "lpips_backbone", type=click.Choice(["pretrained", "random"]), default=None)
@click.option("--list", "list_methods", is_flag=True, help="list the protections and exit")
@click.option("--no-progress", is_flag=True)
@_config_options
@_friendly_errors
def protect(input_, output, method, radius, step, steps, preset, weights_dir, workers, gpus_per_worker, identities,
            lpips_backbone, list_methods, no_progress, config_path, overrides) -> None:
    """Craft a protection on every identity's set_A (other splits copied); resumable, with a manifest."""
    from raypdm.pipelines.protect import ProtectJobConfig, run_protect
    from raypdm.ui import print_table, stage_progress, stage_summary_table

    if list_methods:
        from raypdm.protect import build_protection, list_protections, protection_options_model
        from raypdm.pipelines.protect import _is_per_identity

        rows = []
        for name in list_protections():
            d = protection_options_model(name)()
            rows.append((name, "per identity" if _is_per_identity(name) else "per image",
                         f"{d.radius * 255:.0f}/255", f"{d.step * 255:.2f}/255", d.steps))
        print_table("protections", ["method", "runs", "radius", "step", "steps"], rows)
        return
    pgd = {k: v for k, v in {"radius": radius, "step": step, "steps": steps}.items() if v is not None}
    flags = {"input": input_, "output": output, "method": method, "preset": preset, "weights_dir": weights_dir,
             "workers": workers, "gpus_per_worker": gpus_per_worker, "lpips_backbone": lpips_backbone,
             "identities": identities.split(",") if identities else None}
    if pgd:
        flags["options"] = pgd  # merged into the YAML's options (flags win)
    cfg = resolve_config(ProtectJobConfig, path=config_path, flags=flags, overrides=overrides)
    with stage_progress(f"protect: {cfg.method}", not no_progress) as progress:
        summaries = run_protect(cfg, progress=progress)
    stage_summary_table(summaries, title="protect")
    errors = sum(s.errors for s in summaries)
    if errors:
        click.echo(f"{errors} inputs became error rows; see {cfg.output}/manifest.parquet")


# -------------------------------------------------------------------------------------------- evaluate
def _labels(pairs: tuple[str, ...], what: str) -> dict[str, str] | None:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected NAME=VALUE, got {pair!r}", param_hint=what)
        out[key.strip()] = value.strip()
    return out or None


@cli.command()
@click.option("--images", default=None, help="images to score: <identity>/<folder>/<image> (fsspec URI)")
@click.option("--reference", default=None, help="clean dataset root (IMS uses each identity's set_B)")
@click.option("--output", default=None, help="output root: manifest.parquet, summary.parquet/.md, mismatch.png")
@click.option("--metrics", default=None, help="comma-separated: ims,q,lpips,ssim,ms_ssim,psnr,mismatch [all]")
@click.option("--preset", type=click.Choice(["tiny", "full"]), default=None)
@click.option("--weights-dir", default=None)
@click.option("--identities", default=None, help="comma-separated identities [all]")
@click.option("--setting", "settings", multiple=True, metavar="NAME=VALUE",
              help="label every row, e.g. --setting method=codesr --setting protection=advdm")
@click.option("--group", "groups", multiple=True, metavar="NAME=URI",
              help="extra image set for the mismatch probe, e.g. --group protected=runs/protected")
@click.option("--lpips", "lpips_backbone", type=click.Choice(["pretrained", "random"]), default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--workers", type=int, default=None)
@click.option("--gpus-per-worker", type=float, default=None)
@click.option("--no-progress", is_flag=True)
@_config_options
@_friendly_errors
def evaluate(images, reference, output, metrics, preset, weights_dir, identities, settings, groups, lpips_backbone,
             batch_size, workers, gpus_per_worker, no_progress, config_path, overrides) -> None:
    """Score images: identity (IMS, FDFR), quality (Q), faithfulness, latent mismatch; Parquet + tables."""
    import pandas as pd

    from raypdm.pipelines.evaluate import EvaluateConfig, run_evaluate
    from raypdm.ui import print_table, stage_progress, stage_summary_table

    cfg = resolve_config(
        EvaluateConfig,
        path=config_path,
        flags={"images": images, "reference": reference, "output": output,
               "metrics": metrics.split(",") if metrics else None, "preset": preset, "weights_dir": weights_dir,
               "identities": identities.split(",") if identities else None,
               "settings": _labels(settings, "--setting"), "mismatch_groups": _labels(groups, "--group"),
               "lpips_backbone": lpips_backbone, "batch_size": batch_size, "workers": workers,
               "gpus_per_worker": gpus_per_worker},
        overrides=overrides,
    )
    with stage_progress("evaluate", not no_progress) as progress:
        summary = run_evaluate(cfg, progress=progress)
    stage_summary_table([summary], title="evaluate")
    _print_frame(pd.read_parquet(_local_or_fs(cfg.output, "summary.parquet")), f"scores: {cfg.images}")
    if summary.errors:
        click.echo(f"{summary.errors} images became error rows; see {cfg.output}/manifest.parquet")


def _local_or_fs(root: str, name: str):
    """A file-like for pandas from any fsspec URI."""
    import io

    from raypdm.data.uri import join, read_bytes

    return io.BytesIO(read_bytes(join(root, name)))


def _print_frame(df, title: str, digits: int = 3) -> None:
    from raypdm.ui import print_table

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.{digits}f}"
        return str(v)

    print_table(title, [str(c) for c in df.columns], [[fmt(v) for v in row] for row in df.itertuples(index=False)])


# ----------------------------------------------------------------------------------------------- sweep
@cli.command()
@click.option("--output", default=None, help="output root: results.parquet, best.json, sweep_scores.png")
@click.option("--search", type=click.Choice(["grid", "random", "optuna"]), default=None)
@click.option("--scheduler", type=click.Choice(["none", "asha"]), default=None)
@click.option("--max-concurrent", type=int, default=None, help="trials at once [all that fit]")
@_config_options
@_friendly_errors
def sweep(output, search, scheduler, max_concurrent, config_path, overrides) -> None:
    """Noise-token × template × w search on Ray Tune (one fine-tune per token, every w from it)."""
    import pandas as pd

    from raypdm.search.sweep import SweepConfig, run_sweep
    from raypdm.ui import console

    if not config_path:
        raise click.UsageError("sweep needs --config FILE (see jobs/configs/sweep_smoke.yaml)")
    flags = {"output": output, "search": search, "scheduler": scheduler, "max_concurrent": max_concurrent}
    flags.update(_synthetic_sweep_data(config_path, output, overrides))
    cfg = resolve_config(SweepConfig, path=config_path, flags=flags, overrides=overrides)
    print_sweep(cfg, run_sweep(cfg, log=console.print))


def print_sweep(cfg, out: dict) -> None:
    """The sweep's terminal tables: mean score per (token, template, w), the trials, the best setting."""
    from raypdm.ui import console

    results = out["results"]
    final = results[results["final"] == True] if len(results) else results  # noqa: E712
    if len(final):
        table = (final.groupby(["token", "template", "w"], dropna=False)[["ims", "q", "fdfr", "score"]]
                 .mean().reset_index().sort_values("score", ascending=False))
        _print_frame(table, f"sweep: mean over identities ({cfg.metric} is the score)")
    _print_frame(out["trials"].drop(columns=["error"]), "trials")
    if out["best"]:
        console.print(f"best: {out['best']}")
    console.print(f"results: {cfg.output}/results.parquet, plot: {cfg.output}/sweep_scores.png")


def _synthetic_sweep_data(config_path: str, output: str | None, overrides) -> dict:
    """A tiny-preset sweep config without `data`/`reference` (jobs/configs/sweep_smoke.yaml) runs on a
    small synthetic dataset made under the output, so the smoke sweep needs nothing but the config."""
    from raypdm.config import _deep_merge, _read_yaml, parse_overrides
    from raypdm.data.synthetic import make_synthetic
    from raypdm.data.uri import join
    from raypdm.ui import console

    data = _deep_merge(_read_yaml(config_path), parse_overrides(overrides) if overrides else {})
    data.pop("smoke", None)
    out = output or data.get("output")
    if data.get("data") or (data.get("space") or {}).get("data") or data.get("preset", "tiny") != "tiny" or not out:
        return {}
    synthetic = join(out, "_smoke_data")
    make_synthetic(synthetic, identities=2, images=2, seed=0, size=64, real_photos=True)
    console.print(f"no data in the config: a synthetic dataset at {synthetic}")
    return {"data": synthetic, "reference": data.get("reference") or synthetic}


# --------------------------------------------------------------------------------------------- redteam
@cli.command()
@click.option("--data", default=None, help="clean dataset root (fsspec URI)")
@click.option("--output", default=None, help="run directory (fsspec URI)")
@click.option("--smoke", is_flag=True, help="tiny models, a synthetic identity, minutes on a CPU")
@_config_options
@_friendly_errors
def redteam(data, output, smoke, config_path, overrides) -> None:
    """The red-team matrix: protect → purify → train → sample → evaluate, Tables 1/2/4 and report.html."""
    import argparse

    from raypdm.entrypoints import load_job_config, run_job

    args = argparse.Namespace(config=config_path, output=output, smoke=smoke, overrides=list(overrides))
    job = load_job_config("redteam", args)
    if data:
        job["data"] = data
    run_job("redteam", job, smoke)


# ---------------------------------------------------------------------------------------------- report
@cli.command()
@click.argument("run_dir")
@click.option("--out", default=None, help="HTML file (fsspec URI) [RUN_DIR/report.html]")
@_friendly_errors
def report(run_dir, out) -> None:
    """Write RUN_DIR's self-contained HTML report (image grids, tables, plots) from its report_index.json."""
    from raypdm.report.html import write_report

    click.echo(write_report(run_dir, out))


# ----------------------------------------------------------------------------------------------- bench
@cli.group()
def bench() -> None:
    """Throughput benchmarks (results as Parquet + PNG, and a Markdown table for RESULTS.md)."""


@bench.command("purifiers")
@click.option("--out", default=None, help="results folder (fsspec URI) [benchmarks/results]")
@click.option("--purifiers", default=None, help="comma-separated purifiers/chains [jpeg,gaussian,tvm,codeformer,sr,codesr]")
@click.option("--images", type=int, default=None, help="images for the batched and Ray modes [64]")
@click.option("--preset", type=click.Choice(["tiny", "full"]), default=None)
@_config_options
@_friendly_errors
def bench_purifiers(out, purifiers, images, preset, config_path, overrides) -> None:
    """Per-image processes vs one batched process vs the Ray Data pipeline (1 and 2 workers)."""
    from raypdm.bench.purifiers import PurifierBenchConfig, markdown_table, run_purifier_bench

    cfg = resolve_config(
        PurifierBenchConfig,
        path=config_path,
        flags={"out": out or ("benchmarks/results" if not config_path else None), "images": images, "preset": preset,
               "purifiers": purifiers.split(",") if purifiers else None},
        overrides=overrides,
    )
    df = run_purifier_bench(cfg)
    click.echo(markdown_table(df))
    click.echo(f"results: {cfg.out}/purifier_throughput.parquet, plot: {cfg.out}/purifier_throughput.png")


def _add_optional_groups() -> None:
    try:
        from raypdm.models.cli import models_cli
    except ModuleNotFoundError as exc:  # only while the registry module is absent
        if exc.name != "raypdm.models.cli":
            raise
    else:
        cli.add_command(models_cli, "models")


_add_optional_groups()

from raypdm.submit import submit_command  # noqa: E402  (submit.py is self-contained: no import cycle)

cli.add_command(submit_command, "submit")


def main() -> None:
    cli(prog_name="raypdm")


if __name__ == "__main__":
    main()
