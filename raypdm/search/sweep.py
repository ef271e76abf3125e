"""`raypdm sweep`: noise-token × template × training-data search on Ray Tune, every (w, negative prompt)
evaluated inside each trial, early stopping with ASHA, results in Parquet.

    class priors (cached) ──▶ Tuner(trainable, grid/random/Optuna, ASHA) ──▶ trials write rows
        ──▶ results.parquet (every trial × identity × w × negative row, probe rows too)
        ──▶ best.json, sweep_scores.png, a terminal table

Resume: the Tuner's experiment lives at `<output>/_tune/sweep`; running the same command again calls
`Tuner.restore(..., resume_errored=True)`, so finished trials are kept and only unfinished or errored
ones run again (an interrupted trial restarts from its first step: trials do not checkpoint mid-way).
A trial that keeps failing is recorded (status "error" with its message) and the sweep finishes.
"""

from __future__ import annotations

import io
import json
import math
import time
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from raypdm.config import Identities, JobConfig, StrictModel, Uri
from raypdm.search.space import SearchSpace
from raypdm.train.dreambooth import TrainConfig
from raypdm.train.priors import ClassPriorSection
from raypdm.data.manifest import in_run_scope

__all__ = ["SweepConfig", "SweepSampling", "ASHAConfig", "run_sweep"]

EXPERIMENT = "sweep"


class SweepSampling(StrictModel):
    num_images: int = Field(4, ge=1, le=1000, description="images per (identity, w, negative) setting")
    steps: int = Field(50, ge=1, le=1000)
    size: int = Field(512, ge=8, le=2048)
    batch_size: int = Field(4, ge=1)

    @field_validator("size")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"size must be a multiple of 8, got {v}")
        return v


class ASHAConfig(StrictModel):
    grace_period: int = Field(1, ge=1, description="reports before a trial can be stopped")
    reduction_factor: float = Field(2.0, gt=1)


class SweepConfig(JobConfig):
    output: Uri = Field(description="output root: results.parquet, best.json, sweep_scores.png, trials/, _tune/")
    data: Uri | None = Field(None, description="training data (protected or purified dataset); or space.data variants")
    reference: Uri = Field(description="clean dataset root: IMS compares with each identity's set_B")
    identities: Identities = Field(None, description="comma-separated identity folder names, or all")
    preset: Literal["tiny", "full"] = "tiny"
    weights_dir: Uri | None = None
    prompt_preset: Literal["paper", "official-code"] = "paper"
    space: SearchSpace
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=1000))
    report_every: int = Field(250, ge=1, description="steps between intermediate (probe) reports for ASHA")
    probe_images: int = Field(2, ge=1, le=64, description="images sampled per intermediate report")
    sampling: SweepSampling = Field(default_factory=SweepSampling)
    sampling_prompt: str = "a photo of sks person"
    metric: Literal["ims", "q", "ims+q"] = Field("ims", description="what the search maximises")
    search: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = Field(1, ge=1, description="grid: repeats of the grid; random/optuna: trials")
    scheduler: Literal["none", "asha"] = "none"
    asha: ASHAConfig = Field(default_factory=ASHAConfig)
    gpus_per_trial: float = Field(1.0, ge=0, le=8)
    cpus_per_trial: float = Field(0.5, gt=0, description="CPU share of a trial on CPU-only clusters")
    max_concurrent: int | None = Field(None, ge=1)
    max_failures: int = Field(1, ge=0, description="retries of a failing trial before it is recorded as an error")
    class_prior: ClassPriorSection = Field(default_factory=ClassPriorSection)
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _has_data(self) -> SweepConfig:
        if not self.data and not self.space.data:
            raise ValueError("data: give the training dataset (or space.data variants)")
        if self.data and "default" in self.space.data:
            raise ValueError("space.data may not use the name 'default' together with data")
        return self

    @field_validator("weights_dir")
    @classmethod
    def _weights_need_full(cls, v, info):
        # A field validator (preset is declared before it), so the error names `weights_dir`.
        from raypdm.models.context import ModelContext

        ModelContext(preset=info.data.get("preset", "tiny"), weights_dir=v).check_weights_used()
        return v

    def data_uris(self) -> dict[str, str]:
        return {**({"default": self.data} if self.data else {}), **self.space.data}

    def metric_names(self) -> set[str]:
        return {"ims", "q"}  # both are recorded; `metric` chooses what is maximised

    def identity_list(self, data_uri: str) -> list[str]:
        from raypdm.data.layout import list_images

        refs, _ = list_images(data_uri, identities=self.identities,
                              splits=["set_A"])
        found = sorted({r.identity for r in refs if r.error is None})
        if not found:
            raise ValueError(f"no identity with set_A images under {data_uri}")
        return found


# --------------------------------------------------------------------------------------------- tune


def _trainable(config: dict[str, Any], sweep: SweepConfig, class_images: str) -> None:
    from ray import tune

    from raypdm.search.trial import run_trial

    run_trial(config, sweep, class_images, tune.report, trial_id=tune.get_context().get_trial_id())


def _tokenizer(cfg: SweepConfig):
    if cfg.preset == "tiny" or not cfg.weights_dir:
        from raypdm.models.tokenizer import tiny_clip_tokenizer

        return tiny_clip_tokenizer()
    from pathlib import Path

    from raypdm.models.stable_diffusion import load_tokenizer

    return load_tokenizer(Path(cfg.weights_dir) / "sd21-base" / "tokenizer")


def _storage(output: str) -> str:
    from raypdm.data.uri import join

    return join(output, "_tune")


def _search_alg(cfg: SweepConfig):
    from ray import tune

    if cfg.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        alg = OptunaSearch(seed=cfg.seed)  # metric and mode come from the TuneConfig
        if cfg.max_concurrent:
            alg = tune.search.ConcurrencyLimiter(alg, max_concurrent=cfg.max_concurrent)
        return alg
    return None  # grid/random: Tune's BasicVariantGenerator


def _scheduler(cfg: SweepConfig, reports_per_trial: int):
    if cfg.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="training_iteration",  # metric and mode come from the TuneConfig
                         max_t=max(reports_per_trial, cfg.asha.grace_period + 1),
                         grace_period=cfg.asha.grace_period, reduction_factor=cfg.asha.reduction_factor)


@in_run_scope
def run_sweep(cfg: SweepConfig, *, log=print) -> dict[str, Any]:
    """Run (or resume) the sweep; returns {"results": DataFrame, "best": dict, "trials": DataFrame}."""
    import ray
    from ray import tune

    from raypdm.config import save_resolved_config
    from raypdm.data.uri import join
    from raypdm.runtime import init_ray
    from raypdm.search.progress import SweepProgress, expected_trials
    from raypdm.train.priors import class_prior_cache, generate_class_images
    from raypdm.train.prompts import cdl_prompts
    from raypdm.ui import plain_counter

    init_ray()
    t0 = time.perf_counter()
    save_resolved_config(cfg, cfg.output, "sweep_config.yaml")
    data_names = sorted(cfg.data_uris())
    for name, uri in cfg.data_uris().items():
        cfg.identity_list(uri)  # fail now, in the driver, on an empty dataset
    prior = cfg.class_prior.resolve(preset=cfg.preset, weights_dir=cfg.weights_dir,
                                    prompt=cdl_prompts(cfg.prompt_preset).prior_generation_prompt(),
                                    resolution=cfg.train.resolution)
    cache = class_prior_cache(cfg.class_prior, cfg.output)
    log(f"class priors: {prior.count} images (cached under {cache})")
    class_images = generate_class_images(prior, cache, progress=plain_counter("class images", indent="      "))

    space = cfg.space.tune_space(_tokenizer(cfg), cfg.search, data_names)
    n_identities = max(len(cfg.identity_list(u)) for u in cfg.data_uris().values())
    reports = n_identities * max(0, (cfg.train.steps - 1) // cfg.report_every) + 1
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    resources = {"gpu": cfg.gpus_per_trial, "cpu": 1} if has_gpus and cfg.gpus_per_trial else {"cpu": cfg.cpus_per_trial}
    trainable = tune.with_resources(tune.with_parameters(_trainable, sweep=cfg, class_images=class_images), resources)
    storage = _storage(cfg.output)
    path = join(storage, EXPERIMENT)
    # Trial lines go to the progress stream (stderr; none under --no-progress), also when a resumed sweep's
    # restored copy of this callback reports them.
    progress = SweepProgress(expected_trials(space, cfg.search, cfg.num_samples))
    if tune.Tuner.can_restore(path):
        log(f"resuming the sweep at {path}")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True, param_space=space)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric="score", mode="max", search_alg=_search_alg(cfg), scheduler=_scheduler(cfg, reports),
                num_samples=cfg.num_samples,
                max_concurrent_trials=cfg.max_concurrent if cfg.search != "optuna" else None,
            ),
            run_config=tune.RunConfig(storage_path=storage, name=EXPERIMENT,
                                      failure_config=tune.FailureConfig(max_failures=cfg.max_failures), verbose=0,
                                      callbacks=[progress]),
        )
    grid = tuner.fit()
    trials = _trial_table(grid, reports)
    results = collect_results(cfg.output, trials)
    best = best_configuration(results)
    _write(cfg, results, trials, best)
    log(f"sweep: {len(trials)} trials ({int((trials['status'] == 'error').sum()) if len(trials) else 0} errors) "
        f"in {time.perf_counter() - t0:.1f} s")
    return {"results": results, "best": best, "trials": trials}


def _trial_table(grid, reports_per_trial: int):
    import pandas as pd

    from raypdm.search.space import noise_of
    from raypdm.search.trial import trial_key

    rows = []
    for res in grid:
        cfg = res.config or {}
        m = res.metrics or {}
        # A trial that reported carries its key; one that failed before its first report wrote no rows,
        # so its point in the space is enough to label its error row.
        try:
            token, template = noise_of(cfg)
        except (KeyError, ValueError):
            token = template = None
        key = m.get("trial") or (trial_key(cfg) if token is not None and "data" in cfg else "")
        status = "error" if res.error is not None else ("done" if m.get("final") else "stopped")
        rows.append({"trial": key, "token": token, "template": template, "data": cfg.get("data"),
                     "status": status, "score": m.get("score", math.nan), "best_w": m.get("best_w", math.nan),
                     "steps_trained": m.get("steps_trained", 0), "reports": m.get("training_iteration", 0),
                     "error": None if res.error is None else f"{type(res.error).__name__}: {res.error}"[:2000]})
    return pd.DataFrame(rows, columns=["trial", "token", "template", "data", "status", "score", "best_w",
                                       "steps_trained", "reports", "error"])


def collect_results(output: str, trials):
    """Every row the trials wrote, with `stopped_early` and `status` from the trial table."""
    import pandas as pd

    from raypdm.data.uri import fs_and_path, join
    from raypdm.search.trial import ROW_COLUMNS

    fs, root = fs_and_path(join(output, "trials"))
    frames = []
    if fs.exists(root):
        for path in sorted(fs.glob(root.rstrip("/") + "/*/part-*.parquet")):
            with fs.open(path, "rb") as f:
                frames.append(pd.read_parquet(f))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(ROW_COLUMNS))
    status = dict(zip(trials["trial"], trials["status"])) if len(trials) else {}
    df["status"] = df["trial"].map(status).fillna("stale")  # rows of trials no longer in this sweep
    df = df[df["status"] != "stale"].copy()
    df["stopped_early"] = df["status"] == "stopped"
    # A trial restarted after a failure rewrites its parts; keep one row per (trial, identity, w, neg, final, step).
    df = df.drop_duplicates(subset=["trial", "identity", "w", "negative_prompt", "final", "step"], keep="last")
    # Error rows: a failing trial is recorded even when it never wrote a row.
    errors = trials[trials["status"] == "error"] if len(trials) else trials
    extra = [{"trial": r.trial, "token": r.token, "template": r.template, "data": r.data, "final": False,
              "status": "error", "stopped_early": False, "error": r.error} for r in errors.itertuples()
             if r.trial not in set(df["trial"])]
    if extra:
        df = pd.concat([df, pd.DataFrame(extra)], ignore_index=True)
    if "error" not in df.columns:
        df["error"] = None
    return df.reset_index(drop=True)


def best_configuration(results) -> dict[str, Any]:
    """The (token, template, data, w, negative) with the highest mean score over identities, among trials
    that finished: a trial stopped early has final rows only for the identities it completed, and a mean
    over fewer identities is not comparable."""
    final = results[(results["final"] == True) & results["score"].notna()] if len(results) else results  # noqa: E712
    if "status" in final.columns:
        final = final[final["status"] == "done"]
    if not len(final):
        return {}
    keys = ["token", "template", "data", "w", "negative_prompt"]
    means = final.groupby(keys, dropna=False)[["score", "ims", "q"]].mean().reset_index()
    row = means.sort_values("score", ascending=False).iloc[0]
    return {k: (row[k].item() if hasattr(row[k], "item") else row[k]) for k in keys + ["score", "ims", "q"]}


def _write(cfg: SweepConfig, results, trials, best: dict[str, Any]) -> None:
    from raypdm.data.uri import join, write_bytes

    def parquet(df, name):
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        write_bytes(join(cfg.output, name), buf.getvalue())

    parquet(results, "results.parquet")
    parquet(trials, "trials.parquet")
    write_bytes(join(cfg.output, "best.json"), json.dumps(best, indent=2, default=float).encode())
    if len(results) and (results["final"] == True).any():  # noqa: E712
        write_bytes(join(cfg.output, "sweep_scores.png"), plot_scores(results, cfg.metric))


def plot_scores(results, metric: str) -> bytes:
    """Two panels: the best score per token (over w), and score against w per token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    final = results[results["final"] == True]  # noqa: E712
    by = final.groupby(["token", "w"])["score"].mean().reset_index()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    best = by.groupby("token")["score"].max().sort_values(ascending=False)
    a.bar(range(len(best)), best.values, color="#4477aa")
    a.set_xticks(range(len(best)), best.index, rotation=45, ha="right")
    a.set_ylabel(f"{metric} (best w)")
    a.set_title("score by noise token")
    for token, g in by.groupby("token"):
        b.plot(g["w"], g["score"], marker="o", label=str(token))
    b.set_xlabel("decoupled guidance weight w")
    b.set_ylabel(metric)
    b.set_title("score by w")
    b.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
