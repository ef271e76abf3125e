"""Ray and device setup shared by every command, and the quiet terminal every command starts with.

On a laptop `init_ray()` starts an embedded local cluster sized to the machine; under `ray job submit`
(or with RAY_ADDRESS set) it connects to the cluster instead. Tests declare logical GPUs to exercise GPU
scheduling on CPU-only machines; code then still runs on the CPU because CUDA is absent.

Quiet by default: `quiet_environment()` (the CLI calls it first, before Ray is imported where it can) turns
off Ray's and the libraries' own chatter at its source, so a command prints its own tables, progress and
errors only; `-v` (`quiet_environment(False)`, `init_ray(quiet=False)`) shows everything again. Ray's
full logs stay in the session folder (`<RAY_TMPDIR or /tmp/ray>/session_latest/logs`) either way.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import sys
import threading
import warnings
from typing import Any

__all__ = ["init_ray", "default_device", "cuda_available", "ray_resources", "quiet_environment", "QUIET_ENV"]

log = logging.getLogger(__name__)

# Environment variables of a quiet run; a value the user set already wins (setdefault). Each must be in the
# environment before the thing that reads it starts, which is why the front door sets them first.
QUIET_ENV: dict[str, str] = {
    # Ray Tune's "new output engine" prints the experiment box ("Configuration for experiment"), "View
    # detailed results here" and the TensorBoard hint whatever `verbose` says (Ray 2.60's
    # `experiment_started` ignores the verbosity); the classic reporter honours `RunConfig(verbose=0)`.
    # Read by Tune at `Tuner.fit()`.
    "RAY_AIR_NEW_OUTPUT": "0",
    # The raylet's "N PYTHON worker processes have been started ... maximum expected startup concurrency"
    # warning: every actor (model pools, Train workers, Tune trials) is a worker process, so on a small
    # machine it fires in every multi-stage command although nothing is wrong. It reaches the driver through
    # the GCS error channel, which `log_to_driver=False` does not cover; Ray's log deduplicator drops lines
    # that match this pattern. Read when `ray` is imported (patched into Ray's deduplicators if it already is).
    "RAY_DEDUP_LOGS_SKIP_REGEX": r"worker processes have been started on node",
}
# Deliberately not set: TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1 would stop Tune writing result.json, and a
# ResultGrid then logs "Failed to fetch metrics" for every trial (the sweep reads its results from there).
# RAY_BACKEND_LOG_LEVEL=fatal would hide the C++ line below, but it reaches the local raylet and GCS too
# (their logs in the session folder come out empty) and prints a line of its own on every start.

# Python loggers that are too talkative at WARNING in a quiet run (ERROR still shows).
_QUIET_LOGGERS = {
    # "Failed to load CPU gemm_4bit_forward from kernels-community" at import, on every command that imports
    # diffusers/transformers/pyiqa on a machine without the optional `kernels` package.
    "bitsandbytes": logging.ERROR,
    # "Token authentication is enabled for this Ray cluster" on every local start: informational.
    "ray._private.authentication": logging.ERROR,
    # Ray Data logs each execution plan at INFO and "Progress bars disabled" at WARNING.
    "ray.data": logging.ERROR,
    # Tune/Train's own notes ("Trial ... completed", deprecation hints about APIs we do not call).
    "ray.tune": logging.ERROR,
    "ray.train": logging.ERROR,
    # An MLflow store creating its tables or experiment logs at INFO (only with `--log-to mlflow`).
    "mlflow": logging.WARNING,
    "alembic": logging.WARNING,
}

# Library warnings (the `warnings` module) from these packages: deprecations and tips about their own
# internals that a user of raypdm cannot act on. Warnings raised from raypdm's code still show.
_QUIET_WARNING_MODULES = (
    r"(ray|torch|torchvision|diffusers|transformers|accelerate|deepspeed|bitsandbytes|huggingface_hub|"
    r"timm|pyiqa|lpips|insightface|deepface|onnxruntime|tensorboard|torch\.utils\.tensorboard|wandb|mlflow|"
    r"pydantic|pkg_resources|optuna)(\..*)?\Z"
)

# Lines Ray's C++ core prints on the driver's native stderr (fd 2) that are not errors of the run:
# Ray Data creates every actor-pool worker with max_restarts=-1 and object-store arguments (its context and
# transform), so this fires once per map stage (ray-project/ray#57733). Matched on the message only.
_NATIVE_NOISE = (re.compile(rb"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store"),)

_state: dict[str, Any] = {"env": {}, "loggers": {}, "warnings": None, "native": False, "filter": None}


def quiet_environment(quiet: bool = True, *, native_stderr: bool = True) -> None:
    """Make this process and the Ray cluster it starts quiet (`quiet=True`), or undo exactly what an earlier
    call did (`quiet=False`, the CLI's `-v`). Idempotent; call it before `import ray` where possible.

    Sets `QUIET_ENV` (what Ray reads at import, at `ray.init` and at `Tuner.fit`), lowers the noisy loggers
    in `_QUIET_LOGGERS` and filters library warnings from `_QUIET_WARNING_MODULES`. `native_stderr`: also
    have `init_ray` drop Ray's benign C++ driver lines (`_NATIVE_NOISE`) from the process's native stderr
    once Ray runs (a command-line front door; a library caller or a test harness owns its own fd 2).
    Errors, tracebacks and raypdm's own output are untouched.
    """
    if not quiet:
        _undo_quiet()
        return
    for key, value in QUIET_ENV.items():
        if key not in os.environ:
            os.environ[key] = value
            _state["env"][key] = value
    _lower_loggers()
    if _state["warnings"] is None:
        _state["warnings"] = list(warnings.filters)
        for category in (DeprecationWarning, FutureWarning, UserWarning, RuntimeWarning):
            warnings.filterwarnings("ignore", category=category, module=_QUIET_WARNING_MODULES)
    _dedup_skip_after_import()
    if native_stderr:
        _state["native"] = True


def _lower_loggers() -> None:
    for name, level in _QUIET_LOGGERS.items():
        logger = logging.getLogger(name)
        _state["loggers"].setdefault(name, logger.level)
        logger.setLevel(max(level, logger.getEffectiveLevel()))


def _undo_quiet() -> None:
    for key, value in _state["env"].items():
        if os.environ.get(key) == value:
            del os.environ[key]
    _state["env"] = {}
    for name, level in _state["loggers"].items():
        logging.getLogger(name).setLevel(level)
    _state["loggers"] = {}
    if _state["warnings"] is not None:
        warnings.filters[:] = _state["warnings"]
        warnings._filters_mutated()  # noqa: SLF001 (the documented way filters are reset after edits)
        _state["warnings"] = None
    _state["native"] = False
    _dedup_skip_after_import()


def _dedup_skip_after_import() -> None:
    """RAY_DEDUP_LOGS_SKIP_REGEX is read when `ray` is imported; the CLI imports it before its options are
    parsed, so apply the current setting to Ray's two deduplicators as well (no-op before the import)."""
    ray_logging = sys.modules.get("ray._private.ray_logging")
    if ray_logging is None:
        return
    pattern = os.environ.get("RAY_DEDUP_LOGS_SKIP_REGEX")
    for name in ("stdout_deduplicator", "stderr_deduplicator"):
        dedup = getattr(ray_logging, name, None)
        if dedup is not None and hasattr(dedup, "skip_re"):
            dedup.skip_re = re.compile(pattern) if pattern else None


class _NativeStderrFilter:
    """Between Ray's C++ core and the terminal: fd 2 becomes a pipe that a thread copies to the real stderr,
    leaving out `_NATIVE_NOISE` lines. Python's `sys.stderr` is pointed straight at the real stderr, so
    tracebacks and our own output never pass through the thread. Installed after `ray.init`, so the Ray
    processes the driver starts keep the real stderr; restored (and drained) at exit."""

    def __init__(self) -> None:
        sys.stderr.flush()
        self.saved = os.dup(2)
        self.python_stderr = sys.stderr
        sys.stderr = open(  # noqa: SIM115 (lives as long as the process)
            self.saved, "w", buffering=1, encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
            errors="backslashreplace", closefd=False,
        )
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self.thread = threading.Thread(target=self._copy, args=(read_fd,), name="raypdm-native-stderr", daemon=True)
        self.thread.start()
        atexit.register(self.close)

    def _copy(self, read_fd: int) -> None:
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            for line in iter(pipe.readline, b""):
                if not any(p.search(line) for p in _NATIVE_NOISE):
                    os.write(self.saved, line)

    def close(self) -> None:
        try:
            sys.stderr.flush()
            os.dup2(self.saved, 2)  # closes the pipe's last write end: the thread drains it and stops
            self.thread.join(timeout=2)
        except (OSError, ValueError):
            pass


def _filter_native_stderr() -> None:
    # Only a driver whose stderr is the process's real fd 2 (not pytest's capture, not a notebook).
    if _state["filter"] is not None or not _state["native"]:
        return
    try:
        if sys.stderr.fileno() != 2:
            return
    except (AttributeError, OSError, ValueError):
        return
    _state["filter"] = _NativeStderrFilter()


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # a broken CUDA install must not stop CPU work
        return False


def default_device(prefer: str | None = None) -> str:
    """`prefer` if given ("cpu", "cuda", "cuda:1"); otherwise CUDA when present, else the CPU."""
    if prefer:
        if prefer.startswith("cuda") and not cuda_available():
            log.warning("device %s requested but CUDA is not available; using cpu", prefer)
            return "cpu"
        return prefer
    return "cuda" if cuda_available() else "cpu"


_LOCAL_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}

# Driver-side settings the workers must see too. A local cluster's workers inherit the driver's
# environment; a running cluster's (RAY_ADDRESS, `ray job submit`) get them through the runtime env.
PROPAGATED_ENV = ("RAYPDM_NO_VERIFY",)


def _propagated_runtime_env(given: dict[str, Any] | None) -> dict[str, Any] | None:
    """`given` plus the PROPAGATED_ENV variables set here. Ray merges a job's runtime env with ray.init's
    per env var and refuses the same key in both, so a key the submitted job already sets is left out."""
    import json

    env_vars = {k: os.environ[k] for k in PROPAGATED_ENV if os.environ.get(k)}
    if not env_vars:
        return given
    job_env: dict[str, Any] = {}
    with contextlib.suppress(Exception):  # set by Ray's job manager in a submitted job's driver
        job_env = json.loads(os.environ["RAY_JOB_CONFIG_JSON_ENV_VAR"]).get("runtime_env", {}).get("env_vars", {}) or {}
    merged = dict(given or {})
    extra = {**(merged.get("env_vars") or {}), **{k: v for k, v in env_vars.items() if k not in job_env}}
    if extra:
        merged["env_vars"] = extra
    return merged or None


_QUIET = [True]  # what init_ray does when not told: `raypdm -v` flips it for stages that start Ray on demand


def prefer_quiet(quiet: bool) -> bool:
    """Set whether a later `init_ray()` without `quiet=` is quiet; returns the previous setting."""
    before, _QUIET[0] = _QUIET[0], bool(quiet)
    return before


def init_ray(
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    logical_gpus: int | None = None,
    quiet: bool | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """Connect to Ray once per process and return the cluster's resources.

    address: a cluster address; defaults to RAY_ADDRESS; without either a local cluster starts.
    logical_gpus: declare this many GPUs on the local cluster even without CUDA (tests, scheduling demos).
    quiet: worker output stays in the session's log files (`log_to_driver=False`), Ray logs at WARNING,
    no Ray Data progress bars, and `quiet_environment()`'s settings; False shows everything. None: the
    setting of `prefer_quiet` (quiet unless a command runs with `-v`).
    """
    import ray

    if ray.is_initialized():
        return ray_resources()
    if quiet is None:
        quiet = _QUIET[0]
    quiet_environment(quiet, native_stderr=False)
    address = address or os.environ.get("RAY_ADDRESS") or None
    opts: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": not quiet}
    if quiet:
        opts["logging_level"] = logging.WARNING
    opts.update(kwargs)
    if address:
        runtime_env = _propagated_runtime_env(opts.pop("runtime_env", None))
        if runtime_env:
            opts["runtime_env"] = runtime_env
        ray.init(address=address, **opts)
    else:
        # An embedded cluster on one machine: nothing can preempt it, so Ray Train's per-run preemption
        # watcher (an extra actor process per training run) is off, and Train's controller polls its workers
        # every 0.5 s instead of 2 s (a finished run is noticed sooner). Values the user set win; the
        # workers inherit them (they start after this).
        for key, value in _LOCAL_TRAIN_ENV.items():
            os.environ.setdefault(key, value)
        if num_gpus is None:
            num_gpus = logical_gpus if logical_gpus is not None else _cuda_count()
        opts.setdefault("include_dashboard", False)
        tmp = os.environ.get("RAY_TMPDIR")
        if tmp:
            opts.setdefault("_temp_dir", tmp)
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, num_gpus=num_gpus, **opts)
    _configure_data(quiet)
    if quiet:
        _lower_loggers()  # Ray Data sets its own logger levels when it is first imported
        _filter_native_stderr()
    return ray_resources()


def _cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def _configure_data(quiet: bool) -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    # Our own progress display reads the stream in the driver; Ray's bars would interleave with it.
    ctx.enable_progress_bars = not quiet
    # Model actors can take a while to load real weights; do not give up on them early.
    ctx.wait_for_min_actors_s = max(getattr(ctx, "wait_for_min_actors_s", 0) or 0, 600)


def ray_resources() -> dict[str, float]:
    import ray

    return {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")}
