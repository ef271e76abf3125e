"""`raypdm train`: DreamBooth + CDL for many identities at once.

    class priors (Ray Data actor pool, cached, shared) ──▶ Ray Tune fan-out: one trial per identity
        └─ each trial drives one Ray Train run (TorchTrainer + DeepSpeed/DDP workers) ──▶ <output>/<identity>/export

Ray Tune is the fan-out (the pattern Ray Train V2 recommends for many runs): `max_concurrent` caps how
many identities train at once, the cluster packs their workers onto its GPUs, a failing identity is
retried (`retries`) and never stops the others, and the result grid becomes a summary table and
`<output>/train_summary.parquet`. Identities whose export already exists for the same config are
skipped, so a re-run trains only what is missing.

While the fan-out runs, each identity's rank 0 streams its progress (step/total, loss, s/step, ETA) to a
progress board that the driver polls (raypdm.train.progress) and shows as one live line per identity
(`progress=True` on a terminal) or as throttled plain lines through `log`. Metrics and validation images
go to `<output>/<identity>/tensorboard/` (and W&B / MLflow with `log_to`; raypdm.train.loggers).
"""

from __future__ import annotations

import io
import json
import time
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from raypdm.config import Identities, JobConfig, Uri, config_hash
from raypdm.data.layout import list_images
from raypdm.data.uri import exists, join, read_bytes, write_bytes
from raypdm.train.distributed import DistributedConfig
from raypdm.train.dreambooth import TrainConfig
from raypdm.train.loggers import LoggerName, TrackingConfig, TrainLogging, check_backends
from raypdm.train.priors import ClassPriorConfig, ClassPriorSection
from raypdm.train.prompts import CDLPrompts, cdl_prompts
from raypdm.data.manifest import in_run_scope

__all__ = ["TrainJobConfig", "IdentityOutcome", "run_train", "run_train_many"]

DONE_FILE = "train_done.json"


class TrainJobConfig(JobConfig):
    data: Uri = Field(description="dataset root (fsspec URI); trains on each identity's set_A")
    output: Uri = Field(description="output root: <output>/<identity>/export is a diffusers pipeline")
    identities: Identities = Field(None, description="comma-separated identity folder names, or all")
    preset: Literal["tiny", "full"] = "tiny"
    weights_dir: Uri | None = None
    prompt_preset: Literal["paper", "official-code"] = "paper"
    noise_token: str | None = Field(None, description="CDL noise token (preset default: 't@j' / 'bhj')")
    cdl: bool = Field(True, description="False: vanilla DreamBooth (no noise-token suffixes)")
    train: TrainConfig = Field(default_factory=TrainConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    class_prior: ClassPriorSection = Field(default_factory=ClassPriorSection)
    max_concurrent: int | None = Field(None, ge=1, description="identities training at once (None: as fit)")
    retries: int = Field(1, ge=0, description="extra attempts for an identity whose run fails")
    log_to: list[LoggerName] = Field(
        default_factory=lambda: ["tensorboard"],
        description="where each identity's metrics and validation images go (<output>/<identity>/tensorboard)",
    )
    validation_every: int = Field(100, ge=0, description="steps between validation images (and at the end); 0: none")
    validation_images: int = Field(2, ge=0, le=16, description="images each time, drawn with the model being trained")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("log_to")
    @classmethod
    def _installed(cls, v: list[str]) -> list[str]:
        return check_backends(v)

    @field_validator("weights_dir")
    @classmethod
    def _weights_need_full(cls, v, info):
        # A field validator (preset is declared before it), so the error names `weights_dir`.
        from raypdm.models.context import ModelContext

        ModelContext(preset=info.data.get("preset", "tiny"), weights_dir=v).check_weights_used()
        return v

    @model_validator(mode="after")
    def _mlflow_store(self) -> TrainJobConfig:
        if "mlflow" in self.log_to and not self.tracking.mlflow_tracking_uri:
            from raypdm.train.loggers import default_mlflow_uri

            default_mlflow_uri(self.output)  # a cloud output without a tracking URI fails here, not on a worker
        return self

    def prompts(self) -> CDLPrompts:
        overrides: dict[str, Any] = {"cdl": self.cdl}
        if self.noise_token is not None:
            overrides["token"] = self.noise_token
        return cdl_prompts(self.prompt_preset, **overrides)

    def distributed_config(self) -> DistributedConfig:
        return self.distributed

    def class_prior_config(self) -> ClassPriorConfig:
        return self.class_prior.resolve(preset=self.preset, weights_dir=self.weights_dir,
                                        prompt=self.prompts().prior_generation_prompt(),
                                        resolution=self.train.resolution)

    def logging_config(self, label: str = "") -> TrainLogging:
        """What each identity's rank 0 logs (`label`: its name in the trackers and the display)."""
        tracking = self.tracking
        if "mlflow" in self.log_to and not tracking.mlflow_tracking_uri:
            from raypdm.train.loggers import default_mlflow_uri

            tracking = tracking.model_copy(update={"mlflow_tracking_uri": default_mlflow_uri(self.output)})
        return TrainLogging(log_to=self.log_to, validation_every=self.validation_every,
                            validation_images=self.validation_images, tracking=tracking, label=label)


class IdentityOutcome(dict):
    """One summary row: identity, status (trained / skipped / failed), steps, final_loss, seconds, export, error."""


def _identities(cfg: TrainJobConfig) -> list[str]:
    refs, _ = list_images(cfg.data, identities=cfg.identities, splits=["set_A"])
    found = sorted({r.identity for r in refs if r.error is None})
    if cfg.identities is not None:
        missing = sorted(set(cfg.identities) - set(found))
        if missing:
            raise ValueError(f"identities without set_A images under {cfg.data}: {', '.join(missing)}")
    if not found:
        raise ValueError(f"no identity with set_A images under {cfg.data}")
    return found


def _identity_trial(config: dict, board=None) -> None:
    """One Tune trial: train one identity with Ray Train and report its summary."""
    from ray import tune

    from raypdm.train.distributed import IdentityTrainJob, run_identity_training

    spec = config["spec"]
    job = IdentityTrainJob.model_validate(spec["job"])
    result = run_identity_training(job, progress=board)
    done = {"identity": job.identity, "config_hash": spec["config_hash"], "steps": result.steps,
            "final_loss": result.final_loss, "export": result.export_uri, "seconds": result.seconds}
    write_bytes(join(job.output, DONE_FILE), json.dumps(done).encode())
    tune.report({"steps": result.steps, "final_loss": result.final_loss, "seconds": result.seconds,
                 "attempts": result.attempts, "export": result.export_uri})


def _already_done(output: str, chash: str) -> dict | None:
    marker = join(output, DONE_FILE)
    if not exists(marker):
        return None
    try:
        done = json.loads(read_bytes(marker))
    except (ValueError, OSError):
        return None
    return done if done.get("config_hash") == chash and exists(done.get("export", "")) else None


def run_train(cfg: TrainJobConfig, *, log=print, progress: bool = True) -> list[IdentityOutcome]:
    """Train every chosen identity (concurrently) and return one outcome per identity.

    progress: one live line per identity on a terminal; off (or without a terminal), a plain progress line
    per identity through `log` every few seconds."""
    return run_train_many([cfg], log=log, progress=progress)[0]


def _plan(cfg: TrainJobConfig, log, progress: bool = True) -> tuple[list[IdentityOutcome], list[dict]]:
    """(outcomes settled before training: identities already done, or refused; Tune specs of the ones to
    train) for one config."""
    from raypdm.config import save_resolved_config
    from raypdm.runtime import ray_resources
    from raypdm.train.distributed import IdentityTrainJob
    from raypdm.train.priors import class_prior_cache, generate_class_images
    from raypdm.ui import plain_counter

    identities = _identities(cfg)
    prompts = cfg.prompts()
    dist = cfg.distributed_config()
    if dist.gpus_per_worker > 0 and ray_resources().get("GPU", 0) == 0:
        # A GPU request on a GPU-less cluster would wait forever; train on the CPU instead, and say so.
        log("no GPUs in the Ray cluster: training on the CPU (gpus_per_worker 0)")
        dist = dist.model_copy(update={"gpus_per_worker": 0.0})
    _say_optimizer(cfg.train, dist, log)
    prior_cfg = cfg.class_prior_config()
    logs = cfg.logging_config()
    if "mlflow" in logs.log_to:
        from raypdm.train.loggers import prepare_mlflow_experiment

        # Once, here: concurrent workers would race to create it (and a bad URI fails before training).
        prepare_mlflow_experiment(logs.tracking.mlflow_tracking_uri, logs.tracking.mlflow_experiment)
    save_resolved_config(cfg, cfg.output, "train_config.yaml")

    log(f"class priors: {prior_cfg.count} images of {prior_cfg.prompt!r} (cached, shared by every identity)")
    class_images = generate_class_images(prior_cfg, class_prior_cache(cfg.class_prior, cfg.output),
                                         progress=plain_counter("class images", indent="      ") if progress else None)

    from raypdm.data.roots import OutsideRootError, check_inside

    # Tune's bookkeeping is written from the trials' processes: its folder must not lead out of the root.
    check_inside(cfg.output, join(_local_storage(cfg.output), "_"))
    done_outcomes: list[IdentityOutcome] = []
    jobs = []
    for ident in identities:
        try:
            # The workers write the identity's checkpoints and export: a folder symlink planted at
            # <output>/<identity> would carry them outside the root. That identity fails; the others train.
            check_inside(cfg.output, join(cfg.output, ident, "export"))
        except OutsideRootError as exc:
            done_outcomes.append(IdentityOutcome(identity=ident, status="failed", steps=0, final_loss=float("nan"),
                                                 seconds=0.0, export=None, error=f"OutsideRootError: {exc}"))
            continue
        job = IdentityTrainJob(identity=ident, data=cfg.data, output=join(cfg.output, ident), class_images=class_images,
                               preset=cfg.preset, weights_dir=cfg.weights_dir, train=cfg.train, prompts=prompts,
                               distributed=dist, logs=logs)
        # What makes this identity's model: everything but where it is written and what is logged.
        chash = config_hash({**job.model_dump(mode="json", exclude={"output", "class_images", "logs"}),
                             "class_prior": prior_cfg.model_dump(mode="json")})
        done = _already_done(job.output, chash)
        if done:
            done_outcomes.append(IdentityOutcome(identity=ident, status="skipped", steps=done["steps"],
                                                 final_loss=done["final_loss"], seconds=0.0, export=done["export"],
                                                 error=None))
            continue
        jobs.append({"job": job.model_dump(mode="json"), "config_hash": chash})
    return done_outcomes, jobs


def _say_optimizer(train: TrainConfig, dist, log) -> None:
    """The driver says when the paper's 8-bit AdamW cannot be used (the workers' own logs are not shown)."""
    if train.optimizer != "adamw8bit":
        return
    from raypdm.train.distributed import deepspeed_optimizer
    from raypdm.train.dreambooth import _bitsandbytes_available

    import torch

    # What the workers will see: a CUDA device when they ask for GPUs (the driver may have none itself).
    device = torch.device("cuda" if dist.use_gpu else "cpu")
    if dist.backend == "deepspeed":
        _, note = deepspeed_optimizer(train, dist, device)
    elif not dist.use_gpu or not _bitsandbytes_available():
        note = "optimizer adamw8bit needs a CUDA device and bitsandbytes (pip install 'raypdm[gpu]')"
    else:
        note = None
    if note:
        log(note)


def _labels(jobs: list[dict]) -> list[str]:
    """Short unique names for the runs: their output paths without the part they all share
    (`id000`, or `none/cdl/seed0/astronaut` across the cells of a red-team matrix)."""
    parts = [job["job"]["output"].rstrip("/").split("/") for job in jobs]
    common = 0
    while len(parts) > 1 and all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    if len(parts) == 1:
        common = len(parts[0]) - 1
    return ["/".join(p[common:]) for p in parts]


@in_run_scope
def run_train_many(cfgs: list[TrainJobConfig], *, max_concurrent: int | None = None,
                   log=print, progress: bool = True) -> list[list[IdentityOutcome]]:
    """Train the identities of several configs (e.g. the cells of a red-team matrix) in ONE Ray Tune
    fan-out, so they all share the cluster at once; returns the outcomes per config, in order."""
    from ray import tune

    from raypdm.runtime import init_ray
    from raypdm.train.progress import follow, start_board
    from raypdm.ui import TrainProgressView

    init_ray()
    t0 = time.perf_counter()
    said: set[str] = set()

    def once(message: str) -> None:  # the cells of a matrix share their class priors and notes: say each once
        if message not in said:
            said.add(message)
            log(message)

    planned = [_plan(cfg, once, progress) for cfg in cfgs]
    outcomes: list[list[IdentityOutcome]] = [list(done) for done, _ in planned]
    jobs = []
    for k, (_, specs) in enumerate(planned):
        jobs += [{**spec, "cell": k} for spec in specs]
    for job, label in zip(jobs, _labels(jobs)):
        job["job"]["logs"]["label"] = label
    if jobs:
        limit = max_concurrent or (cfgs[0].max_concurrent if len(cfgs) == 1 else None) or len(jobs)
        workers = int(jobs[0]["job"].get("distributed", {}).get("workers", 1))
        log(f"training {len(jobs)} identities ({sum(o['status'] == 'skipped' for outs in outcomes for o in outs)} "
            "already done), "
            f"{workers} worker(s) each, at most {limit} at once")
        board = start_board()
        tuner = tune.Tuner(
            # The trial itself only drives a TorchTrainer; its workers ask for the real resources.
            tune.with_resources(tune.with_parameters(_identity_trial, board=board), {"cpu": 0.01}),
            param_space={"spec": tune.grid_search(jobs)},
            tune_config=tune.TuneConfig(max_concurrent_trials=limit),
            run_config=tune.RunConfig(
                storage_path=_local_storage(cfgs[0].output),
                name=f"train-{time.strftime('%Y%m%d-%H%M%S')}",
                failure_config=tune.FailureConfig(max_failures=max(c.retries for c in cfgs)),
                verbose=0,
            ),
        )
        # Progress on stderr (live on a terminal, a line per 10% otherwise, none with `progress=False`);
        # `log` keeps the run's own messages.
        view = TrainProgressView([j["job"]["logs"]["label"] for j in jobs],
                                 {j["job"]["logs"]["label"]: j["job"]["train"]["steps"] for j in jobs},
                                 enabled=progress)
        try:
            with view, follow(board, view.update):
                grid = tuner.fit()
        finally:
            _stop(board)
        for res in grid:
            spec = res.config["spec"]
            ident, k = spec["job"]["identity"], spec["cell"]
            if res.error is None and res.metrics:
                m = res.metrics
                outcomes[k].append(IdentityOutcome(identity=ident, status="trained", steps=m["steps"],
                                                   final_loss=m["final_loss"], seconds=m["seconds"],
                                                   export=m["export"], error=None))
            else:
                outcomes[k].append(IdentityOutcome(identity=ident, status="failed", steps=0,
                                                   final_loss=float("nan"), seconds=0.0, export=None,
                                                   error=_short(res.error)))
    for cfg, outs in zip(cfgs, outcomes):
        outs.sort(key=lambda o: o["identity"])
        _write_summary(cfg.output, outs)
    flat = [o for outs in outcomes for o in outs]
    log(f"train: {sum(o['status'] == 'trained' for o in flat)} trained, "
        f"{sum(o['status'] == 'skipped' for o in flat)} skipped, {sum(o['status'] == 'failed' for o in flat)} "
        f"failed in {time.perf_counter() - t0:.1f} s")
    return outcomes


def _stop(board) -> None:
    import ray

    try:
        ray.kill(board)
    except Exception:  # already gone with the cluster
        pass


def _short(error: BaseException | None) -> str:
    text = f"{type(error).__name__}: {error}" if error else "no result reported"
    return text if len(text) < 2000 else text[:2000] + "…"


def _local_storage(output: str) -> str:
    """Tune's own trial bookkeeping goes beside the outputs (a local path or a cloud URI)."""
    return join(output, "_tune")


def _write_summary(output: str, outcomes: list[IdentityOutcome]) -> None:
    import pandas as pd

    buf = io.BytesIO()
    pd.DataFrame([dict(o) for o in outcomes]).to_parquet(buf, index=False)
    write_bytes(join(output, "train_summary.parquet"), buf.getvalue())
