"""The sampling stage: every trained identity × prompt × image through decoupled guidance (paper Eq. 6)
on a Ray Data actor pool, with a resumable Parquet manifest.

    models/<identity>/export/          diffusers pipeline folders, as DreamBoothTrainer.export writes them
    models/<identity>/export/cdl_prompts.json   the token/templates the identity was trained with
    ─▶ <output>/<identity>/<prompt_slug>/<image_index:04d>.png + manifest.parquet + config.yaml

One manifest row per (identity, prompt_index, image_index), with its seed from `seeds_for`, so a row
regenerates its image alone. The driver cuts the rows that are not done yet into work units of at most
`batch_size` images of one identity and one prompt (one pipeline call each); an actor loads an identity's
pipeline once and keeps the last `max_cached_models` of them. A row's key is
(identity, prompt slug, file name, hash(export fingerprint, seed), hash(prompt + sampling settings)):
re-running skips finished rows; a re-exported model or a changed setting samples again. A missing or
unloadable export becomes error rows (`input`: they stay failed until the export changes) for that
identity only; a sampling failure becomes `runtime` error rows, retried on the next run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from raypdm.config import Identities, JobConfig, Uri, config_hash
from raypdm.data.layout import LayoutError, validate_component
from raypdm.data.manifest import ERROR_INPUT, ERROR_RUNTIME, row_key
from raypdm.data.schemas import EXTRA_COLUMNS as _SCHEMAS
from raypdm.pipelines.engine import row_columns
from raypdm.pipelines.stage import StageSummary
from raypdm.sample.decoupled import SamplingConfig, seeds_for
from raypdm.train.prompts import CDLPrompts
from raypdm.data.manifest import in_run_scope

log = logging.getLogger(__name__)

__all__ = [
    "EXPORT_DIR",
    "SampleJobConfig",
    "discover_exports",
    "export_fingerprint",
    "prompt_slug",
    "run_sample",
]

EXPORT_DIR = "export"
PROMPTS_FILE = "cdl_prompts.json"
STAGE = "sample"
_SMALL_FILE = 1 << 20  # files up to 1 MiB are fingerprinted by content, larger ones by fsspec's ukey

# Columns this stage adds after the manifest's base columns, with their types (declared with every other
# kind of manifest in raypdm/data/schemas.py).
EXTRA_COLUMNS: dict[str, pa.DataType] = _SCHEMAS["sample"]


def prompt_slug(prompt: str) -> str:
    """A safe folder name for a prompt: 'a smiling photo of sks person' -> 'a-smiling-photo-of-sks-person'.
    Lower-case ASCII letters, digits and '-', at most 80 characters (a hash keeps long prompts apart)."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    if not slug or len(slug) > 80:
        digest = hashlib.sha256(prompt.encode()).hexdigest()[:8]
        slug = f"{slug[:71].rstrip('-')}-{digest}" if slug else f"prompt-{digest}"
    return validate_component(slug, "prompt slug")


class SampleJobConfig(JobConfig):
    models: Uri = Field(description="training output root (fsspec URI) with <identity>/export/ pipelines")
    output: Uri = Field(description="output root (fsspec URI): images + manifest.parquet + config.yaml")
    identities: Identities = Field(None, description="identities to sample (default: every export)")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    workers: int = Field(1, ge=1, le=10_000)
    gpus_per_worker: float = Field(1.0, ge=0, le=8)
    batch_size: int = Field(8, ge=1, le=1024, description="images per work unit (one identity, one prompt)")
    max_cached_models: int = Field(2, ge=1, le=16, description="pipelines each actor keeps loaded")
    verify: Literal["size", "full"] = Field(
        "size", description="how a re-run checks finished images: size (a listing) or full (sha256 of every file)"
    )

    @model_validator(mode="after")
    def _distinct_slugs(self) -> SampleJobConfig:
        seen: dict[str, str] = {}
        for p in self.sampling.prompts:
            try:
                slug = prompt_slug(p)
            except LayoutError as exc:
                raise ValueError(f"sampling.prompts: {exc}") from None
            if slug in seen and seen[slug] != p:
                raise ValueError(f"sampling.prompts: {seen[slug]!r} and {p!r} share the folder name {slug!r}")
            if slug in seen:
                raise ValueError(f"sampling.prompts: {p!r} is listed twice")
            seen[slug] = p
        return self


# ----------------------------------------------------------------------------------- the models


def discover_exports(models_uri: str, identities: list[str] | None = None) -> tuple[dict[str, str | None], list[str]]:
    """identity -> its export folder URI (None: asked for but not there), and notes on skipped folders."""
    from raypdm.data.uri import fs_and_path, join, to_uri

    fs, root = fs_and_path(models_uri)
    root = root.rstrip("/")
    if not fs.exists(root) or not fs.isdir(root):
        raise LayoutError(f"models root {models_uri!r} does not exist or is not a folder")
    problems: list[str] = []
    found: dict[str, str | None] = {}
    if identities is None:
        for entry in sorted(fs.ls(root, detail=True), key=lambda e: e["name"]):
            ident = posixpath.basename(entry["name"].rstrip("/"))
            if entry["type"] != "directory" or ident.startswith((".", "_")):
                continue
            try:
                validate_component(ident, "identity")
            except LayoutError as exc:
                problems.append(str(exc))
                continue
            export = posixpath.join(entry["name"].rstrip("/"), EXPORT_DIR)
            if fs.isdir(export):
                found[ident] = to_uri(fs, export)
            else:
                problems.append(f"{ident}: no {EXPORT_DIR}/ folder (not trained yet?); skipped")
    else:
        for ident in identities:
            export = join(models_uri, ident, EXPORT_DIR)
            efs, epath = fs_and_path(export)
            found[ident] = export if efs.isdir(epath) else None
    return found, problems


def export_fingerprint(export_uri: str) -> str:
    """A hash of an export folder: small files (configs, tokenizer, prompts) by content, large ones
    (weights) by path, size and fsspec's ukey (mtime/inode locally, ETag on object stores)."""
    from raypdm.data.uri import fs_and_path

    fs, root = fs_and_path(export_uri)
    root = root.rstrip("/")
    h = hashlib.sha256()
    for path, info in sorted(fs.find(root, detail=True).items()):
        rel = posixpath.relpath(path, root)
        if ".tmp-" in rel:
            continue
        size = int(info.get("size") or 0)
        h.update(f"{rel}\0{size}\0".encode())
        if size <= _SMALL_FILE:
            h.update(fs.cat_file(path))
        else:
            h.update(str(fs.ukey(path)).encode())
    return h.hexdigest()


def _training_prompts(export_uri: str) -> CDLPrompts | None:
    """The CDL prompts an export was trained with (cdl_prompts.json), or None when it has none."""
    from raypdm.data.uri import exists, join, read_bytes

    target = join(export_uri, PROMPTS_FILE)
    if not exists(target):
        return None
    info = json.loads(read_bytes(target))
    return CDLPrompts.model_validate(info.get("prompts", info))


@dataclass
class _Plan:
    """What one identity is sampled with; `error` set when it cannot be sampled at all."""

    identity: str
    export: str | None
    fingerprint: str
    sampling: SamplingConfig
    error: str | None = None

    def config_hash(self, prompt: str) -> str:
        s = self.sampling
        return config_hash({
            "stage": STAGE, "prompt": prompt, "steps": s.steps, "w": s.w, "height": s.height, "width": s.width,
            "scheduler": s.scheduler, "noise_device": s.noise_device,
            "cdl_prompts": s.cdl_prompts.model_dump(mode="json"),
        })

    def input_sha256(self, seed: int) -> str:
        return hashlib.sha256(f"{self.fingerprint}/{int(seed)}".encode()).hexdigest()


def _plan(cfg: SampleJobConfig, identity: str, export: str | None) -> _Plan:
    sampling = cfg.sampling
    if export is None:
        error = f"no export folder {identity}/{EXPORT_DIR}/ under {cfg.models}"
        return _Plan(identity, None, "missing", sampling, error)
    try:
        fingerprint = export_fingerprint(export)
    except Exception as exc:
        return _Plan(identity, export, "unreadable", sampling, f"cannot read export: {type(exc).__name__}: {exc}")
    try:
        trained = _training_prompts(export)
    except Exception as exc:
        return _Plan(identity, export, fingerprint, sampling,
                     f"broken {PROMPTS_FILE}: {type(exc).__name__}: {exc}")
    # The prompts the model was trained with win, unless the job sets sampling.cdl_prompts explicitly.
    if trained is not None and "cdl_prompts" not in sampling.model_fields_set:
        sampling = sampling.model_copy(update={"cdl_prompts": trained})
    return _Plan(identity, export, fingerprint, sampling)


# ---------------------------------------------------------------------------------------- actor


def load_export(export_uri: str, device: str):
    """The diffusers pipeline of one identity's export (raypdm's strict SD 2.1 loader).

    A local export is read in place; any other URI is copied to a temporary folder first, which is
    removed once the weights are in memory."""
    import shutil
    import tempfile
    from pathlib import Path

    from fsspec.implementations.local import LocalFileSystem

    from raypdm import models
    from raypdm.data.uri import fs_and_path

    fs, path = fs_and_path(export_uri)
    loader = models.get("sd21-base").loader
    if isinstance(fs, LocalFileSystem):
        parts = loader(Path(path), device, None)
    else:
        local = tempfile.mkdtemp(prefix="raypdm-export-")
        try:
            fs.get(path.rstrip("/") + "/", local + "/", recursive=True)
            parts = loader(Path(local), device, None)
        finally:
            shutil.rmtree(local, ignore_errors=True)
    pipe = parts.to_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _is_resource_error(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError))


class _SampleWorker:
    """One actor of the pool: samples work units (one identity, one prompt, ≤ batch_size seeds)."""

    def __init__(self, plans: dict[str, dict[str, Any]], output: str, threads: int | None, max_cached: int,
                 run_id: str = ""):
        import torch

        from raypdm.runtime import default_device

        if threads:
            torch.set_num_threads(threads)
        self.plans = plans
        self.output = output
        self.run_id = run_id  # outputs are written under staged names of this run (data/commit.py)
        self.max_cached = max_cached
        self.device = default_device()
        self.cache: OrderedDict[str, Any] = OrderedDict()
        self.failed: dict[str, tuple[str, str]] = {}

    def _sampler(self, identity: str):
        from raypdm.sample.decoupled import DecoupledSampler

        if identity in self.cache:
            self.cache.move_to_end(identity)
            return self.cache[identity]
        plan = self.plans[identity]
        while len(self.cache) >= self.max_cached:
            self.cache.popitem(last=False)
            _free_device_memory()
        sampler = DecoupledSampler(load_export(plan["export"], self.device),
                                   SamplingConfig.model_validate(plan["sampling"]))
        self.cache[identity] = sampler
        return sampler

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows: list[dict[str, Any]] = []
        for k in range(len(batch["identity"])):
            identity = str(batch["identity"][k])
            unit = json.loads(str(batch["unit"][k]))
            rows += self._unit(identity, unit)
        return row_columns(rows, "sample")

    def _unit(self, identity: str, unit: dict[str, Any]) -> list[dict[str, Any]]:
        from raypdm.data.commit import write_staged
        from raypdm.data.decode import encode_png, sha256_hex
        from raypdm.data.uri import join

        plan = self.plans[identity]
        prompt, slug = unit["prompt"], unit["slug"]
        seeds, indices = unit["seeds"], unit["image_indices"]
        base = [_base_row(plan, identity, unit, seed, index) for seed, index in zip(seeds, indices, strict=True)]
        if identity in self.failed:
            error, kind = self.failed[identity]
            return [{**r, "error": error, "error_kind": kind} for r in base]
        try:
            sampler = self._sampler(identity)
        except Exception as exc:
            kind = ERROR_RUNTIME if _is_resource_error(exc) else ERROR_INPUT
            error = f"cannot load export {plan['export']}: {type(exc).__name__}: {exc}"
            if kind == ERROR_INPUT:
                self.failed[identity] = (error, kind)
            return [{**r, "error": error, "error_kind": kind} for r in base]
        t1 = time.perf_counter()
        try:
            images = sampler.sample(prompt, seeds)
            records = sampler.records(prompt, seeds, identity=identity)
        except Exception as exc:
            error = f"sampling failed: {type(exc).__name__}: {exc}"
            return [{**r, "error": error, "error_kind": ERROR_RUNTIME} for r in base]
        # Sampling time per image (a unit's time shared by its images); model loading is not included.
        seconds = (time.perf_counter() - t1) / len(seeds)
        out = []
        for row, image, rec in zip(base, images, records, strict=True):
            row = {**row, **{k: rec[k] for k in ("positive_prompt", "negative_prompt", "w", "cfg_scale",
                                                  "token", "steps", "scheduler", "height", "width")}}
            target = join(self.output, identity, slug, row["name"])
            try:
                data = encode_png(image)
                write_staged(target, data, self.run_id, root=self.output)
                row.update(uri=target, output_sha256=sha256_hex(data), output_bytes=len(data), seconds=seconds)
            except Exception as exc:
                row.update(error=f"cannot write output: {type(exc).__name__}: {exc}", error_kind=ERROR_RUNTIME)
            out.append(row)
        return out


def _free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _unit_locations(item: dict[str, Any]) -> list[str]:
    """The output locations a work unit's rows will have (the engine's `Lost` matches them)."""
    from raypdm.pipelines.engine import location

    unit = json.loads(item["unit"])
    return [location(item["identity"], unit["slug"], image_file(i)) for i in unit["image_indices"]]


def image_file(index: int) -> str:
    return f"{index:04d}.png"


def _base_row(plan: dict[str, Any], identity: str, unit: dict[str, Any], seed: int, index: int) -> dict[str, Any]:
    """A row's identifying and requested fields; the sampler's record fills in the rest."""
    s = plan["sampling"]
    return {
        "identity": identity,
        "split": unit["slug"],
        "name": image_file(index),
        "src_uri": plan["export"],
        "uri": None,
        "input_sha256": hashlib.sha256(f"{plan['fingerprint']}/{int(seed)}".encode()).hexdigest(),
        "output_sha256": None,
        "stage": STAGE,
        "config_hash": unit["config_hash"],
        "seconds": 0.0,
        "error": None,
        "error_kind": None,
        "prompt": unit["prompt"],
        "prompt_index": unit["prompt_index"],
        "image_index": int(index),
        "positive_prompt": None,
        "negative_prompt": None,
        "seed": int(seed),
        "w": float(s["w"]),
        "cfg_scale": float(s["w"]) + 1.0,
        "token": s["cdl_prompts"]["token"] if s["cdl_prompts"]["cdl"] else None,
        "steps": int(s["steps"]),
        "scheduler": None,
        "height": int(s["height"]),
        "width": int(s["width"]),
    }


# ---------------------------------------------------------------------------------------- driver


@in_run_scope
def run_sample(cfg: SampleJobConfig, progress: Callable[[int, int], None] | None = None) -> StageSummary:
    """Sample every chosen identity; returns the stage summary. Safe to re-run, also after a kill: finished
    rows whose images verify are skipped (data/resume.py), images become visible only with their rows
    (data/commit.py), and a re-run with nothing left starts no Ray."""
    from raypdm.config import save_resolved_config
    from raypdm.data.resume import verified_done_keys
    from raypdm.data.roots import check_apart, read_roots
    from raypdm.pipelines.engine import LOST_ERROR, Lost, Pool, StageOutput, placement, stream

    t0 = time.perf_counter()
    check_apart(cfg.output, read_roots(cfg))  # never write into the models (raises RootOverlapError)
    exports, problems = discover_exports(cfg.models, cfg.identities)
    plans = {ident: _plan(cfg, ident, export) for ident, export in exports.items()}
    summary = StageSummary(stage=STAGE, output=cfg.output, problems=problems)
    output = StageOutput(cfg.output, "sample", summary)
    latest = output.open()  # a killed run's staged images: renamed into place if their rows are durable
    done, checked = verified_done_keys(latest, cfg.output, cfg.verify)
    summary.recomputed = dict(checked.reasons)
    summary.verified = sum(ok and row.get("error") is None for row, ok in zip(latest, checked.ok))

    prompts = cfg.sampling.prompts
    units: list[dict[str, Any]] = []
    broken_rows: list[dict[str, Any]] = []
    for ident in sorted(plans):
        plan = plans[ident]
        pdict = {"export": plan.export, "fingerprint": plan.fingerprint,
                 "sampling": plan.sampling.model_dump(mode="json")}
        for p_index, prompt in enumerate(prompts):
            slug, chash = prompt_slug(prompt), plan.config_hash(prompt)
            todo: list[tuple[int, int]] = []
            for i, seed in enumerate(seeds_for(plan.sampling.seed, ident, p_index, plan.sampling.num_images)):
                summary.total += 1
                if row_key(ident, slug, image_file(i), plan.input_sha256(seed), chash) in done:
                    summary.skipped += 1
                    continue
                todo.append((i, seed))
            base_unit = {"prompt": prompt, "prompt_index": p_index, "slug": slug, "config_hash": chash}
            if plan.error is not None:
                for i, seed in todo:
                    row = _base_row(pdict, ident, base_unit, seed, i)
                    broken_rows.append({**row, "error": plan.error, "error_kind": ERROR_INPUT})
                continue
            for start in range(0, len(todo), cfg.batch_size):
                chunk = todo[start : start + cfg.batch_size]
                units.append({"identity": ident, "unit": json.dumps({
                    **base_unit, "image_indices": [i for i, _ in chunk], "seeds": [s for _, s in chunk]})})

    plan_dicts = {
        ident: {"export": p.export, "fingerprint": p.fingerprint, "sampling": p.sampling.model_dump(mode="json")}
        for ident, p in plans.items() if p.error is None
    }
    todo_rows = summary.total - summary.skipped

    def lost_rows(lost_units: list[dict]) -> pa.Table:
        # A unit whose actor died for good (after a retry): runtime error rows, sampled again by the next run.
        rows = []
        for item in lost_units:
            unit = json.loads(item["unit"])
            for seed, index in zip(unit["seeds"], unit["image_indices"], strict=True):
                row = _base_row(plan_dicts[item["identity"]], item["identity"], unit, seed, index)
                rows.append({**row, "error": f"sampling failed: {LOST_ERROR}", "error_kind": ERROR_RUNTIME})
        return pa.Table.from_pylist(rows)

    try:
        # Rows of an identity that cannot be sampled at all (no export, unreadable): no Ray work for them.
        if broken_rows:
            output.commit(pa.Table.from_pylist(broken_rows))
            if progress:
                progress(len(broken_rows), todo_rows)
        if units:
            from raypdm.runtime import init_ray

            init_ray()
            size = max(1, min(cfg.workers, len(units)))
            where = placement(actors=size, gpus_per_worker=cfg.gpus_per_worker)
            worker = Pool(_SampleWorker, (plan_dicts, cfg.output, where.threads, cfg.max_cached_models, output.run_id),
                          size=size, batch_size=1, placement=where)
            # One block per unit: a unit's images are committed (and counted) as soon as they come back.
            stream(units, [worker], to_rows=lambda table: table, output=output, flush_rows=1,
                   blocks=len(units), lost=Lost(item_ids=_unit_locations, rows_for=lost_rows),
                   progress=(lambda seen: progress(len(broken_rows) + seen, todo_rows)) if progress else None)
    finally:
        output.close()
    save_resolved_config(cfg, cfg.output)
    summary.seconds = time.perf_counter() - t0
    return summary
