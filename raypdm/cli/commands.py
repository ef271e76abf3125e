"""Click commands built from the job table, and the few commands that are not jobs (data, report).

A job command is assembled from its `JobSpec`: the flags generated from its typed config, its hand-named
flags, and the options every job shares — `--config`, `--set`, `--smoke`, `--print-config`, `--output`
(`--out` accepted), `--no-progress`, `-v`. Job commands are built only when invoked (`JobGroup`), so
`raypdm --help` imports no pipeline.
"""

from __future__ import annotations

import functools
import logging
import os
import sys

import click

from raypdm.cli.flags import config_flags, flag_values
from raypdm.cli.jobs import JOBS, JobSpec, _import, get_job
from raypdm.cli.runner import JobAbort, job_data, run_job
from raypdm.cli.runs import RunContext
from raypdm.config import ConfigError
from raypdm.data.layout import LayoutError

__all__ = ["JobGroup", "build_job_command", "friendly_errors", "make_synthetic_cmd", "check_cmd", "report_cmd"]

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def friendly_errors(fn):
    """Config, layout and weights problems are the user's to fix: one message, exit status 2, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ConfigError, LayoutError, FileNotFoundError) as exc:
            raise JobAbort(str(exc)) from None

    return wrapper


def _common_options(fn):
    decorators = [
        click.option("-v", "--verbose", "job_verbose", is_flag=True,
                     help="show Ray's own logs, progress bars and library warnings"),
        click.option("--no-progress", "-q", "--quiet", "no_progress", is_flag=True,
                     help="no progress (bars, training and trial lines); results and tables still print"),
        click.option("--print-config", is_flag=True, help="print the resolved config (YAML) and exit"),
        click.option("--no-verify", is_flag=True,
                     help="load weight files without checking their pinned sha256 (you vouch for them; logged)"),
        click.option("--storage-options", "storage_options", default=None, metavar="FILE",
                     help="YAML of object-store options per protocol (s3: {endpoint_url, key, secret, ...}); "
                          "default: the back-ends' own environment and roles"),
        click.option("--smoke", is_flag=True,
                     help="tiny models, few images and steps (a synthetic dataset when no input is given)"),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="override any config field, e.g. --set options.jpeg.quality=90"),
        click.option("--config", "config_path", default=None, metavar="FILE",
                     help="YAML config (fsspec URI); --smoke, flags and --set override it"),
    ]
    for d in decorators:
        fn = d(fn)
    return fn


def build_job_command(spec: JobSpec) -> click.Command:
    """The click command of one job, its flags generated from the job's config class."""
    config_cls = spec.config_class()

    @click.pass_context
    def command(ctx: click.Context, **params) -> None:
        for flag, action in spec.actions:
            if params.get(flag.dest):
                _import(action)()
                return
        verbose = bool(params.pop("job_verbose", False) or (ctx.find_root().obj or {}).get("verbose"))
        if params.pop("no_verify", False) and not params["print_config"]:
            from raypdm.models.verify import NO_VERIFY_ENV

            # Read where models load: this process, and the workers (`init_ray` carries it to the cluster).
            os.environ[NO_VERIFY_ENV] = "1"
            click.echo(f"--no-verify: weight files are loaded without checking their sha256 ({NO_VERIFY_ENV}=1)",
                       err=True)
        if params.get("storage_options"):
            from raypdm.data.stores import StoreError, apply_storage_options, load_storage_options

            try:
                # Before the config is read: a --config on S3 is opened with these options too.
                apply_storage_options(load_storage_options(params["storage_options"]))
            except StoreError as exc:
                raise JobAbort(str(exc)) from None
        params.pop("storage_options", None)
        if "field_output" in params and params.get("flag_out") is not None and params["field_output"] is None:
            params["field_output"] = params["flag_out"]
        flags = flag_values(config_cls, spec.flags, params)
        sources: dict[str, str] = {}
        try:
            data = job_data(spec, config_path=params["config_path"], smoke=params["smoke"], flags=flags,
                            overrides=params["overrides"], sources=sources)
        except ConfigError as exc:
            raise JobAbort(str(exc)) from None
        run_ctx = RunContext(progress=not params["no_progress"] and not params["print_config"], verbose=verbose)
        try:
            result = run_job(spec.name, data, smoke=params["smoke"], ctx=run_ctx,
                             source=params["config_path"] or "command line", print_config=params["print_config"],
                             sources=sources)
        except (LayoutError, ConfigError) as exc:
            raise JobAbort(str(exc)) from None
        if result is None:
            return
        if result.message:
            click.echo(result.message)
        if result.failed:
            ctx.exit(1)

    decorated = command
    extra = [f.option() for f, _ in spec.actions]
    if "output" in config_cls.model_fields:
        from raypdm.cli.flags import Flag

        extra.append(Flag("--out", (), help="same as --output").option())
    for option in reversed([*config_flags(config_cls, spec.flags, spec.skip), *extra]):
        decorated = option(decorated)
    decorated = _common_options(decorated)
    help_text = spec.summary + (f"\n\nAlso runs as: {', '.join(spec.aliases)}." if spec.aliases else "")
    return click.command(spec.cli_name, help=help_text, short_help=spec.summary, context_settings=CONTEXT)(decorated)


class JobGroup(click.Group):
    """A group whose job commands are built on first use (their configs import heavy libraries)."""

    def __init__(self, *args, jobs: tuple[JobSpec, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.jobs = {spec.cli_name: spec for spec in jobs}
        self.aliases = {alias: spec.cli_name for spec in jobs for alias in spec.aliases}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.jobs})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        name = self.aliases.get(name, name)
        if name in self.jobs:
            return build_job_command(self.jobs[name])
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Short help from the table, without building (importing) every job command.
        rows = []
        for name in self.list_commands(ctx):
            if name in self.jobs:
                rows.append((name, self.jobs[name].summary))
            else:
                cmd = super().get_command(ctx, name)
                if cmd is not None and not cmd.hidden:
                    rows.append((name, cmd.get_short_help_str(limit=formatter.width - 6 - len(name))))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def top_level_jobs() -> tuple[JobSpec, ...]:
    return tuple(spec for spec in JOBS if spec.group is None)


def group_jobs(group: str) -> tuple[JobSpec, ...]:
    return tuple(spec for spec in JOBS if spec.group == group)


# ------------------------------------------------------------------------------------ data commands
@click.group("data", context_settings=CONTEXT)
def data_group() -> None:
    """Datasets in the <root>/<identity>/<set_A|set_B|set_C>/<image> layout."""


@data_group.command("make-synthetic")
@click.option("--output", "--out", "output", required=True, help="dataset root to write (fsspec URI)")
@click.option("--num-identities", type=int, default=2, show_default=True, help="synthetic identities")
@click.option("--images", type=int, default=4, show_default=True, help="images per split and identity")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--size", type=int, default=512, show_default=True)
@click.option("--real-photos/--no-real-photos", default=False, show_default=True,
              help="add an identity cut from scikit-image's astronaut portrait")
@friendly_errors
def make_synthetic_cmd(output, num_identities, images, seed, size, real_photos) -> None:
    """Write a deterministic synthetic face-like dataset."""
    from raypdm.data.synthetic import make_synthetic
    from raypdm.data.uri import UriError, normalise_uri

    try:
        output = normalise_uri(output)
        written = make_synthetic(output, identities=num_identities, images=images, seed=seed, size=size,
                                 real_photos=real_photos)
    except (ValueError, UriError) as exc:
        raise click.BadParameter(str(exc)) from None
    click.echo(f"wrote {len(written)} images under {output}")


@data_group.command("check")
@click.argument("uri")
@friendly_errors
def check_cmd(uri) -> None:
    """Validate a dataset: counts per identity and split, every bad file. Exit 1 when anything is wrong."""
    from raypdm.data.check import check_dataset
    from raypdm.data.uri import normalise_uri
    from raypdm.runtime import init_ray
    from raypdm.ui import console, print_table

    uri = normalise_uri(uri)
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
        for bad_uri, reason in report.bad:
            console.print(f"  {bad_uri}: {reason}", soft_wrap=True, highlight=False)
    for p in report.problems:
        console.print(f"[yellow]layout problem:[/yellow] {p}")
    from raypdm.data.lock import live_writer

    writer = live_writer(uri)  # read-only: no lock taken, but say that what was counted may be changing
    if writer is not None:
        console.print(f"[yellow]note:[/yellow] {uri} is being written right now by {writer.describe()}",
                      soft_wrap=True, highlight=False)
    if not report.ok:
        console.print(f"[red]{len(report.bad)} bad files, {len(report.problems)} layout problems[/red]")
        sys.exit(1)
    console.print("[green]ok[/green]")


@click.command("report", context_settings=CONTEXT)
@click.argument("run_dir")
@click.option("--output", "--out", "output", default=None, help="HTML file (fsspec URI) [RUN_DIR/report.html]")
@friendly_errors
def report_cmd(run_dir, output) -> None:
    """Write RUN_DIR's self-contained HTML report (image grids, tables, plots) from its report_index.json."""
    from raypdm.data.uri import normalise_uri
    from raypdm.report.html import write_report

    click.echo(write_report(normalise_uri(run_dir), normalise_uri(output) if output else None))


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


__all__ += ["data_group", "top_level_jobs", "group_jobs", "configure_logging", "get_job"]
