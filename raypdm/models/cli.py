"""`raypdm models list`, `check` and `fetch`. The main CLI mounts this group as `models`."""

from __future__ import annotations

import shlex
import shutil

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from raypdm import models
from raypdm.models import registry
from raypdm.models.registry import fetch_command

_STYLE = {"present": "green", "missing": "red", "corrupt": "bold red"}


def _console() -> Console:
    # Wide, so fetch commands and paths are never cut in logs and captured output.
    return Console(width=max(200, shutil.get_terminal_size().columns), soft_wrap=True)


@click.group("models", help="Model registry: what each model needs and whether its weights are in place.")
def models_cli() -> None:
    pass


def _pins(spec) -> str:
    """How many files carry a sha256, and which weight files do not (their hash is not published)."""
    pinned = sum(1 for f in spec.files if f.sha256)
    unpinned = [f.path for f in spec.files if not f.sha256 and not f.path.endswith((".json", ".txt"))]
    text = f"{pinned}/{len(spec.files)}"
    return text + (f"; not known for {', '.join(unpinned)}" if unpinned else "")


@models_cli.command("list", help="Registered models with presets, licence, source and which files are sha256-pinned.")
def list_cmd() -> None:
    table = Table(title="raypdm models")
    for col in ("name", "presets", "licence", "source", "files", "sha256 pinned"):
        table.add_column(col, overflow="fold")
    for name in models.list_models():
        spec = models.get(name)
        if spec.hub_repo:
            source = f"{spec.hub_repo}@{spec.hub_revision or 'main (revision not pinned)'}"
        else:
            source = "(direct URLs)" if spec.downloadable else "(bring your own)"
        licence = spec.licence + (f" ({spec.licence_note})" if spec.licence_note else "")
        table.add_row(name, ", ".join(spec.presets), licence, source, str(len(spec.files)), _pins(spec))
    _console().print(table)


@models_cli.command("check", help="Check weight files: present, missing or corrupt (exit 1 if any is not OK).")
@click.option("--weights-dir", "-w", required=True, type=click.Path(file_okay=False),
              help="Folder holding one <model name>/ subfolder per model.")
@click.option("--model", "-m", "names", multiple=True, help="Only this model (repeatable). Default: all.")
@click.option("--for", "uses", multiple=True, type=click.Choice(sorted(registry.USES)),
              help="Only what one use reads (repeatable; the same sets as `models fetch --for`).")
@click.option("--no-hash", is_flag=True, help="Skip sha256 (hashing multi-GB files takes a while).")
@click.pass_context
def check_cmd(ctx: click.Context, weights_dir: str, names: tuple[str, ...], uses: tuple[str, ...],
              no_hash: bool) -> None:
    wanted = list(dict.fromkeys([*names, *(m for use in uses for m in registry.USES[use])]))
    try:
        statuses = models.check_weights(weights_dir, wanted or None, verify_hashes=not no_hash)
    except KeyError as e:
        raise click.BadParameter(str(e.args[0]), param_hint="--model") from None
    console = _console()
    table = Table(title=f"weights in {weights_dir}")
    for col in ("model", "file", "status", "detail"):
        table.add_column(col, overflow="fold")
    fetch_needed: dict[str, str] = {}
    for s in statuses:
        style = _STYLE.get(s.status, "")
        table.add_row(s.model, escape(s.path), f"[{style}]{s.status}[/]" if style else s.status, escape(s.detail))
        if not s.ok:
            fetch_needed[s.model] = s.fetch
    console.print(table)
    for model, fetch in fetch_needed.items():
        # Plain print (no markup parsing) so the command can be copied exactly.
        indented = "\n".join(f"  {line}" for line in fetch.splitlines())
        click.echo(f"\n{model}: fetch the missing/corrupt files with:\n{indented}")
        if model.startswith("lpips-"):
            from raypdm.models.lpips_trunks import torch_cache_path

            cache = torch_cache_path(model.removeprefix("lpips-"))
            if cache.is_file():
                click.echo(f"  (jobs also read it from torchvision's cache, where it is: {cache})")
    fetchable = [m for m in fetch_needed if models.get(m).downloadable]
    if len(fetchable) > 1:
        click.echo(f"\nAll of them at once:\n  {fetch_command(fetchable, weights_dir)}")
    ctx.exit(1 if fetch_needed else 0)


_FETCH_STYLE = {"downloaded": "green", "resumed": "green", "already present": "green", "replaced": "yellow",
                "failed": "bold red", "bring your own": "yellow"}  # fmt: skip


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@models_cli.command("fetch", help="Download registered weight files into <weights-dir>/<model>/ (resumable, "
                    "sha256-checked); exit 1 if any file failed, 2 if a licence must be accepted first.")
@click.option("--weights-dir", "-w", required=True, type=click.Path(file_okay=False),
              help="Folder to fill with one <model name>/ subfolder per model.")
@click.option("--model", "-m", "names", multiple=True, help="Only this model (repeatable). Default: all.")
@click.option("--for", "uses", multiple=True, type=click.Choice(sorted(registry.USES)),
              help="Only what one use reads (repeatable): codesr (CodeSR purification), scoring (identity, "
                   "quality, faithfulness), training (the base model), paper (the paper's whole protocol).")
@click.option("--accept-licence", "accept", multiple=True, metavar="NAME",
              help="Accept a restricted model's licence (non-commercial / research only; repeatable, or "
                   "`all`). Recorded in the weights dir, so asked once.")
@click.pass_context
def fetch_cmd(ctx: click.Context, weights_dir: str, names: tuple[str, ...], uses: tuple[str, ...],
              accept: tuple[str, ...]) -> None:
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from raypdm.models.fetch import fetch_spec
    from raypdm.models.licences import LicenceNotAccepted, gate

    wanted = list(dict.fromkeys([*names, *(m for use in uses for m in registry.USES[use])]))
    try:
        specs = [models.get(n) for n in (wanted or models.list_models())]
    except KeyError as e:
        raise click.BadParameter(str(e.args[0]), param_hint="--model") from None
    unknown = sorted(set(accept) - {"all"} - {s.name for s in specs})
    if unknown:
        raise click.BadParameter(f"{', '.join(unknown)}: not among the models being fetched", param_hint="--accept-licence")
    command = "raypdm models fetch --weights-dir " + shlex.quote(weights_dir) + "".join(
        f" --model {n}" for n in names) + "".join(f" --for {u}" for u in uses)
    try:
        for spec in gate(specs, weights_dir, accept, command):
            click.echo(f"{spec.name}: licence accepted: {spec.licence}\n  {spec.licence_note}", err=True)
    except LicenceNotAccepted as e:
        click.echo(f"error: {e}", err=True)
        ctx.exit(2)
    console = _console()
    results = []
    # Hub files show huggingface_hub's own progress bars; URL files get one rich bar each.
    with Progress("{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  console=Console(stderr=True), transient=True) as bars:  # fmt: skip
        tasks: dict[str, int] = {}

        def progress(label: str, done: int, total: int | None) -> None:
            if label not in tasks:
                tasks[label] = bars.add_task(label, total=total)
            bars.update(tasks[label], completed=done, total=total)

        for spec in specs:
            results += fetch_spec(spec, weights_dir, progress=progress)
    table = Table(title=f"fetch into {weights_dir}")
    for col in ("model", "file", "status", "size", "sha256", "detail"):
        table.add_column(col, overflow="fold")
    for r in results:
        style = _FETCH_STYLE.get(r.status, "")
        table.add_row(r.model, escape(r.file), f"[{style}]{r.status}[/]" if style else r.status, _size(r.size),
                      r.sha256, escape(r.detail))  # fmt: skip
    console.print(table)
    for r in results:
        if r.status == "bring your own":
            click.echo(f"{r.model}: bring your own: place {r.file} at {r.path}")
    failed = [r for r in results if r.failed]
    if failed:
        click.echo(f"\n{len(failed)} file(s) failed; run the same command again to retry (downloads resume).")
    ctx.exit(1 if failed else 0)
