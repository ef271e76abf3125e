"""Live progress of a sweep on the driver: trials finished out of the total, errors, and the best score
reported so far (with its token and template). A Ray Tune `Callback`: Tune calls it in the driver as
results arrive, so nothing polls files or the cluster."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ray.tune import Callback

__all__ = ["SweepProgress", "expected_trials"]


def expected_trials(space: dict[str, Any], search: str, num_samples: int) -> int:
    """How many trials Tune will run: grid/random expand every `grid_search` axis `num_samples` times;
    Optuna samples `num_samples` points."""
    if search == "optuna":
        return num_samples
    grid = math.prod(len(v["grid_search"]) for v in space.values() if isinstance(v, dict) and "grid_search" in v)
    return grid * num_samples


class SweepProgress(Callback):
    """One line per finished trial (every ~5% past 40 trials), to `log` (default: the progress stream on
    stderr, silent under `--no-progress`):
    `trials 3/8 done (1 error), best score 0.912: token 'bhi', template 'with {token} noisy pattern'`."""

    def __init__(self, total: int, log: Callable[[str], None] | None = None, metric: str = "score"):
        self.total = total
        self.log = log
        self.metric = metric
        self.best: tuple[float, dict[str, Any]] | None = None
        self._last_logged = -1
        # Tune calls on_trial_complete before it marks that trial TERMINATED: count the ones we were told
        # of ourselves, plus any already terminal (a resumed sweep's finished trials)
        self._finished: dict[Any, bool] = {}  # trial id -> errored

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its RunConfig (callbacks included) into the experiment state; a log function (a
        # console holding locks) stays behind. A restored copy (a resumed sweep) prints to the progress stream.
        return {**self.__dict__, "log": None}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        score = result.get(self.metric)
        if isinstance(score, (int, float)) and not math.isnan(score) and (self.best is None or score > self.best[0]):
            self.best = (float(score), dict(trial.config))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finished[_trial_id(trial)] = False
        self._report(trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finished[_trial_id(trial)] = True
        self._report(trials)

    def _report(self, trials) -> None:
        finished = {_trial_id(t): t.status == "ERROR" for t in trials if t.status in ("TERMINATED", "ERROR")}
        finished.update(self._finished)
        done, errors = len(finished), sum(finished.values())
        step = 1 if self.total <= 40 else max(1, self.total // 20)
        if done == self._last_logged or (done - max(self._last_logged, 0) < step and done < self.total):
            return
        self._last_logged = done
        line = f"trials {done}/{self.total} done" + (f" ({errors} error{'s' * (errors != 1)})" if errors else "")
        if self.best is not None:
            score, config = self.best
            from raypdm.search.space import noise_of

            try:
                token, template = noise_of(config)
                point = {"token": token, "template": template, "data": config.get("data")}
            except (KeyError, ValueError):
                point = config
            what = ", ".join(f"{k} {v!r}" for k, v in point.items() if k in ("token", "template", "data") and v)
            line += f", best {self.metric} so far {score:.3f}: {what}"
        (self.log or _progress_line)(line)


def _progress_line(line: str) -> None:
    from raypdm.ui import progress_line

    progress_line(line)


def _trial_id(trial) -> Any:
    return getattr(trial, "trial_id", None) or id(trial)
