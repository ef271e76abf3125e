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


def main() -> None:
    cli(prog_name="raypdm")


if __name__ == "__main__":
    main()
