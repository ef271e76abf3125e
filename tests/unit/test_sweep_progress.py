"""The sweep's live progress line (a Ray Tune callback), driven with stand-in trials."""

from __future__ import annotations

from types import SimpleNamespace

from ray import tune

from raypdm.search.progress import SweepProgress, expected_trials


def _trial(status, token, template="with {token} noisy pattern"):
    return SimpleNamespace(status=status, config={"token": token, "template": template, "seed": 1})


def test_expected_trials_counts_grid_axes_and_samples():
    space = {"token": tune.grid_search(["a", "b", "c"]), "template": tune.grid_search(["x", "y"]), "lr": 1e-5}
    assert expected_trials(space, "grid", 1) == 6
    assert expected_trials(space, "random", 2) == 12
    assert expected_trials({"token": tune.choice(["a", "b"])}, "optuna", 5) == 5


def test_lines_count_done_and_errors_and_name_the_best_so_far():
    lines: list[str] = []
    progress = SweepProgress(total=3, log=lines.append)
    a, b, c = _trial("RUNNING", "t@j"), _trial("RUNNING", "bhi"), _trial("RUNNING", "zzz")
    trials = [a, b, c]
    progress.on_trial_result(0, trials, a, {"score": 0.2})
    progress.on_trial_result(0, trials, b, {"score": 0.9})
    progress.on_trial_result(0, trials, a, {"score": float("nan")})  # a NaN never wins
    # like Tune: the callback runs before the trial's status changes
    progress.on_trial_complete(0, trials, a)
    a.status = "TERMINATED"
    progress.on_trial_error(0, trials, c)
    c.status = "ERROR"
    progress.on_trial_complete(0, trials, b)
    b.status = "TERMINATED"
    assert lines[0] == "trials 1/3 done, best score so far 0.900: token 'bhi', template 'with {token} noisy pattern'"
    assert lines[1].startswith("trials 2/3 done (1 error)")
    assert lines[2].startswith("trials 3/3 done (1 error)") and len(lines) == 3


def test_a_large_sweep_logs_about_every_five_percent():
    lines: list[str] = []
    progress = SweepProgress(total=200, log=lines.append)
    trials = [_trial("RUNNING", f"t{i}") for i in range(200)]
    for t in trials:
        progress.on_trial_complete(0, trials, t)
        t.status = "TERMINATED"
    assert 19 <= len(lines) <= 21 and lines[-1].startswith("trials 200/200 done")


def test_it_pickles_without_its_log_function_and_a_restored_copy_prints_to_stderr(capsys):
    """Tune pickles RunConfig callbacks into the experiment state (a console with locks cannot go) and a
    resumed sweep reports through that restored copy: it prints to the progress stream, stderr."""
    import pickle
    import threading

    from raypdm.ui import set_progress

    lock = threading.RLock()
    progress = SweepProgress(total=2, log=lambda line: (lock, line))
    copy = pickle.loads(pickle.dumps(progress))
    assert copy.total == 2 and copy.log is None
    a, b = _trial("RUNNING", "a"), _trial("RUNNING", "b")
    copy.on_trial_complete(0, [a, b], a)
    out = capsys.readouterr()
    assert "trials 1/2 done" in out.err and out.out == ""
    set_progress(False)  # --no-progress
    try:
        copy.on_trial_complete(0, [a, b], b)
    finally:
        set_progress(True)
    assert capsys.readouterr().err == ""
