"""Terminal output: progress bars for long work, live training lines, and tables for results (rich).

Results (tables, a stage's name, the final summary) go to stdout; progress goes to stderr, so
`raypdm ... > results.txt` keeps the results and the terminal keeps the bars. Progress is live when stderr
is a terminal, one plain line per `PLAIN_PERCENT`% of the work when it is not (logs, CI), and nothing at all
after `set_progress(False)` (the CLI's `--no-progress`/`--quiet`).
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress_bar import ProgressBar
from rich.table import Table

# Logs and CI are not terminals; rich would squeeze tables into 80 columns there.
console = Console(width=None if sys.stdout.isatty() else 120)
progress_console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)

__all__ = ["console", "progress_console", "stage_progress", "print_table", "stage_summary_table",
           "TrainProgressView", "train_line", "set_progress", "plain_counter", "progress_enabled", "progress_line",
           "PLAIN_PERCENT"]

PLAIN_PERCENT = 10  # off a terminal: one progress line per this much of a stage's (or a run's) work

_progress = {"enabled": True}


def set_progress(enabled: bool) -> None:
    """Show progress (the default) or none at all, for this process (`--no-progress`, `--quiet`)."""
    _progress["enabled"] = bool(enabled)


def progress_enabled() -> bool:
    return _progress["enabled"]


def progress_line(text: str) -> None:
    """One plain progress line on stderr; nothing once progress is off."""
    if _progress["enabled"]:
        progress_console.print(text, highlight=False, markup=False, soft_wrap=True)


def percent_bucket(done: int, total: int, percent: int = PLAIN_PERCENT) -> int:
    """Which `percent`-wide slice of the work `done` of `total` is in (the last one only when complete)."""
    if total <= 0:
        return 0
    return min(100, done * 100 // total) // max(1, percent)


def plain_counter(unit: str = "images", indent: str = "  ",
                  percent: int = PLAIN_PERCENT) -> Callable[[int, int], None] | None:
    """A `progress(done, total)` callback that prints `done/total unit (p%)` to stderr once per `percent`%
    of the work (None when progress is off): for work too short-lived or too nested for a bar."""
    if not progress_enabled():
        return None
    last = [-1]

    def plain(done: int, total: int) -> None:
        bucket = percent_bucket(done, total, percent)
        if total and bucket != last[0]:
            last[0] = bucket
            progress_line(f"{indent}{done}/{total} {unit} ({done * 100 // total}%)")

    return plain


@contextlib.contextmanager
def stage_progress(description: str, enabled: bool = True) -> Iterator[Any]:
    """Print the stage's name (stdout) and yield a `progress(done, total)` callback for its progress on stderr:
    a bar on a terminal, a line per `PLAIN_PERCENT`% otherwise. Without progress (`enabled=False`,
    `--no-progress`) only the name is printed and no callback is given."""
    console.print(description, highlight=False)
    if not (enabled and progress_enabled()):
        yield None
        return
    if not progress_console.is_terminal:
        yield plain_counter()
        return
    with Progress(
        TextColumn("  "),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("images"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=progress_console,
        transient=True,  # the stage's table (stdout) says how it ended
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
    for s in summaries:  # what a re-run checked and redid, and why (image stages; see data/resume.py)
        note = s.resume_note() if hasattr(s, "resume_note") else None
        if note:
            console.print(f"  {s.stage}: {note}", highlight=False, markup=False)


# --------------------------------------------------------------------------- training progress


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def train_line(label: str, record: dict[str, Any] | None, total: int, width: int = 0) -> str:
    """`identity  step/total  loss  s/step  ETA  (phase)` as plain text: what the non-terminal view prints."""
    record = record or {}
    step, total = record.get("step", 0), record.get("total", total)
    loss = record.get("loss")
    rate = record.get("s_per_step")
    phase = record.get("phase", "waiting")
    attempt = record.get("attempt", 1)
    parts = [f"{label:<{width}}", f"{step}/{total}",
             f"loss {loss:.4f}" if loss is not None else "loss -",
             f"{rate:.2f} s/step" if rate is not None else "- s/step",
             f"ETA {_duration(record.get('eta_s'))}" if phase == "training" else phase]
    if attempt > 1:
        parts.append(f"attempt {attempt}")
    return "  ".join(parts)


class TrainProgressView:
    """One line per training run, fed by `update(records)` (the progress board's snapshot), on stderr.

    enabled and stderr a terminal: a rich Live block redrawn in place (it stays on screen when training
    ends). Enabled elsewhere (logs, CI): plain lines through `log`, a run's line when its phase changes and
    when its steps cross another `plain_percent`% of the total, so logs get a heartbeat, not a flood.
    Not enabled (`--no-progress`): nothing."""

    def __init__(self, labels: Sequence[str], totals: dict[str, int], *, enabled: bool = True,
                 log: Callable[[str], None] | None = None, plain_percent: int = PLAIN_PERCENT,
                 out: Console | None = None):
        self.labels, self.totals = list(labels), dict(totals)
        self.out = out or progress_console
        self.enabled = enabled and progress_enabled()
        self.live_mode = self.enabled and self.out.is_terminal
        self.log, self.plain_percent = log or progress_line, plain_percent
        self.records: dict[str, dict[str, Any]] = {}
        self._printed: dict[str, tuple[str, int]] = {}  # label -> (phase, percent bucket) of the last plain line
        self._lock = threading.Lock()
        self._live: Live | None = None
        self._width = max((len(label) for label in self.labels), default=0)

    def __enter__(self) -> TrainProgressView:
        if self.live_mode:
            self._live = Live(self._render(), console=self.out, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.update(self._render(), refresh=True)
            self._live.__exit__(*exc)
            self._live = None

    def update(self, records: dict[str, dict[str, Any]]) -> None:
        with self._lock:
            self.records = {k: dict(v) for k, v in records.items()}
            if self._live is not None:
                self._live.update(self._render())
            elif self.enabled:
                self._plain_lines()

    def _plain_lines(self) -> None:
        for label in self.labels:
            record = self.records.get(label)
            if record is None:
                continue
            phase = record.get("phase", "")
            total = record.get("total", self.totals.get(label, 0)) or 0
            bucket = percent_bucket(int(record.get("step", 0) or 0), int(total), self.plain_percent)
            last = self._printed.get(label)
            due = last is None or last[0] != phase or (phase == "training" and bucket != last[1])
            if due:
                self._printed[label] = (phase, bucket)
                self.log(train_line(label, record, self.totals.get(label, 0), self._width))

    def _render(self) -> Table:
        table = Table.grid(padding=(0, 2))
        for _ in range(7):
            table.add_column(no_wrap=True)
        for label in self.labels:
            record = self.records.get(label) or {}
            total = record.get("total", self.totals.get(label, 0)) or 1
            step = record.get("step", 0)
            phase = record.get("phase", "waiting")
            loss = record.get("loss")
            rate = record.get("s_per_step")
            state = f"ETA {_duration(record.get('eta_s'))}" if phase == "training" else phase
            if record.get("attempt", 1) > 1:
                state += f" (attempt {record['attempt']})"
            table.add_row(
                f"[bold]{label}[/bold]", ProgressBar(total=total, completed=step, width=24), f"{step}/{total}",
                f"loss {loss:.4f}" if loss is not None else "loss -",
                f"{rate:.2f} s/step" if rate is not None else "- s/step", state, "",
            )
        return table
