"""The purification stage: any registered purifier or chain ("jpeg", "codesr", "gaussian+jpeg") over a
dataset, on Ray Data, with a resumable manifest."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from raypdm.config import JobConfig, config_hash
from raypdm.data.decode import DEFAULT_MAX_PIXELS
from raypdm.data.layout import SPLITS, validate_component
from raypdm.pipelines.stage import ImageStage, StageSummary, run_image_stage

__all__ = ["PurifyConfig", "purify_stage", "run_purify"]


class PurifyConfig(JobConfig):
    input: str = Field(description="dataset root (fsspec URI) in the <identity>/<split>/<image> layout")
    output: str = Field(description="output root (fsspec URI): images + manifest.parquet + config.yaml")
    purifier: str = Field("jpeg", description="purifier name or chain, e.g. jpeg, codesr, gaussian+jpeg")
    options: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per-purifier options")
    preset: Literal["tiny", "full"] = "tiny"
    weights_dir: str | None = None
    batch_size: int = Field(8, ge=1, le=4096)
    workers: int = Field(1, ge=1, le=10_000)
    gpus_per_worker: float = Field(1.0, ge=0, le=8)
    identities: list[str] | None = None
    splits: list[str] = Field(default_factory=lambda: list(SPLITS))
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)

    @field_validator("identities")
    @classmethod
    def _safe_identities(cls, v: list[str] | None) -> list[str] | None:
        for ident in v or []:
            validate_component(ident, "identity")
        return v

    @field_validator("splits")
    @classmethod
    def _known_splits(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if s not in SPLITS]
        if bad or not v:
            raise ValueError(f"splits must be a non-empty subset of {list(SPLITS)}, got {v}")
        return v

    @model_validator(mode="after")
    def _valid_purifier(self) -> PurifyConfig:
        # Fail before any work: unknown purifier names and bad options name the culprit.
        from raypdm.purify import parse_spec, purifier_options_model

        names = parse_spec(self.purifier)
        stray = sorted(set(self.options) - set(names))
        if stray:
            raise ValueError(f"options given for {stray}, which are not in the chain {names}")
        for name in names:
            purifier_options_model(name).model_validate(self.options.get(name, {}))
        return self


def _normalised_options(cfg: PurifyConfig) -> dict[str, Any]:
    from raypdm.purify import parse_spec, purifier_options_model

    return {
        name: purifier_options_model(name).model_validate(cfg.options.get(name, {})).model_dump(mode="json")
        for name in parse_spec(cfg.purifier)
    }


def purify_stage(cfg: PurifyConfig) -> ImageStage:
    """The ImageStage for a purify config; its hash covers everything that changes the output pixels."""
    from raypdm.purify import build_purifier, parse_spec

    names = parse_spec(cfg.purifier)
    options = _normalised_options(cfg)
    stage_config = {"stage": "purify", "purifier": names, "options": options, "preset": cfg.preset,
                    "weights_dir": cfg.weights_dir}
    spec, preset, weights_dir, opts = cfg.purifier, cfg.preset, cfg.weights_dir, cfg.options

    def make_transform():
        return build_purifier(spec, preset=preset, weights_dir=weights_dir, options=opts)

    # Build once here (cheap for classic purifiers, no weights for model ones until called) to learn
    # where it runs; model purifiers load in their actors, not in the driver.
    uses_gpu = _chain_uses_gpu(names)
    return ImageStage(
        name="+".join(names),
        config=stage_config,
        config_hash=config_hash(stage_config),
        make_transform=make_transform,
        uses_model=uses_gpu,
        uses_gpu=uses_gpu,
        workers=cfg.workers,
        gpus_per_worker=cfg.gpus_per_worker,
        batch_size=cfg.batch_size,
        max_pixels=cfg.max_pixels,
    )


# Purifiers that hold a neural network: they get actor pools (load once) and GPUs when present.
MODEL_PURIFIERS = frozenset({"codeformer", "sr"})


def _chain_uses_gpu(names: list[str]) -> bool:
    return any(n in MODEL_PURIFIERS for n in names)


def run_purify(cfg: PurifyConfig, *, progress=None) -> StageSummary:
    from raypdm.config import save_resolved_config

    stage = purify_stage(cfg)
    summary = run_image_stage(
        stage, cfg.input, cfg.output, identities=cfg.identities, splits=tuple(cfg.splits), progress=progress
    )
    save_resolved_config(cfg, cfg.output)
    return summary
