"""Terminal output: progress bars for long work and tables for results (rich)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

# Logs and CI are not terminals; rich would squeeze tables into 80 columns there.
console = Console(width=None if sys.stdout.isatty() else 120)

__all__ = ["console", "stage_progress", "print_table", "stage_summary_table"]


@contextlib.contextmanager
def stage_progress(description: str, enabled: bool = True) -> Iterator[Any]:
    """Yield a `progress(done, total)` callback that drives one bar."""
    if not enabled:
        yield None
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("images"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*[_fmt(v) for v in row])
    console.print(table)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def stage_summary_table(summaries: Sequence[Any], title: str = "Stages") -> None:
    rows = [
        (s.stage, s.total, s.processed, s.skipped, s.errors, f"{s.seconds:.1f}", f"{s.images_per_s:.2f}", s.output)
        for s in summaries
    ]
    print_table(title, ["stage", "inputs", "done", "resumed", "errors", "seconds", "images/s", "output"], rows)
