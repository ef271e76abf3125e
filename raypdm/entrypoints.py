"""What the thin `jobs/*.py` scripts run: read a YAML config, apply `--output`, `--set` and `--smoke`, run
the job on the Ray cluster the job was submitted to (RAY_ADDRESS; an embedded local Ray otherwise).

    python jobs/redteam.py --config jobs/configs/redteam.yaml --output s3://bucket/runs/r1
    python jobs/redteam.py --smoke --output /tmp/rt          # minutes on a CPU, tiny models

A job config may hold a top-level `smoke:` mapping: under `--smoke` it is merged over the config (that is
how each job shrinks itself). Jobs whose inputs are not given in smoke mode make a small synthetic
dataset under `<output>/_smoke_data` (and `sample` trains a 2-step tiny model first), so every smoke job
runs on a bare cluster.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from raypdm.config import ConfigError, _deep_merge, _read_yaml, parse_overrides
from raypdm.data.uri import join

__all__ = ["JOBS", "main"]

JOBS = ("purify", "protect", "finetune", "sample", "evaluate", "sweep", "bench", "redteam")


def _parse(job: str, argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"jobs/{job}.py", description=f"raypdm {job} job")
    p.add_argument("--config", help="YAML config (fsspec URI)")
    p.add_argument("--output", help="output root (fsspec URI); overrides the config")
    p.add_argument("--smoke", action="store_true", help="tiny models, few images/steps: minutes on a CPU")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p.parse_args(argv)


def _smoke_data(output: str, identities: int = 2, images: int = 2, size: int = 64) -> str:
    from raypdm.data.synthetic import make_synthetic

    data = join(output, "_smoke_data")
    make_synthetic(data, identities=identities, images=images, seed=0, size=size, real_photos=True)
    return data


def load_job_config(job: str, args: argparse.Namespace) -> dict[str, Any]:
    data: dict[str, Any] = _read_yaml(args.config) if args.config else {}
    smoke = data.pop("smoke", None) or {}
    if args.smoke and not args.config and job == "redteam":
        from raypdm.pipelines.redteam import smoke_overrides

        smoke = smoke_overrides()
    if args.smoke:
        data = _deep_merge(data, smoke)
    if args.output:
        key = "out" if job == "bench" else "output"
        data[key] = args.output
    if args.overrides:
        data = _deep_merge(data, parse_overrides(args.overrides))
    return data


def _validate(cls, data: dict[str, Any]):
    from pydantic import ValidationError

    from raypdm.config import _format_validation_error

    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, "job config")) from None


def run_job(job: str, data: dict[str, Any], smoke: bool) -> Any:
    from raypdm.ui import console, stage_summary_table

    output = data.get("output") or data.get("out")
    if not output:
        raise ConfigError("output: give --output URI (or `output:` in the config)")
    if job == "purify":
        from raypdm.pipelines.purify import PurifyConfig, run_purify

        if smoke and not data.get("input"):
            data["input"] = _smoke_data(output)
        summary = run_purify(_validate(PurifyConfig, data))
        stage_summary_table([summary], title="purify")
        return summary
    if job == "protect":
        from raypdm.pipelines.protect import ProtectJobConfig, run_protect

        if smoke and not data.get("input"):
            data["input"] = _smoke_data(output)
        summaries = run_protect(_validate(ProtectJobConfig, data))
        stage_summary_table(summaries, title="protect")
        return summaries
    if job == "finetune":
        from raypdm.pipelines.train import TrainJobConfig, run_train

        if smoke and not data.get("data"):
            data["data"] = _smoke_data(output)
        return run_train(_validate(TrainJobConfig, data), log=console.print)
    if job == "sample":
        from raypdm.pipelines.sample import SampleJobConfig, run_sample

        if smoke and not data.get("models"):
            data["models"] = _smoke_models(output)
        summary = run_sample(_validate(SampleJobConfig, data))
        stage_summary_table([summary], title="sample")
        return summary
    if job == "evaluate":
        from raypdm.pipelines.evaluate import EvaluateConfig, run_evaluate

        if smoke and not data.get("images"):
            clean = _smoke_data(output)
            data["images"] = clean
            data["reference"] = data.get("reference") or clean
        summary = run_evaluate(_validate(EvaluateConfig, data))
        stage_summary_table([summary], title="evaluate")
        return summary
    if job == "sweep":
        from raypdm.search.sweep import SweepConfig, run_sweep

        if smoke and not data.get("data") and not (data.get("space") or {}).get("data"):
            clean = _smoke_data(output)
            data["data"] = clean
            data["reference"] = data.get("reference") or clean
        from raypdm.cli import print_sweep

        cfg = _validate(SweepConfig, data)
        result = run_sweep(cfg, log=console.print)
        print_sweep(cfg, result)
        return result
    if job == "bench":
        from raypdm.bench.purifiers import PurifierBenchConfig, markdown_table, run_purifier_bench

        df = run_purifier_bench(_validate(PurifierBenchConfig, data))
        console.print(markdown_table(df))
        return df
    if job == "redteam":
        from raypdm.pipelines.redteam import RedteamConfig, run_redteam

        if smoke and not data.get("data"):
            data["data"] = _smoke_data(output, identities=1)
            data["identities"] = data.get("identities") or ["astronaut"]  # a real face: IMS means something
        result = run_redteam(_validate(RedteamConfig, data), log=console.print)
        console.print(f"report: {result['report']}")
        return result
    raise ConfigError(f"unknown job {job!r}; jobs: {', '.join(JOBS)}")


def _smoke_models(output: str) -> str:
    from raypdm.pipelines.train import TrainJobConfig, run_train

    data = _smoke_data(output, identities=1)
    models = join(output, "_smoke_models")
    cfg = TrainJobConfig(data=data, output=models, preset="tiny",
                         train={"steps": 2, "resolution": 64, "gradient_checkpointing": False},
                         distributed={"backend": "ddp", "workers": 1, "gpus_per_worker": 0},
                         class_prior={"count": 2, "steps": 2, "resolution": 64})
    run_train(cfg, log=lambda m: None)
    return models


def main(job: str, argv: list[str] | None = None) -> int:
    """Entry point of `jobs/<job>.py`: exit 0 on success, 2 on a config error, 1 on a failed job."""
    import logging

    from raypdm.runtime import init_ray

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = _parse(job, argv)
    try:
        data = load_job_config(job, args)
        init_ray()
        run_job(job, data, args.smoke)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    return 0
