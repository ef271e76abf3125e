"""`raypdm models list` and `raypdm models check`. The main CLI mounts this group as `models`."""

from __future__ import annotations

import shutil

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from raypdm import models

_STYLE = {"present": "green", "missing": "red", "corrupt": "bold red"}


def _console() -> Console:
    # Wide, so fetch commands and paths are never cut in logs and captured output.
    return Console(width=max(200, shutil.get_terminal_size().columns), soft_wrap=True)


@click.group("models", help="Model registry: what each model needs and whether its weights are in place.")
def models_cli() -> None:
    pass


@models_cli.command("list", help="Registered models with presets, licence and hub source.")
def list_cmd() -> None:
    table = Table(title="raypdm models")
    for col in ("name", "presets", "licence", "hub repo@revision", "files"):
        table.add_column(col, overflow="fold")
    for name in models.list_models():
        spec = models.get(name)
        hub = f"{spec.hub_repo}@{spec.hub_revision or 'main'}" if spec.hub_repo else "(direct URLs)"
        licence = spec.licence + (f" ({spec.licence_note})" if spec.licence_note else "")
        table.add_row(name, ", ".join(spec.presets), licence, hub, str(len(spec.files)))
    _console().print(table)


@models_cli.command("check", help="Check weight files: present, missing or corrupt (exit 1 if any is not OK).")
@click.option("--weights-dir", "-w", required=True, type=click.Path(file_okay=False),
              help="Folder holding one <model name>/ subfolder per model.")
@click.option("--model", "-m", "names", multiple=True, help="Only this model (repeatable). Default: all.")
@click.option("--no-hash", is_flag=True, help="Skip sha256 (hashing multi-GB files takes a while).")
@click.pass_context
def check_cmd(ctx: click.Context, weights_dir: str, names: tuple[str, ...], no_hash: bool) -> None:
    try:
        statuses = models.check_weights(weights_dir, list(names) or None, verify_hashes=not no_hash)
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
        click.echo(f"\n{model}: fetch the missing/corrupt files with:\n  {fetch}")
    ctx.exit(1 if fetch_needed else 0)
