"""The protection stage: craft a protective perturbation on every identity's set_A, copy the other splits.

Per-image methods (advdm, photoguard_*, glaze, adaptive_codesr) run as a resumable image stage: an actor
pool loads the fixed models once per actor (a GPU each when the cluster has GPUs). Per-identity methods
(fsmg, aspl, easpl, metacloak) train a surrogate on the identity's clean set_B, so one Ray task per
identity holds its images and its surrogate (a whole GPU on a GPU cluster); many identities run at once.

Every protected image gets a manifest row with the measured ℓ∞ and ℓ2 norms of the *saved* perturbation
(uint8 PNG minus clean input, in [0, 1] pixel units), LPIPS to the clean image, the attack loss before and
after, and seconds. The other splits are copied through unchanged (as PNG) so the output is a complete
dataset for the purify and train stages.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from raypdm.config import Identities, JobConfig, Uri, config_hash, validate_section
from raypdm.data.layout import SPLITS, ImageRef
from raypdm.pipelines.stage import ImageStage, StageSummary, run_image_stage
from raypdm.data.manifest import in_run_scope

log = logging.getLogger(__name__)

__all__ = ["ProtectJobConfig", "budget_shortfall", "run_protect", "protection_options"]


class ProtectJobConfig(JobConfig):
    input: Uri = Field(description="clean dataset root (fsspec URI): <identity>/set_A|set_B|set_C/<image>")
    output: Uri = Field(description="output root: the protected dataset + manifest.parquet")
    method: str = Field("advdm", description="protection name (raypdm protect --list)")
    options: dict[str, Any] = Field(default_factory=dict, description="the method's options (radius, step, steps, ...)")
    preset: Literal["tiny", "full"] = "tiny"
    weights_dir: Uri | None = None
    identities: Identities = Field(None, description="comma-separated identity folder names, or all")
    protect_split: str = Field("set_A", description="the split that gets protected (trained on downstream)")
    copy_splits: bool = Field(True, description="copy the other splits through unchanged")
    batch_size: int = Field(4, ge=1, le=1024)
    workers: int = Field(1, ge=1, le=10_000, description="actors for per-image methods")
    gpus_per_worker: float = Field(1.0, ge=0, le=8)
    cpus_per_identity: float = Field(0.5, gt=0, description="CPU share of a per-identity task on CPU-only clusters")
    max_concurrent: int | None = Field(None, ge=1, description="identities protected at once [all that fit]")
    lpips_backbone: Literal["pretrained", "random"] = "pretrained"
    verify: Literal["size", "full"] = Field(
        "size", description="how a re-run checks finished outputs: size (a listing) or full (sha256 of every file)"
    )
    follow_symlinks: bool = Field(
        False, description="read input files and folders that are symlinks leading outside the input root"
    )

    @field_validator("protect_split")
    @classmethod
    def _known_split(cls, v: str) -> str:
        if v not in SPLITS:
            raise ValueError(f"protect_split must be one of {list(SPLITS)}, got {v!r}")
        return v

    @model_validator(mode="after")
    def _valid_method(self) -> ProtectJobConfig:
        # Unknown methods and bad options fail here, in the driver, naming the culprit.
        protection_options(self.method, self.options, "options")
        return self


def protection_options(method: str, options: dict[str, Any], *prefix: str | int) -> dict[str, Any]:
    """The method's validated options as plain JSON (defaults filled in): what the stage key hashes.
    `prefix`: where the options sit in the user's config, so an error names the full path."""
    from raypdm.protect import list_protections, protection_options_model

    name = method.strip().lower().replace("-", "_")
    if name not in list_protections():
        raise ValueError(f"unknown protection {method!r}; known: {', '.join(list_protections())}")
    return validate_section(protection_options_model(name), options, *prefix).model_dump(mode="json")


def budget_shortfall(method: str, options: dict[str, Any]) -> str | None:
    """A one-line warning when a per-image method's settings cannot reach its radius (K·α < r): its saved
    perturbations will be weaker than the radius says, and results would be compared at the wrong budget.
    None when they can, and for the bi-level methods (their ``steps`` are per outer round)."""
    from raypdm.protect.base import budget_steps, reaches_budget

    if _is_per_identity(method):
        return None
    radius, step, steps = float(options["radius"]), float(options["step"]), int(options["steps"])
    if reaches_budget(radius, step, steps):
        return None
    return (f"{method}: steps × step = {steps} × {step * 255:.3g}/255 = {steps * step * 255:.3g}/255 cannot reach "
            f"the radius {radius * 255:.3g}/255; the saved perturbations will stay below it (leave `steps` out "
            f"for {budget_steps(radius, step)}, or raise `step`)")


def _is_per_identity(method: str) -> bool:
    from raypdm.protect.base import is_per_identity

    return is_per_identity(method)


# -------------------------------------------------------------------------------------- measurements


class _Measure:
    """ℓ∞ / ℓ2 of the saved perturbation and LPIPS to the clean image (loaded once per actor)."""

    def __init__(self, lpips_pretrained: bool, weights_dir: str | None = None):
        from raypdm.metrics.faithfulness import load_lpips

        self.lpips = load_lpips("cpu", pretrained_backbone=lpips_pretrained, weights_dir=weights_dir)

    def __call__(self, clean: list[np.ndarray], protected: list[np.ndarray], rows=None) -> list[dict[str, float]]:
        import torch

        from raypdm.protect.pgd import perturbation_norms

        out = []
        for x, y in zip(clean, protected):
            linf, l2 = perturbation_norms(y, x)
            cols = {"linf": linf, "l2": l2, "lpips": float("nan")}
            if min(x.shape[:2]) >= 32 and x.shape == y.shape:  # LPIPS-Alex needs 31 px to reach its last layer
                with torch.no_grad():
                    a = torch.from_numpy(x).permute(2, 0, 1)[None].float() / 127.5 - 1
                    b = torch.from_numpy(y).permute(2, 0, 1)[None].float() / 127.5 - 1
                    cols["lpips"] = float(self.lpips(a, b).flatten()[0])
            out.append(cols)
        return out


def _image_transform(method: str, options: dict, preset: str, weights_dir: str | None):
    from raypdm.protect import build_protection

    protection = build_protection(method, options=options, preset=preset, weights_dir=weights_dir)

    def transform(images: list[np.ndarray]):
        results = protection.protect(images)
        return ([r.image for r in results],
                [{"loss_before": float(r.loss_before), "loss_after": float(r.loss_after)} for r in results])

    return transform


def _copy_transform():
    return lambda images: list(images)


# ----------------------------------------------------------------------------------- per-identity task


def _protect_identity(cfg: ProtectJobConfig, method: str, options: dict, identity: str, refs: list[ImageRef],
                      clean_uris: list[str], chash: str, threads: int | None,
                      on_start: Callable[[str], None] | None = None, run_id: str = "") -> list[dict[str, Any]]:
    """One identity: decode its images (bad ones become error rows), protect, write PNGs under their staged
    names (the driver renames them once their rows are durable: data/commit.py), measure."""
    import torch

    if on_start is not None:
        on_start(identity)

    from raypdm.data.decode import decode_image, encode_png, sha256_hex
    from raypdm.data.layout import output_uri
    from raypdm.data.manifest import ERROR_INPUT, ERROR_RUNTIME
    from raypdm.data.commit import write_staged
    from raypdm.data.uri import read_bytes
    from raypdm.protect import build_protection

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    good: list[tuple[ImageRef, str, np.ndarray]] = []
    stamps: dict[str, dict[str, Any]] = {}  # src_uri -> the input's size and time as read
    for ref in refs:
        row = {"identity": ref.identity, "split": ref.split, "name": ref.name, "src_uri": ref.src_uri,
               "stage": method, "config_hash": chash}
        try:
            data = read_bytes(ref.src_uri)
        except Exception as exc:
            rows.append({**row, "error": f"cannot read file: {type(exc).__name__}: {exc}", "error_kind": ERROR_RUNTIME})
            continue
        row["input_sha256"] = sha256_hex(data)
        row["input_bytes"] = len(data)
        # The listing's time only when the bytes read are the listed ones (data/read.py does the same).
        row["input_mtime"] = ref.mtime if ref.size == len(data) else None
        if ref.error:
            rows.append({**row, "error": ref.error, "error_kind": ERROR_INPUT})
            continue
        try:
            good.append((ref, row["input_sha256"], decode_image(data)))
            stamps[ref.src_uri] = {"input_bytes": row["input_bytes"], "input_mtime": row["input_mtime"]}
        except Exception as exc:
            rows.append({**row, "error": str(exc), "error_kind": ERROR_INPUT})
    clean = []
    for uri in clean_uris:
        try:
            clean.append(decode_image(read_bytes(uri)))
        except Exception as exc:  # a bad reference image only shrinks the surrogate's training set
            log.warning("%s: clean reference %s skipped: %s", identity, uri, exc)
    if not good:
        return rows
    try:
        protection = build_protection(method, options=options, preset=cfg.preset, weights_dir=cfg.weights_dir)
        results = protection.protect_identity([im for _, _, im in good], clean, identity)
    except Exception as exc:  # the whole identity failed for a passing reason: retried on a re-run
        msg = f"protection failed: {type(exc).__name__}: {exc}"
        return rows + [{"identity": r.identity, "split": r.split, "name": r.name, "src_uri": r.src_uri,
                        "input_sha256": sha, "stage": method, "config_hash": chash, "error": msg,
                        "error_kind": ERROR_RUNTIME} for r, sha, _ in good]
    per_image = (time.perf_counter() - t0) / len(good)
    finished = time.time()
    started = finished - (time.perf_counter() - t0)
    measure = _Measure(cfg.lpips_backbone == "pretrained", cfg.weights_dir)
    for (ref, sha, image), result in zip(good, results):
        row = {"identity": ref.identity, "split": ref.split, "name": ref.name, "src_uri": ref.src_uri,
               "input_sha256": sha, **stamps[ref.src_uri], "stage": method, "config_hash": chash, "seconds": per_image,
               "loss_before": float(result.loss_before), "loss_after": float(result.loss_after),
               # wall-clock span of the identity's task: shows identities ran side by side
               "started_at": started, "finished_at": finished}
        try:
            data = encode_png(result.image)
            target = output_uri(cfg.output, ref)
            write_staged(target, data, run_id, root=cfg.output)
            row.update(uri=target, output_sha256=sha256_hex(data), output_bytes=len(data),
                       **measure([image], [result.image])[0])
        except Exception as exc:
            row.update(error=f"cannot write output: {type(exc).__name__}: {exc}", error_kind=ERROR_RUNTIME)
        rows.append(row)
    return rows


class _IdentityWorker:
    """An actor of the per-identity pool: protects one identity per call (its images and clean references in
    the work item), as `_protect_identity` does; torch threads set once per actor."""

    def __init__(self, cfg: ProtectJobConfig, method: str, options: dict, chash: str, threads: int | None,
                 on_start: Callable[[str], None] | None, run_id: str):
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.args = (cfg, method, options)
        self.chash, self.on_start, self.run_id = chash, on_start, run_id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from raypdm.pipelines.engine import row_columns

        rows: list[dict[str, Any]] = []
        for ident, members, clean in zip(batch["identity"], batch["members"], batch["clean"], strict=True):
            refs = [ImageRef(**m) for m in json.loads(str(members))]
            rows += _protect_identity(*self.args, str(ident), refs, json.loads(str(clean)), self.chash, None,
                                      self.on_start, self.run_id)
        return row_columns(rows, "protect")


def _identity_item(ident: str, members: list[ImageRef], clean: list[str]) -> dict[str, str]:
    refs = [{"identity": r.identity, "split": r.split, "name": r.name, "src_uri": r.src_uri, "error": r.error,
             "size": r.size, "mtime": r.mtime} for r in members]
    return {"identity": ident, "members": json.dumps(refs), "clean": json.dumps(clean)}


def _run_per_identity(cfg: ProtectJobConfig, method: str, options: dict, refs: list[ImageRef], chash: str,
                      progress=None, on_identity_start: Callable[[str], None] | None = None) -> StageSummary:
    """Per-identity protections on the stage engine: one work item per identity (all its images: the
    surrogate sees them together), an actor pool of `max_concurrent` actors (default: as many as fit), one
    identity at a time per actor."""
    import pyarrow as pa
    import ray

    from raypdm.data.layout import list_images
    from raypdm.data.manifest import ERROR_RUNTIME
    from raypdm.data.resume import plan_resume
    from raypdm.pipelines.engine import LOST_ERROR, Lost, Pool, StageOutput, location, placement, stream

    t0 = time.perf_counter()
    summary = StageSummary(stage=method, output=cfg.output, total=len(refs))
    output = StageOutput(cfg.output, "protect", summary)
    latest = output.open()  # a killed run's staged images: renamed into place if their rows are durable
    plan = plan_resume(refs, latest, chash, cfg.output, cfg.verify)
    summary.verified, summary.recomputed = plan.verified, dict(plan.recomputed)
    redo = {ref.identity for ref in plan.todo}
    todo: dict[str, list[ImageRef]] = {}
    for ref in refs:
        # An identity is redone as a whole (its surrogate sees all its images) unless every row is done.
        if ref.identity in redo:
            todo.setdefault(ref.identity, []).append(ref)
        else:
            summary.skipped += 1
    if not todo:  # every identity done and verified: no Ray work, no Ray started
        output.close()
        summary.seconds = time.perf_counter() - t0
        return summary
    from raypdm.runtime import init_ray

    init_ray()
    cluster = ray.cluster_resources()
    if cluster.get("GPU", 0) > 0:
        fit = int(cluster["GPU"] // cfg.gpus_per_worker) if cfg.gpus_per_worker else len(todo)
    else:
        fit = int(cluster.get("CPU", 1) // cfg.cpus_per_identity)
    size = max(1, min(len(todo), cfg.max_concurrent or max(1, fit)))
    where = placement(actors=size, gpus_per_worker=cfg.gpus_per_worker, cpus_per_worker=cfg.cpus_per_identity)
    items = []
    for ident, members in todo.items():
        clean_refs, _ = list_images(cfg.input, identities=[ident], splits=("set_B",))
        items.append(_identity_item(ident, members, [r.src_uri for r in clean_refs if r.error is None]))
    worker = Pool(_IdentityWorker, (cfg, method, options, chash, where.threads, on_identity_start, output.run_id),
                  size=size, batch_size=1, placement=where, one_at_a_time=True)

    def lost_rows(items_lost: list[dict]) -> pa.Table:
        # The identity's actor died for good (after a retry): runtime error rows, retried by the next run.
        return pa.Table.from_pylist([
            {"identity": r.identity, "split": r.split, "name": r.name, "src_uri": r.src_uri, "stage": method,
             "config_hash": chash, "error": f"protection failed: {LOST_ERROR}", "error_kind": ERROR_RUNTIME}
            for item in items_lost for r in todo[item["identity"]]])

    lost = Lost(item_ids=lambda item: [location(r.identity, r.split, r.name) for r in todo[item["identity"]]],
                rows_for=lost_rows)
    total = sum(len(m) for m in todo.values())
    try:
        # An identity's rows are committed (and its images renamed into place) as soon as it finishes.
        stream(items, [worker], to_rows=lambda table: table, output=output, flush_rows=1, blocks=len(items),
               lost=lost, progress=(lambda seen: progress(seen, total)) if progress else None)
    finally:
        output.close()
    summary.seconds = time.perf_counter() - t0
    return summary


# -------------------------------------------------------------------------------------------- driver


@in_run_scope
def run_protect(cfg: ProtectJobConfig, *, progress=None,
                on_identity_start: Callable[[str], None] | None = None) -> list[StageSummary]:
    """Protect set_A (resumable), copy the other splits; returns one summary per step.

    `on_identity_start(identity)` runs inside each per-identity task as it starts, on the worker (it is
    shipped with the task): a hook for monitoring, and for tests that must prove identities run at once."""
    from raypdm.config import save_resolved_config
    from raypdm.data.layout import list_images
    from raypdm.data.roots import check_apart, read_roots

    check_apart(cfg.output, read_roots(cfg))  # never write into the input (raises RootOverlapError)
    method = cfg.method.strip().lower().replace("-", "_")
    options = protection_options(method, cfg.options)
    if shortfall := budget_shortfall(method, options):
        log.warning(shortfall)
    stage_config = {"stage": "protect", "method": method, "options": options, "preset": cfg.preset,
                    "weights_dir": cfg.weights_dir, "lpips": cfg.lpips_backbone}
    chash = config_hash(stage_config)
    refs, problems = list_images(cfg.input, identities=cfg.identities, splits=(cfg.protect_split,),
                                 follow_symlinks=cfg.follow_symlinks)
    if cfg.lpips_backbone == "pretrained":
        from raypdm.models.preflight import check_models

        check_models([], cfg.weights_dir, lpips=["alex"])  # in the driver, before any work
    summaries = []
    if _is_per_identity(method):
        summaries.append(_run_per_identity(cfg, method, options, refs, chash, progress, on_identity_start))
    else:
        stage = ImageStage(
            name=method, config=stage_config, config_hash=chash,
            make_transform=functools.partial(_image_transform, method, options, cfg.preset, cfg.weights_dir),
            make_scorer=functools.partial(_Measure, cfg.lpips_backbone == "pretrained", cfg.weights_dir),
            uses_model=True, uses_gpu=True, workers=cfg.workers, gpus_per_worker=cfg.gpus_per_worker,
            batch_size=cfg.batch_size, manifest_kind="protect",
        )
        summaries.append(run_image_stage(stage, cfg.input, cfg.output, refs=refs, progress=progress,
                                         verify=cfg.verify))
    summaries[0].problems = problems
    if cfg.copy_splits:
        others = tuple(s for s in SPLITS if s != cfg.protect_split)
        copy_refs, _ = list_images(cfg.input, identities=cfg.identities, splits=others,
                                   follow_symlinks=cfg.follow_symlinks)
        copy_cfg = {"stage": "copy"}
        copy = ImageStage(name="copy", config=copy_cfg, config_hash=config_hash(copy_cfg),
                          make_transform=_copy_transform, batch_size=16, manifest_kind="protect")
        summaries.append(run_image_stage(copy, cfg.input, cfg.output, refs=copy_refs, verify=cfg.verify))
    save_resolved_config(cfg, cfg.output)
    return summaries
