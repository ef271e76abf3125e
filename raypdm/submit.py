"""`raypdm submit JOB`: run one of the `jobs/<JOB>.py` entrypoints on a Ray cluster.

A thin layer over Ray's job submission API (`ray.job_submission.JobSubmissionClient`, the same server that
`ray job submit` talks to): it uploads the working directory with the runtime environment of
`jobs/runtime_env.yaml`, starts `python jobs/JOB.py [--config FILE] [--smoke] [--output URI] [extra args]`
as the job's driver, prints the submission id, and with `--follow` streams the driver's logs and exits
non-zero unless the job succeeded.

What it adds over `ray job submit`:
- the job name is checked against the `jobs/*.py` files before anything is uploaded, the address against
  `--address`/`RAY_ADDRESS`, and a local `--config` against the working directory (a file outside it, or
  one the runtime env excludes, would not reach the cluster);
- a relative local `--output` is refused: the driver runs in a temporary copy of the working directory
  that Ray deletes, so outputs must go to shared storage (`/mnt/shared/...`) or an `s3://`/`gs://` URI;
- `--config` defaults to the job's example config `jobs/configs/JOB.yaml` when it exists;
- the submission id names the job (`raypdm-redteam-20261122-141500-3f9a2c`) and the metadata records the
  job, its settings and the raypdm version, so `ray job list` tells runs apart.

Driver placement: by default no entrypoint resources are requested (`driver_cpus=0`). Ray then pins the
driver to the head node (its job manager adds a head-node label selector when a job asks for nothing), and
the head nodes in `clusters/` advertise 0 CPUs and 0 GPUs, so the driver is the only thing that runs
there: it never starts a GPU node for itself and a spot preemption never takes it down. Asking for CPUs
(`--driver-cpus 0.5`) only fits clusters whose head advertises CPUs; Ray may then place the driver on any
node with room, which is what a laptop cluster without a dedicated head wants.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import functools
import getpass
import os
import secrets
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import yaml

from raypdm import __version__

__all__ = [
    "SubmitError",
    "available_jobs",
    "build_entrypoint",
    "load_runtime_env",
    "resolve_address",
    "submit_command",
    "submit_job",
]

JOBS_DIR = "jobs"
RUNTIME_ENV_FILE = "jobs/runtime_env.yaml"
CONFIGS_DIR = "jobs/configs"
# Terminal states of a Ray job; anything but SUCCEEDED makes `--follow` exit non-zero.
TERMINAL_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(ValueError):
    """A submission that cannot work as asked. The message names the flag, file or variable to fix."""


# --------------------------------------------------------------------------------------- preparation
def available_jobs(working_dir: str | os.PathLike = ".") -> list[str]:
    """The job names `raypdm submit` accepts: the `jobs/*.py` files of the working directory."""
    jobs_dir = Path(working_dir) / JOBS_DIR
    if not jobs_dir.is_dir():
        return []
    return sorted(p.stem for p in jobs_dir.glob("*.py") if p.is_file() and not p.stem.startswith("_"))


def resolve_address(address: str | None) -> str:
    """The job server's URL from `--address`, else `RAY_ADDRESS`; an error naming both when neither is set."""
    address = (address or os.environ.get("RAY_ADDRESS") or "").strip()
    if not address:
        raise SubmitError(
            "no cluster address: pass --address http://127.0.0.1:8265 or set RAY_ADDRESS "
            "(the job server, reached through `ray dashboard CLUSTER.yaml` or `kubectl port-forward`)"
        )
    if address.startswith("ray://") or address == "auto":
        raise SubmitError(
            f"--address/RAY_ADDRESS is {address!r}, an address for ray.init; job submission talks to the "
            "dashboard's job server instead, e.g. http://127.0.0.1:8265"
        )
    if "://" not in address:
        address = f"http://{address}"
    return address


def load_runtime_env(working_dir: str | os.PathLike = ".", runtime_env: dict[str, Any] | None = None) -> dict[str, Any]:
    """The runtime env a job runs in: `runtime_env` if given, else the working dir's `jobs/runtime_env.yaml`.

    Its `working_dir` always becomes the absolute working directory (the YAML says "." so that
    `ray job submit --runtime-env jobs/runtime_env.yaml` works from the repository root too).
    """
    root = Path(working_dir).resolve()
    if runtime_env is None:
        path = root / RUNTIME_ENV_FILE
        if not path.is_file():
            raise SubmitError(f"runtime env file not found: {path} (run from the repository root or pass --working-dir)")
        try:
            runtime_env = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise SubmitError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(runtime_env, dict):
            raise SubmitError(f"{path}: expected a mapping of runtime env fields, got {type(runtime_env).__name__}")
    env = dict(runtime_env)
    env["working_dir"] = str(root)
    return env


def _is_uri(value: str) -> bool:
    return "://" in value


def _excluded(root: Path, rel: str, excludes: list[str]) -> bool:
    """Whether Ray's packaging would leave `rel` out of the uploaded working dir (same gitwildmatch rules)."""
    if not excludes:
        return False
    try:
        # The matcher Ray itself uploads with.
        from ray._private.runtime_env.packaging import _get_excludes
    except ImportError:  # a Ray that moved it: Ray's own upload still applies the excludes
        return False

    match = _get_excludes(root, excludes)
    target = root / rel
    # A file is left out when it or any folder above it matches.
    return any(match(p) for p in [target, *target.parents] if p != root and root in p.parents)


def _config_argument(config: str | None, job: str, root: Path, excludes: list[str]) -> str | None:
    """The `--config` value the driver gets: a URI as is, a local file as a path inside the working dir."""
    if config is None:
        default = root / CONFIGS_DIR / f"{job}.yaml"
        return f"{CONFIGS_DIR}/{job}.yaml" if default.is_file() else None
    if _is_uri(config) and not config.startswith("file://"):
        return config  # s3://, gs://, ...: the driver reads it with fsspec
    local = Path(config.removeprefix("file://")).expanduser()
    path = (local if local.is_absolute() else Path.cwd() / local).resolve()
    if not local.is_absolute() and not path.is_file() and (root / local).is_file():
        path = (root / local).resolve()  # relative to the working dir when it is not the current dir
    if not path.is_file():
        raise SubmitError(f"--config {config}: file not found")
    if root not in path.parents:
        raise SubmitError(
            f"--config {config} is outside the working directory {root}: only that directory is uploaded, so "
            "the cluster would not see it. Put it under the working directory or use an s3:// or gs:// URI."
        )
    rel = path.relative_to(root).as_posix()
    if _excluded(root, rel, excludes):
        raise SubmitError(f"--config {config} is excluded from the upload by {RUNTIME_ENV_FILE} (excludes)")
    return rel


def _check_output(output: str | None) -> None:
    if output is None or _is_uri(output) or Path(output).is_absolute():
        return
    raise SubmitError(
        f"--output {output} is a relative path: the driver runs in a temporary copy of the working directory "
        "that Ray deletes after the job. Use shared storage (e.g. /mnt/shared/runs/...) or an s3:// or gs:// URI."
    )


def build_entrypoint(
    job: str, *, config: str | None, smoke: bool, output: str | None, extra_args: list[str] | tuple[str, ...] = ()
) -> str:
    """The driver's shell command: `python jobs/JOB.py [--config C] [--smoke] [--output O] [extra...]`."""
    argv = ["python", f"{JOBS_DIR}/{job}.py"]
    if config is not None:
        argv += ["--config", config]
    if smoke:
        argv.append("--smoke")
    if output is not None:
        argv += ["--output", output]
    argv += list(extra_args)
    # Ray runs the entrypoint through a shell: quote every argument.
    return shlex.join(argv)


def _submission_id(job: str) -> str:
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%d-%H%M%S")
    return f"raypdm-{job}-{stamp}-{secrets.token_hex(3)}"


# ------------------------------------------------------------------------------------------ submission
def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except ConnectionError as exc:
        raise ConnectionError(
            f"cannot reach the Ray job server at {address} ({exc}). Is the tunnel up? "
            "`ray dashboard clusters/aws-gpu.yaml` (launcher clusters) or "
            "`kubectl port-forward svc/raypdm-head-svc 8265:8265` (KubeRay)"
        ) from None


def submit_job(
    job: str,
    *,
    address: str | None,
    config: str | None,
    smoke: bool,
    output: str | None,
    extra_args: list[str],
    follow: bool,
    runtime_env: dict | None = None,
    working_dir: str = ".",
    driver_cpus: float = 0.0,
    echo: Callable[[str], None] | None = None,
) -> tuple[str, str | None]:
    """Submit `jobs/JOB.py` to the Ray cluster at `address` (or RAY_ADDRESS).

    Returns (submission_id, final status) with --follow, where the status is SUCCEEDED, FAILED or STOPPED,
    and (submission_id, None) without. `echo` receives the log text while following (default: stdout).
    Raises SubmitError for a request that cannot work (unknown job, no address, a config the cluster
    would not see) before anything is uploaded, and ConnectionError when the job server is unreachable.
    """
    echo = echo or (lambda text: click.echo(text, nl=False))
    root = Path(working_dir).resolve()
    jobs = available_jobs(root)
    if job not in jobs:
        where = root / JOBS_DIR
        known = ", ".join(jobs) if jobs else f"none (no {where}/*.py: run from the repository root or pass --working-dir)"
        raise SubmitError(f"unknown job {job!r}; jobs in {where}: {known}")
    if driver_cpus < 0:
        raise SubmitError(f"--driver-cpus must be >= 0, got {driver_cpus}")
    url = resolve_address(address)
    env = load_runtime_env(root, runtime_env)
    excludes = [str(e) for e in env.get("excludes") or []]
    config_arg = _config_argument(config, job, root, excludes)
    _check_output(output)
    entrypoint = build_entrypoint(job, config=config_arg, smoke=smoke, output=output, extra_args=extra_args)

    metadata = {
        "raypdm_job": job,
        "raypdm_version": __version__,
        "config": config_arg or "",
        "output": output or "",
        "smoke": str(smoke).lower(),
        "submitted_by": _user(),
    }
    client = _client(url)
    submission_id = client.submit_job(
        entrypoint=entrypoint,
        submission_id=_submission_id(job),
        runtime_env=env,
        metadata=metadata,
        # 0 requests nothing, which keeps the driver on the head node (see the module docstring).
        entrypoint_num_cpus=driver_cpus or None,
    )
    if not follow:
        return submission_id, None
    return submission_id, _follow(client, submission_id, echo)


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry (some containers)
        return "unknown"


def _follow(client, submission_id: str, echo: Callable[[str], None], poll_s: float = 1.0) -> str:
    """Stream the driver's logs until the job ends; return its final status."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            echo(chunk)

    try:
        asyncio.run(tail())
    except Exception as exc:  # a dropped log stream must not lose the final status
        echo(f"\n[raypdm] log stream closed ({type(exc).__name__}: {exc}); waiting for the job to finish\n")
    # The stream ends when the driver exits; the job's status can lag by a moment.
    while True:
        status = str(client.get_job_status(submission_id).value)
        if status in TERMINAL_STATUSES:
            return status
        time.sleep(poll_s)


# ------------------------------------------------------------------------------------------------- CLI
def _friendly_errors(fn):
    """User-fixable problems print one message (exit 1), not a traceback."""
    try:
        from ray.exceptions import AuthenticationError
    except ImportError:  # a Ray without token authentication
        AuthenticationError = ()

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (SubmitError, ConnectionError) as exc:
            raise click.ClickException(str(exc)) from None
        except AuthenticationError as exc:
            raise click.ClickException(
                f"{exc}\nThe cluster uses token authentication: export RAY_AUTH_MODE=token and its token "
                "(RAY_AUTH_TOKEN, or the file ~/.ray/auth_token); see clusters/README.md"
            ) from None
        except RuntimeError as exc:
            # The job server's refusals (runtime env upload, duplicate id, version) arrive as RuntimeError.
            raise click.ClickException(f"the job server refused the submission: {exc}") from None

    return wrapper


@click.command("submit", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("job")
@click.argument("extra_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- EXTRA_ARGS...]")
@click.option("--address", default=None, metavar="URL",
              help="the cluster's job server, e.g. http://127.0.0.1:8265 through a tunnel [RAY_ADDRESS]")
@click.option("--config", "config_path", default=None, metavar="FILE",
              help="job config: a file under the working directory or an s3:// / gs:// URI [jobs/configs/JOB.yaml]")
@click.option("--smoke", is_flag=True, help="few steps, few images: check the plumbing on the cluster")
@click.option("--output", default=None, metavar="URI",
              help="where the job writes: shared storage (/mnt/shared/runs/...) or s3:// / gs://")
@click.option("--follow", is_flag=True, help="stream the job's logs, print its final status, exit 1 unless it succeeded")
@click.option("--working-dir", default=".", show_default=True,
              help="the checkout to upload (must hold jobs/ and jobs/runtime_env.yaml)")
@click.option("--driver-cpus", type=float, default=0.0, show_default=True,
              help="CPUs reserved for the driver; 0 keeps it on the head node, which advertises none")
@_friendly_errors
def submit_command(job, extra_args, address, config_path, smoke, output, follow, working_dir, driver_cpus) -> None:
    """Submit jobs/JOB.py to a Ray cluster (Ray job submission); print the submission id.

    Arguments after `--` go to the job unchanged, e.g. `raypdm submit redteam --smoke -- --set seed=1`.
    """
    # Submit without following first, so the id is on screen before any log line.
    submission_id, _ = submit_job(
        job, address=address, config=config_path, smoke=smoke, output=output, extra_args=list(extra_args),
        follow=False, working_dir=working_dir, driver_cpus=driver_cpus,
    )
    url = resolve_address(address)
    click.echo(f"submitted {submission_id}")
    if not follow:
        click.echo(f"  logs:   ray job logs --address {url} --follow {submission_id}")
        click.echo(f"  status: ray job status --address {url} {submission_id}")
        click.echo(f"  stop:   ray job stop --address {url} {submission_id}")
        return
    client = _client(url)
    try:
        status = _follow(client, submission_id, lambda text: click.echo(text, nl=False))
    except KeyboardInterrupt:
        click.echo(f"\nstopped following; the job keeps running (ray job stop --address {url} {submission_id})")
        sys.exit(130)
    message = ""
    if status != "SUCCEEDED":
        # Ray's message repeats the driver's last logs after its first line; those were just streamed.
        text = (getattr(client.get_job_info(submission_id), "message", None) or "").strip()
        if text:
            message = ": " + text.splitlines()[0].split(", last available logs")[0]
    click.echo(f"job {submission_id} {status}{message}")
    if status != "SUCCEEDED":
        sys.exit(1)
