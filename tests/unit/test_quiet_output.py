"""raypdm.runtime.quiet_environment: what a quiet run sets, and that `quiet_environment(False)` undoes
exactly that (environment, logger levels, warning filters)."""

from __future__ import annotations

import logging
import os
import warnings

import pytest

from raypdm import runtime
from raypdm.runtime import QUIET_ENV, quiet_environment


@pytest.fixture
def clean_quiet(monkeypatch):
    """No quiet keys in the environment, no earlier quiet state, and everything undone afterwards."""
    quiet_environment(False)  # undo whatever an earlier caller in this process did
    for key in QUIET_ENV:
        monkeypatch.delenv(key, raising=False)
    levels = {name: logging.getLogger(name).level for name in runtime._QUIET_LOGGERS}
    filters = list(warnings.filters)
    yield monkeypatch
    quiet_environment(False)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    warnings.filters[:] = filters
    warnings._filters_mutated()
    assert runtime._state["env"] == {} and runtime._state["loggers"] == {} and runtime._state["warnings"] is None


def _warn(module: str, category=DeprecationWarning, message="x") -> None:
    warnings.warn_explicit(message, category, "f.py", 1, module=module)


def test_sets_the_quiet_environment(clean_quiet):
    quiet_environment(True, native_stderr=False)
    for key, value in QUIET_ENV.items():
        assert os.environ[key] == value
    assert runtime._state["native"] is False
    assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0"


def test_a_value_the_user_set_wins(clean_quiet):
    clean_quiet.setenv("RAY_AIR_NEW_OUTPUT", "1")
    quiet_environment(True, native_stderr=False)
    assert os.environ["RAY_AIR_NEW_OUTPUT"] == "1"
    assert os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"] == QUIET_ENV["RAY_DEDUP_LOGS_SKIP_REGEX"]
    quiet_environment(False)
    assert os.environ["RAY_AIR_NEW_OUTPUT"] == "1"  # the user's own value survives the undo
    assert "RAY_DEDUP_LOGS_SKIP_REGEX" not in os.environ


def test_undo_removes_what_it_set(clean_quiet):
    quiet_environment(True, native_stderr=False)
    quiet_environment(False)
    for key in QUIET_ENV:
        assert key not in os.environ


def test_noisy_loggers_are_lowered_and_restored(clean_quiet):
    logging.getLogger("bitsandbytes").setLevel(logging.NOTSET)
    logging.getLogger("mlflow").setLevel(logging.DEBUG)
    before = {name: logging.getLogger(name).level for name in runtime._QUIET_LOGGERS}
    quiet_environment(True, native_stderr=False)
    assert logging.getLogger("bitsandbytes").level == logging.ERROR
    assert logging.getLogger("ray.data").level >= logging.ERROR
    assert logging.getLogger("mlflow").level >= logging.WARNING
    for name, level in runtime._QUIET_LOGGERS.items():
        assert logging.getLogger(name).getEffectiveLevel() >= level
    assert not logging.getLogger("bitsandbytes").isEnabledFor(logging.WARNING)
    assert logging.getLogger("bitsandbytes").isEnabledFor(logging.ERROR)
    quiet_environment(False)
    assert {name: logging.getLogger(name).level for name in runtime._QUIET_LOGGERS} == before


def test_library_warnings_are_ignored(clean_quiet):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_environment(True, native_stderr=False)
        _warn("torch.nn")
        _warn("diffusers.models.attention", FutureWarning)
        _warn("ray.tune.tuner", UserWarning)
        assert [str(w.message) for w in caught] == []
        quiet_environment(False)


def test_raypdm_warnings_still_show(clean_quiet):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_environment(True, native_stderr=False)
        _warn("raypdm.pipelines", UserWarning, "ours")
        _warn("raypdm.train.loggers", DeprecationWarning, "ours too")
        quiet_environment(False)
    assert [str(w.message) for w in caught] == ["ours", "ours too"]


def test_other_packages_with_a_listed_prefix_still_show(clean_quiet):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_environment(True, native_stderr=False)
        _warn("torchmetrics.functional", UserWarning, "not torch")
        _warn("my_project", UserWarning, "user code")
        quiet_environment(False)
    assert [str(w.message) for w in caught] == ["not torch", "user code"]


def test_undo_restores_the_warning_filters(clean_quiet):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before = list(warnings.filters)
        quiet_environment(True, native_stderr=False)
        assert warnings.filters != before
        quiet_environment(False)
        assert warnings.filters == before
        _warn("torch.nn", DeprecationWarning, "shown again")
    assert [str(w.message) for w in caught] == ["shown again"]


def test_idempotent_true_twice_false_once(clean_quiet):
    logging.getLogger("ray.tune").setLevel(logging.INFO)
    before_levels = {name: logging.getLogger(name).level for name in runtime._QUIET_LOGGERS}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before_filters = list(warnings.filters)
        quiet_environment(True, native_stderr=False)
        after_one = list(warnings.filters)
        quiet_environment(True, native_stderr=False)
        assert warnings.filters == after_one  # the second call adds no filters
        assert logging.getLogger("ray.tune").level == logging.ERROR
        for key, value in QUIET_ENV.items():
            assert os.environ[key] == value
        quiet_environment(False)
        assert warnings.filters == before_filters
        _warn("torch.nn", DeprecationWarning, "visible")
    assert [str(w.message) for w in caught] == ["visible"]
    assert {name: logging.getLogger(name).level for name in runtime._QUIET_LOGGERS} == before_levels
    for key in QUIET_ENV:
        assert key not in os.environ
    assert runtime._state == {**runtime._state, "env": {}, "loggers": {}, "warnings": None, "native": False}


def test_native_stderr_flag_is_recorded_and_undone(clean_quiet):
    quiet_environment(True)  # a front door: init_ray would install the fd-2 filter later
    assert runtime._state["native"] is True
    quiet_environment(False)
    assert runtime._state["native"] is False


@pytest.mark.parametrize("verbose", [False, True])
def test_a_command_that_imports_diffusers_is_quiet_unless_verbose(verbose, tmp_path):
    """click builds `raypdm sample` (importing diffusers, which imports bitsandbytes and its warning) before
    the group's `-v` callback runs: the quiet settings must already hold then."""
    import subprocess
    import sys

    argv = ["raypdm", *(["-v"] if verbose else []), "sample", "--help"]
    code = f"import sys; sys.argv = {argv!r}; from raypdm.cli import main; main()"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "--models" in res.stdout
    if not verbose:
        assert "gemm_4bit_forward" not in res.stderr and "Warning" not in res.stderr, res.stderr
