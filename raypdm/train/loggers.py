"""Where a training run's metrics and validation images go: TensorBoard (default), W&B, MLflow.

    logging = TrainLogging(log_to=["tensorboard", "mlflow"], validation_every=100,
                           tracking=TrackingConfig(mlflow_tracking_uri="sqlite:////runs/mlflow.db"))
    with open_loggers(logging, output="/runs/models/id000", label="id000", config={...}) as loggers:
        loggers.scalars(step, {"train/loss": 0.12, "train/lr": 5e-7, "train/s_per_step": 0.4})
        loggers.images(step, "validation", [uint8 HWC arrays], caption="a photo of sks person ...")

Rank 0 of each identity's Ray Train run writes them (`raypdm.train.distributed`):
    <output>/tensorboard/        TensorBoard event files (`tensorboard --logdir <output root>` shows every
                                 identity side by side); on a cloud URI written locally, copied at each
                                 checkpoint and at the end
    W&B                          one run per identity (project `tracking.wandb_project`, name = identity);
                                 `tracking.wandb_mode` / WANDB_MODE picks online, offline or disabled
    MLflow                       one run per identity and attempt in experiment `tracking.mlflow_experiment`
                                 at `tracking.mlflow_tracking_uri` (the job resolves it before Ray starts)

Asking for a backend whose package is not installed is a config error that names the package
(`check_backends`, called by the job config's validator), not a failure on a worker an hour later.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from raypdm.config import StrictModel

__all__ = [
    "BACKENDS",
    "LoggerName",
    "TrackingConfig",
    "TrainLogging",
    "TrainLoggers",
    "check_backends",
    "open_loggers",
    "default_mlflow_uri",
    "prepare_mlflow_experiment",
]

LoggerName = Literal["tensorboard", "wandb", "mlflow"]
# backend -> (import name, what to install): wandb and mlflow are optional (the `tracking` extra).
BACKENDS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "pip install 'tensorboard>=2.16,<3'"),
    "wandb": ("wandb", "pip install 'wandb>=0.19,<1'  (or: pip install 'raypdm[tracking]')"),
    "mlflow": ("mlflow", "pip install 'mlflow-skinny>=2.14,<4'  (or: pip install 'raypdm[tracking]')"),
}
TENSORBOARD_DIR = "tensorboard"


class TrackingConfig(StrictModel):
    """Settings of the optional trackers and of the validation images (used only when asked for)."""

    wandb_project: str = Field("raypdm", min_length=1, description="W&B project of the runs")
    wandb_mode: Literal["online", "offline", "disabled"] | None = Field(
        None, description="None: W&B's own choice (WANDB_MODE, `wandb login`); offline writes under <output>/wandb"
    )
    mlflow_tracking_uri: str | None = Field(
        None, description="None: MLFLOW_TRACKING_URI, else sqlite:///<output root>/mlflow.db for a local output"
    )
    mlflow_experiment: str = Field("raypdm-train", min_length=1)
    validation_steps: int = Field(10, ge=1, le=200, description="denoising steps of each validation image")
    validation_w: float = Field(7.5, ge=0, description="decoupled guidance w of the validation images (Eq. 6)")


class TrainLogging(StrictModel):
    """What one identity's run logs, and where; travels to the Ray Train workers with the job."""

    log_to: list[LoggerName] = Field(default_factory=lambda: ["tensorboard"])
    validation_every: int = Field(100, ge=0, description="steps between validation images (and at the end); 0: none")
    validation_images: int = Field(2, ge=0, le=16, description="validation images each time")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    label: str = Field("", description="the run's name in the trackers and the progress display")

    def wants_images(self, step: int, total: int) -> bool:
        if not self.validation_every or not self.validation_images:
            return False
        return step % self.validation_every == 0 or step == total


def check_backends(names: Sequence[str]) -> list[str]:
    """`names` without repeats; a ValueError naming the package (and how to install it) for any backend
    whose package does not import here."""
    names = list(dict.fromkeys(names))
    for name in names:
        if name not in BACKENDS:
            raise ValueError(f"unknown logger {name!r}; choose from {', '.join(BACKENDS)}")
        module, install = BACKENDS[name]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"logging to {name} needs the {module} package, which is not installed: {install}")
    return names


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _local_path(uri: str) -> Path:
    return Path(uri[len("file://") :] if uri.startswith("file://") else uri)


def default_mlflow_uri(output_root: str) -> str:
    """MLFLOW_TRACKING_URI when set, else a SQLite store beside the job's outputs (MLflow 3 refuses a bare
    `file:` store unless MLFLOW_ALLOW_FILE_STORE=true); a cloud output needs an explicit tracking URI."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if not _is_local(output_root):
        raise ValueError(
            f"tracking.mlflow_tracking_uri: output {output_root!r} is not a local folder; give an MLflow server "
            "or database URI (or set MLFLOW_TRACKING_URI)"
        )
    return f"sqlite:///{_local_path(output_root).resolve() / 'mlflow.db'}"


def _local_artifact_root(tracking_uri: str) -> str | None:
    """Artifacts of a SQLite store go beside it (MLflow would use the worker's working directory); a file
    store keeps them inside itself and a server decides for itself."""
    if tracking_uri.startswith("sqlite:///"):
        return str(Path(tracking_uri[len("sqlite:///") :]).parent / "mlartifacts")
    return None


def prepare_mlflow_experiment(tracking_uri: str, name: str) -> str:
    """Create the experiment once, in the driver (concurrent workers would race to create it); returns its id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    root = _local_artifact_root(tracking_uri)
    return client.create_experiment(name, artifact_location=Path(root).as_uri() if root else None)


# --------------------------------------------------------------------------- the backends


class _TensorBoard:
    def __init__(self, output: str):
        from torch.utils.tensorboard import SummaryWriter

        self.target = output.rstrip("/") + "/" + TENSORBOARD_DIR
        # Event files are appended to as training runs: a cloud target gets a local folder copied to it.
        self.staging = None if _is_local(output) else Path(tempfile.mkdtemp(prefix="raypdm-tb-"))
        logdir = self.staging or _local_path(self.target)
        self.writer = SummaryWriter(log_dir=str(logdir), flush_secs=10)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def images(self, step: int, tag: str, images: list[np.ndarray], caption: str) -> None:
        self.writer.add_images(tag, np.stack(images), step, dataformats="NHWC")
        self.writer.add_text(f"{tag}/prompt", caption, step)

    def sync(self) -> None:
        self.writer.flush()
        if self.staging is None:
            return
        from raypdm.data.uri import join, write_bytes

        for file in sorted(p for p in self.staging.rglob("*") if p.is_file()):
            write_bytes(join(self.target, *file.relative_to(self.staging).parts), file.read_bytes())

    def close(self) -> None:
        self.sync()
        self.writer.close()
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)


class _WandB:
    def __init__(self, output: str, label: str, tracking: TrackingConfig, config: dict[str, Any]):
        import wandb

        self.wandb = wandb
        self.staging = None if _is_local(output) else Path(tempfile.mkdtemp(prefix="raypdm-wandb-"))
        folder = self.staging or _local_path(output)
        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=tracking.wandb_project, name=label, group=config.get("group"), dir=str(folder),
            mode=tracking.wandb_mode, config=config, settings=wandb.Settings(silent=True, console="off"),
        )  # fmt: skip

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def images(self, step: int, tag: str, images: list[np.ndarray], caption: str) -> None:
        self.run.log({tag: [self.wandb.Image(im, caption=caption) for im in images]}, step=step)

    def sync(self) -> None:
        pass  # W&B streams (online) or keeps its own offline file

    def close(self) -> None:
        self.run.finish()
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)


class _MLflow:
    def __init__(self, label: str, tracking: TrackingConfig, config: dict[str, Any]):
        from mlflow.tracking import MlflowClient

        if not tracking.mlflow_tracking_uri:
            raise ValueError("tracking.mlflow_tracking_uri is not resolved (the train job sets it before Ray starts)")
        self.client = MlflowClient(tracking.mlflow_tracking_uri)
        experiment = prepare_mlflow_experiment(tracking.mlflow_tracking_uri, tracking.mlflow_experiment)
        tags = {"raypdm.identity": str(config.get("identity", label)), "raypdm.output": str(config.get("output", ""))}
        self.run_id = self.client.create_run(experiment, run_name=label, tags=tags).info.run_id
        params = {k: v for k, v in _flat(config).items() if k not in ("identity", "output")}
        for keys in _chunks(list(params), 100):  # MLflow's batch limit
            from mlflow.entities import Param

            self.client.log_batch(self.run_id, params=[Param(k, str(params[k])[:500]) for k in keys])

    def scalars(self, step: int, values: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k.replace("/", "."), float(v), now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def images(self, step: int, tag: str, images: list[np.ndarray], caption: str) -> None:
        for i, image in enumerate(images):
            self.client.log_image(self.run_id, image, key=f"{tag}_{i}", step=step)

    def sync(self) -> None:
        pass

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class TrainLoggers:
    """Every chosen backend behind one small interface (a run with `log_to: []` logs nothing)."""

    def __init__(self, backends: list[Any]):
        self.backends = backends

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for b in self.backends:
            b.scalars(step, values)

    def images(self, step: int, tag: str, images: list[np.ndarray], caption: str = "") -> None:
        if images:
            for b in self.backends:
                b.images(step, tag, images, caption)

    def sync(self) -> None:
        for b in self.backends:
            b.sync()

    def close(self) -> None:
        for b in self.backends:
            b.close()


@contextlib.contextmanager
def open_loggers(logging: TrainLogging | None, *, output: str, label: str, config: dict[str, Any]) -> Iterator[TrainLoggers]:
    """The run's loggers (none when `logging` is None: the other ranks), closed (and copied) on exit."""
    backends: list[Any] = []
    try:
        for name in logging.log_to if logging is not None else ():
            if name == "tensorboard":
                backends.append(_TensorBoard(output))
            elif name == "wandb":
                backends.append(_WandB(output, label, logging.tracking, config))
            else:
                backends.append(_MLflow(label, logging.tracking, config))
        loggers = TrainLoggers(backends)
        yield loggers
    finally:
        for b in backends:
            with contextlib.suppress(Exception):  # a tracker failing to close must not hide the run's own error
                b.close()
