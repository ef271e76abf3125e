"""Live training progress: rank 0 of every identity's run → one small Ray actor → the driver's display.

    board = start_board()                                   # driver, before the Tune fan-out
    run_identity_training(job, progress=board)              # each trial passes the handle down
    with follow(board, view.update):                        # driver: polls while `tuner.fit()` blocks
        tuner.fit()

On rank 0, `ProgressReporter.step(step, loss)` sends at most one record a second (and always the last
step): a fire-and-forget actor call, and the loss tensor is read only for the steps it sends, so training
does not wait for the display (on a GPU, reading a loss every step would synchronise the device). Phase
changes (loading the model, caching latents, validation images, exporting) are sent at once. The board
keeps the latest record per run; Ray Tune's own trial reports arrive only when an identity's run ends.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["ProgressBoard", "ProgressReporter", "start_board", "follow", "PUSH_INTERVAL_S"]

PUSH_INTERVAL_S = 1.0  # per identity: the display never needs more, and an actor call costs ~0.1 ms


class ProgressBoard:
    """The latest progress record of every run (a Ray actor; see `start_board`)."""

    def __init__(self) -> None:
        self._records: dict[str, dict[str, Any]] = {}

    def update(self, record: dict[str, Any]) -> None:
        label = record["label"]
        merged = {**self._records.get(label, {}), **record}
        self._records[label] = merged

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return self._records


def start_board():
    """The board actor: no CPU of its own (it must never wait for a slot that training holds)."""
    import ray

    return ray.remote(ProgressBoard).options(num_cpus=0, max_restarts=0).remote()


class ProgressReporter:
    """Rank 0's side: throttled step records and immediate phase changes; a no-op without a board."""

    def __init__(self, board, label: str, total: int, *, attempt: int = 1, interval_s: float = PUSH_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.board, self.label, self.total, self.attempt = board, label, total, attempt
        self.interval_s, self.clock = interval_s, clock
        self._last_push: float | None = None
        self._last_step: int | None = None
        self._rate: float | None = None  # seconds per step, smoothed over the pushes

    def _send(self, **fields: Any) -> None:
        if self.board is not None:
            self.board.update.remote({"label": self.label, "total": self.total, "attempt": self.attempt,
                                      "time": time.time(), **fields})

    def phase(self, phase: str, **fields: Any) -> None:
        self._send(phase=phase, **fields)

    def start(self, step: int) -> None:
        """Training starts (or resumes) at `step`: the rate is measured from here."""
        self._last_push, self._last_step = self.clock(), step
        self._send(phase="training", step=step, start_step=step)

    def step(self, step: int, loss) -> bool:
        """After optimisation step `step` (1-based); `loss` a tensor or float, read only when sent."""
        now = self.clock()
        if self._last_push is None:
            self._last_push, self._last_step = now, step - 1
        if now - self._last_push < self.interval_s and step != self.total:
            return False
        steps = step - self._last_step
        if steps > 0:
            rate = (now - self._last_push) / steps
            self._rate = rate if self._rate is None else 0.6 * self._rate + 0.4 * rate
        self._last_push, self._last_step = now, step
        eta = self._rate * (self.total - step) if self._rate is not None else None
        self._send(phase="training", step=step, loss=float(loss), s_per_step=self._rate, eta_s=eta)
        return True

    @property
    def seconds_per_step(self) -> float | None:
        return self._rate


@contextlib.contextmanager
def follow(board, on_update: Callable[[dict[str, dict[str, Any]]], None], *, interval_s: float = 0.5) -> Iterator[None]:
    """Poll `board` in a driver thread and hand each snapshot to `on_update` while the block runs, then
    once more at the end (so the last records are shown)."""
    import ray

    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(interval_s):
            with contextlib.suppress(Exception):  # a slow poll must never end the display (or the run)
                on_update(ray.get(board.snapshot.remote(), timeout=10))

    thread = threading.Thread(target=poll, name="raypdm-train-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=15)
        with contextlib.suppress(Exception):
            on_update(ray.get(board.snapshot.remote(), timeout=10))
