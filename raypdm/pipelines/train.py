"""`raypdm train`: DreamBooth + CDL for many identities at once.

    class priors (Ray Data actor pool, cached, shared) ──▶ Ray Tune fan-out: one trial per identity
        └─ each trial drives one Ray Train run (TorchTrainer + DeepSpeed/DDP workers) ──▶ <output>/<identity>/export

Ray Tune is the fan-out (the pattern Ray Train V2 recommends for many runs): `max_concurrent` caps how
many identities train at once, the cluster packs their workers onto its GPUs, a failing identity is
retried (`retries`) and never stops the others, and the result grid becomes a summary table and
`<output>/train_summary.parquet`. Identities whose export already exists for the same config are
skipped, so a re-run trains only what is missing.
"""

from __future__ import annotations

import io
import json
import time
from typing import Any, Literal

from pydantic import Field, field_validator

from raypdm.config import JobConfig, config_hash
from raypdm.data.layout import list_images, validate_component
from raypdm.data.uri import exists, join, read_bytes, write_bytes
from raypdm.train.dreambooth import TrainConfig
from raypdm.train.prompts import CDLPrompts, cdl_prompts

__all__ = ["TrainJobConfig", "IdentityOutcome", "run_train", "run_train_many"]

DONE_FILE = "train_done.json"


class TrainJobConfig(JobConfig):
    data: str = Field(description="dataset root (fsspec URI); trains on each identity's set_A")
    output: str = Field(description="output root: <output>/<identity>/export is a diffusers pipeline")
    identities: list[str] | Literal["all"] = "all"
    preset: Literal["tiny", "full"] = "tiny"
    weights_dir: str | None = None
    prompt_preset: Literal["paper", "official-code"] = "paper"
    noise_token: str | None = Field(None, description="CDL noise token (preset default: 't@j' / 'bhj')")
    cdl: bool = Field(True, description="False: vanilla DreamBooth (no noise-token suffixes)")
    train: TrainConfig = Field(default_factory=TrainConfig)
    distributed: dict[str, Any] = Field(default_factory=dict, description="DistributedConfig fields")
    class_prior: dict[str, Any] = Field(default_factory=dict, description="ClassPriorConfig fields")
    max_concurrent: int | None = Field(None, ge=1, description="identities training at once (None: as fit)")
    retries: int = Field(1, ge=0, description="extra attempts for an identity whose run fails")

    @field_validator("identities")
    @classmethod
    def _safe(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("give at least one identity, or 'all'")
            for ident in v:
                validate_component(ident, "identity")
        return v

    def prompts(self) -> CDLPrompts:
        overrides: dict[str, Any] = {"cdl": self.cdl}
        if self.noise_token is not None:
            overrides["token"] = self.noise_token
        return cdl_prompts(self.prompt_preset, **overrides)

    def distributed_config(self):
        from raypdm.train.distributed import DistributedConfig

        return DistributedConfig.model_validate(self.distributed)

    def class_prior_config(self):
        from raypdm.train.priors import ClassPriorConfig

        fields = {"preset": self.preset, "weights_dir": self.weights_dir, **self.class_prior}
        fields.setdefault("prompt", self.prompts().prior_generation_prompt())
        return ClassPriorConfig.model_validate(fields)


class IdentityOutcome(dict):
    """One summary row: identity, status (trained / skipped / failed), steps, final_loss, seconds, export, error."""


def _identities(cfg: TrainJobConfig) -> list[str]:
    refs, _ = list_images(cfg.data, identities=None if cfg.identities == "all" else cfg.identities, splits=["set_A"])
    found = sorted({r.identity for r in refs if r.error is None})
    if cfg.identities != "all":
        missing = sorted(set(cfg.identities) - set(found))
        if missing:
            raise ValueError(f"identities without set_A images under {cfg.data}: {', '.join(missing)}")
    if not found:
        raise ValueError(f"no identity with set_A images under {cfg.data}")
    return found


def _identity_trial(config: dict) -> None:
    """One Tune trial: train one identity with Ray Train and report its summary."""
    from ray import tune

    from raypdm.train.distributed import IdentityTrainJob, run_identity_training

    spec = config["spec"]
    job = IdentityTrainJob.model_validate(spec["job"])
    result = run_identity_training(job)
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


def run_train(cfg: TrainJobConfig, *, log=print) -> list[IdentityOutcome]:
    """Train every chosen identity (concurrently) and return one outcome per identity."""
    return run_train_many([cfg], log=log)[0]


def _plan(cfg: TrainJobConfig, log) -> tuple[list[IdentityOutcome], list[dict]]:
    """(outcomes of identities already done, Tune specs of the ones to train) for one config."""
    from raypdm.config import save_resolved_config
    from raypdm.runtime import ray_resources
    from raypdm.train.distributed import IdentityTrainJob
    from raypdm.train.priors import generate_class_images

    identities = _identities(cfg)
    prompts = cfg.prompts()
    dist = cfg.distributed_config()
    if dist.gpus_per_worker > 0 and ray_resources().get("GPU", 0) == 0:
        # A GPU request on a GPU-less cluster would wait forever; train on the CPU instead, and say so.
        log("no GPUs in the Ray cluster: training on the CPU (gpus_per_worker 0)")
        dist = dist.model_copy(update={"gpus_per_worker": 0.0})
    prior_cfg = cfg.class_prior_config()
    save_resolved_config(cfg, cfg.output, "train_config.yaml")

    log(f"class priors: {prior_cfg.count} images of {prior_cfg.prompt!r} (cached, shared by every identity)")
    class_images = generate_class_images(prior_cfg, join(cfg.output, "_class_priors"))

    done_outcomes: list[IdentityOutcome] = []
    jobs = []
    for ident in identities:
        job = IdentityTrainJob(identity=ident, data=cfg.data, output=join(cfg.output, ident), class_images=class_images,
                               preset=cfg.preset, weights_dir=cfg.weights_dir, train=cfg.train, prompts=prompts,
                               distributed=dist)
        # What makes this identity's model: everything but where it is written.
        chash = config_hash({**job.model_dump(mode="json", exclude={"output", "class_images"}),
                             "class_prior": prior_cfg.model_dump(mode="json")})
        done = _already_done(job.output, chash)
        if done:
            done_outcomes.append(IdentityOutcome(identity=ident, status="skipped", steps=done["steps"],
                                                 final_loss=done["final_loss"], seconds=0.0, export=done["export"],
                                                 error=None))
            continue
        jobs.append({"job": job.model_dump(mode="json"), "config_hash": chash})
    return done_outcomes, jobs


def run_train_many(cfgs: list[TrainJobConfig], *, max_concurrent: int | None = None,
                   log=print) -> list[list[IdentityOutcome]]:
    """Train the identities of several configs (e.g. the cells of a red-team matrix) in ONE Ray Tune
    fan-out, so they all share the cluster at once; returns the outcomes per config, in order."""
    from ray import tune

    from raypdm.runtime import init_ray

    init_ray()
    t0 = time.perf_counter()
    planned = [_plan(cfg, log) for cfg in cfgs]
    outcomes: list[list[IdentityOutcome]] = [list(done) for done, _ in planned]
    jobs = []
    for k, (_, specs) in enumerate(planned):
        jobs += [{**spec, "cell": k} for spec in specs]
    if jobs:
        limit = max_concurrent or (cfgs[0].max_concurrent if len(cfgs) == 1 else None) or len(jobs)
        workers = int(jobs[0]["job"].get("distributed", {}).get("workers", 1))
        log(f"training {len(jobs)} identities ({sum(len(o) for o in outcomes)} already done), "
            f"{workers} worker(s) each, at most {limit} at once")
        tuner = tune.Tuner(
            # The trial itself only drives a TorchTrainer; its workers ask for the real resources.
            tune.with_resources(_identity_trial, {"cpu": 0.01}),
            param_space={"spec": tune.grid_search(jobs)},
            tune_config=tune.TuneConfig(max_concurrent_trials=limit),
            run_config=tune.RunConfig(
                storage_path=_local_storage(cfgs[0].output),
                name=f"train-{time.strftime('%Y%m%d-%H%M%S')}",
                failure_config=tune.FailureConfig(max_failures=max(c.retries for c in cfgs)),
                verbose=0,
            ),
        )
        grid = tuner.fit()
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
