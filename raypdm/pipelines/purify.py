"""The purification stage: any registered purifier or chain ("jpeg", "codesr", "gaussian+jpeg") over a
dataset, on Ray Data, with a resumable manifest."""

from __future__ import annotations

import functools
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from raypdm.config import Identities, JobConfig, Uri, config_hash, validate_section
from raypdm.data.decode import DEFAULT_MAX_PIXELS
from raypdm.data.layout import SPLITS
from raypdm.pipelines.stage import ImageStage, StageSummary, run_image_stage
from raypdm.data.manifest import in_run_scope

__all__ = ["PurifyConfig", "purify_stage", "run_purify"]


class PurifyConfig(JobConfig):
    input: Uri = Field(description="dataset root (fsspec URI) in the <identity>/<split>/<image> layout")
    output: Uri = Field(description="output root (fsspec URI): images + manifest.parquet + config.yaml")
    purifier: str = Field("jpeg", description="purifier name or chain, e.g. jpeg, codesr, gaussian+jpeg")
    options: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per-purifier options")
    preset: Literal["tiny", "full"] = "tiny"
    weights_dir: Uri | None = None
    batch_size: int = Field(8, ge=1, le=4096)
    workers: int = Field(1, ge=1, le=10_000)
    gpus_per_worker: float = Field(1.0, ge=0, le=8)
    identities: Identities = Field(None, description="comma-separated identity folder names, or all")
    splits: list[str] = Field(default_factory=lambda: list(SPLITS))
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)
    reference: Uri | None = Field(None, description="clean dataset root: faithfulness vs the clean image too")
    faithfulness: bool = Field(True, description="LPIPS/SSIM/MS-SSIM/PSNR per image vs input (and reference)")
    lpips_backbone: Literal["pretrained", "random"] = Field(
        "pretrained", description="'random' needs no download but its LPIPS values only suit tests/smoke runs"
    )
    chain_layout: Literal["fused", "pools"] = Field(
        "fused", description="chains of model purifiers: one actor runs the whole chain, or one pool per model"
    )
    verify: Literal["size", "full"] = Field(
        "size", description="how a re-run checks finished outputs: size (a listing) or full (sha256 of every file)"
    )
    follow_symlinks: bool = Field(
        False, description="read input files and folders that are symlinks leading outside the input root"
    )

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
            validate_section(purifier_options_model(name), self.options.get(name, {}), "options", name)
        return self


def _normalised_options(cfg: PurifyConfig) -> dict[str, Any]:
    from raypdm.purify import parse_spec, purifier_options_model

    return {
        name: purifier_options_model(name).model_validate(cfg.options.get(name, {})).model_dump(mode="json")
        for name in parse_spec(cfg.purifier)
    }


def purify_stage(cfg: PurifyConfig) -> ImageStage:
    """The ImageStage for a purify config; its hash covers everything that changes the output pixels."""
    from raypdm.purify import parse_spec

    names = parse_spec(cfg.purifier)
    options = _normalised_options(cfg)
    stage_config = {"stage": "purify", "purifier": names, "options": options, "preset": cfg.preset,
                    "weights_dir": cfg.weights_dir, "faithfulness": cfg.faithfulness and cfg.lpips_backbone,
                    "reference": cfg.reference}
    preset, weights_dir, opts = cfg.preset, cfg.weights_dir, cfg.options
    if cfg.chain_layout == "pools" and len(names) > 1:
        makers = [_maker(n, preset, weights_dir, {n: opts[n]} if n in opts else {}) for n in names]
    else:
        makers = _maker(cfg.purifier, preset, weights_dir, opts)
    scorer = None
    if cfg.faithfulness:
        if cfg.lpips_backbone == "pretrained":
            # In the driver, before any work (the CLI's pre-flight says it earlier; this covers the Python API).
            from raypdm.models.preflight import check_models

            check_models([], cfg.weights_dir, lpips=["alex"])
        scorer = functools.partial(FaithfulnessColumns, cfg.reference, cfg.lpips_backbone == "pretrained",
                                   cfg.weights_dir)

    # Model purifiers load in their actors, never in the driver: only the names decide placement.
    uses_gpu = _chain_uses_gpu(names)
    return ImageStage(
        name="+".join(names),
        config=stage_config,
        config_hash=config_hash(stage_config),
        make_transform=makers,
        make_scorer=scorer,
        uses_model=uses_gpu,
        uses_gpu=uses_gpu,
        workers=cfg.workers,
        gpus_per_worker=cfg.gpus_per_worker,
        batch_size=cfg.batch_size,
        max_pixels=cfg.max_pixels,
    )


def _maker(spec: str, preset: str, weights_dir: str | None, options: dict):
    from raypdm.purify import build_purifier

    return functools.partial(build_purifier, spec, preset=preset, weights_dir=weights_dir, options=options)


class FaithfulnessColumns:
    """Per-row faithfulness of the purified image: vs the purifier's input (`lpips`, `ssim`, `ms_ssim`,
    `psnr`) and, with a reference dataset, vs the clean image at the same identity/split/name
    (`ref_lpips`, ...). Images under 32 px per side, or without a readable reference, get NaN."""

    def __init__(self, reference: str | None, lpips_pretrained: bool, weights_dir: str | None = None,
                 with_lpips: bool = True):
        from raypdm.metrics.faithfulness import FaithfulnessScorer

        self.reference = reference
        self.scorer = FaithfulnessScorer(lpips_pretrained=lpips_pretrained, weights_dir=weights_dir,
                                         with_lpips=with_lpips)

    def _reference_image(self, row: dict[str, str]):
        import posixpath

        from raypdm.data.decode import decode_image
        from raypdm.data.uri import fs_and_path, join, read_bytes

        folder = join(self.reference, row["identity"], row["split"])
        exact = join(folder, row["name"])
        fs, path = fs_and_path(exact)
        try:
            if not fs.exists(path):
                stem = posixpath.splitext(row["name"])[0]
                fs_dir, dir_path = fs_and_path(folder)
                matches = [p for p in fs_dir.ls(dir_path, detail=False) if posixpath.splitext(posixpath.basename(p))[0] == stem]
                if len(matches) != 1:
                    return None
                return decode_image(fs_dir.cat_file(matches[0]))
            return decode_image(read_bytes(exact))
        except Exception:
            return None

    def reference_scores(self, images, rows) -> list[dict[str, float]]:
        """Faithfulness of each image to the clean image at its identity/split/name ({} where none)."""
        from raypdm.metrics.faithfulness import MIN_SIDE

        out: list[dict[str, float]] = [{} for _ in images]
        if not self.reference:
            return out
        refs = [self._reference_image(row) if min(im.shape[:2]) >= MIN_SIDE else None for im, row in zip(images, rows)]
        have = [i for i, r in enumerate(refs) if r is not None and min(r.shape[:2]) >= MIN_SIDE]
        if have:
            for i, s in zip(have, self.scorer.score([images[i] for i in have], [refs[i] for i in have])):
                out[i] = s
        return out

    def __call__(self, inputs, outputs, rows):
        from raypdm.metrics.faithfulness import MIN_SIDE

        n = len(outputs)
        cols: list[dict[str, float]] = [{} for _ in range(n)]
        big = [i for i in range(n) if min(outputs[i].shape[:2]) >= MIN_SIDE and min(inputs[i].shape[:2]) >= MIN_SIDE]
        if big:
            for i, s in zip(big, self.scorer.score([outputs[i] for i in big], [inputs[i] for i in big])):
                cols[i].update(s)
        if self.reference:
            for i, s in zip(big, self.reference_scores([outputs[i] for i in big], [rows[i] for i in big])):
                cols[i].update({f"ref_{k}": v for k, v in s.items()})
        names = ["lpips", "ssim", "ms_ssim", "psnr"] + (["ref_lpips", "ref_ssim", "ref_ms_ssim", "ref_psnr"] if self.reference else [])
        return [{k: c.get(k, float("nan")) for k in names} for c in cols]


def _chain_uses_gpu(names: list[str]) -> bool:
    """Purifiers that hold a neural network (`uses_gpu`) get actor pools (load once) and GPUs when present."""
    from raypdm.purify import purifier_uses_gpu

    return any(purifier_uses_gpu(n) for n in names)


@in_run_scope
def run_purify(cfg: PurifyConfig, *, progress=None) -> StageSummary:
    from raypdm.config import save_resolved_config

    stage = purify_stage(cfg)
    summary = run_image_stage(
        stage, cfg.input, cfg.output, identities=cfg.identities, splits=tuple(cfg.splits), progress=progress,
        verify=cfg.verify, follow_symlinks=cfg.follow_symlinks,
    )
    save_resolved_config(cfg, cfg.output)
    return summary
