"""`raypdm ...`: the one front door. Every job comes from the job table (`raypdm.cli.jobs`); its flags are
generated from its typed config, and `--config`, `--set`, `--smoke`, `--print-config` work on all of them.

    raypdm purify --input data --output out/jpeg --purifier jpeg
    python jobs/purify.py --config jobs/configs/purify.yaml --output s3://bucket/runs/p   # same job
"""

from __future__ import annotations

import sys

import click

from raypdm import __version__
from raypdm.cli.commands import (
    CONTEXT,
    JobGroup,
    configure_logging,
    data_group,
    group_jobs,
    report_cmd,
    top_level_jobs,
)
from raypdm.cli.jobs import get_job
from raypdm.runtime import quiet_environment  # stdlib only at import: `raypdm --help` stays fast

__all__ = ["cli", "main", "job_main"]


@click.group(cls=JobGroup, jobs=top_level_jobs(), context_settings=CONTEXT)
@click.version_option(__version__, prog_name="raypdm")
@click.option("-v", "--verbose", is_flag=True, help="show Ray's own logs, progress bars and library warnings")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """raypdm: red-team protective perturbations on personalized diffusion models, on Ray."""
    configure_logging(verbose)
    _quiet(not verbose)
    ctx.obj = {"verbose": verbose}


@cli.group("bench", cls=JobGroup, jobs=group_jobs("bench"), context_settings=CONTEXT)
def bench_group() -> None:
    """Throughput benchmarks (results as Parquet + PNG, and a Markdown table for RESULTS.md)."""


def _quiet(quiet: bool) -> None:
    quiet_environment(quiet)


cli.add_command(data_group)
cli.add_command(report_cmd)


def _mount_models_and_submit() -> None:
    from raypdm.models.cli import models_cli
    from raypdm.submit import submit_command

    cli.add_command(models_cli, "models")
    cli.add_command(submit_command, "submit")


_mount_models_and_submit()


def _quiet_before_parsing(args: list[str]) -> None:
    # click builds a job's command (and imports its config module: diffusers, bitsandbytes, ...) before
    # the group callback sees `-v`, so the quiet settings go first; the callback then keeps or undoes them.
    _quiet("-v" not in args and "--verbose" not in args)


def main() -> None:
    _quiet_before_parsing(sys.argv[1:])
    cli(prog_name="raypdm")


def job_main(name: str, argv: list[str] | None = None) -> int:
    """What `jobs/<name>.py` runs: the same command as `raypdm <name>`, returning its exit status
    (0 done, 1 the job failed, 2 it could not start: config, inputs or weights)."""
    spec = get_job(name)
    path = [spec.group, spec.cli_name] if spec.group else [spec.cli_name]
    args = list(sys.argv[1:] if argv is None else argv)
    _quiet_before_parsing(args)
    try:
        status = cli.main(args=[*path, *args], prog_name=f"jobs/{spec.name}.py", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        click.echo("aborted", err=True)
        return 130
    return status if isinstance(status, int) else 0
