"""The image stage (protect per image, purify) on the stage engine (pipelines/engine.py): list -> read/decode
-> transform -> write PNG -> Parquet manifest.

    driver: list files, recover what a killed run left staged, plan the resume (data/resume.py: what is
            done is verified against its row; nothing left = no Ray at all)
            ─▶ from_items(the rest) ─▶ load_batch (tasks) ─▶ transform (actor pool or tasks)
            ─▶ write_batch (tasks: PNG + sha256, written under a staged name)
            ─▶ driver appends the rows to a manifest part, then renames the staged files into place
               (data/commit.py: a file under its final name always has a durable row) ─▶ compact

Model transforms run in an actor pool (`compute=ActorPoolStrategy`): the model loads once per actor and
each actor takes `gpus_per_worker` GPUs when the cluster has GPUs. Cheap transforms (JPEG, blur) run as
plain tasks. Ray restarts a dead actor and retries its batch; a transform that raises on one image
turns that image into an error row and the actor carries on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from raypdm.data.decode import DEFAULT_MAX_PIXELS, encode_png, sha256_hex
from raypdm.data.layout import SPLITS, ImageRef, list_images, output_name
from raypdm.data.commit import write_staged
from raypdm.data.manifest import ERROR_RUNTIME, conform
from raypdm.data.read import EMPTY_IMAGE, load_batch, object_column, ref_items
from raypdm.data.resume import Verify, plan_resume
from raypdm.data.uri import join
from raypdm.pipelines.engine import StageOutput

log = logging.getLogger(__name__)

# A transform maps a batch to a batch; it may also return per-image numeric columns as
# `(images, [{"loss_before": ..., ...}, ...])` (protections report their attack loss this way).
Transform = Callable[[list[np.ndarray]], "list[np.ndarray] | tuple[list[np.ndarray], list[dict[str, float]]]"]


def _split_extras(result, n: int) -> tuple[list[np.ndarray], list[dict[str, float]]]:
    if isinstance(result, tuple) and len(result) == 2:
        images, extras = list(result[0]), list(result[1])
        if len(extras) != len(images):
            raise RuntimeError(f"transform returned {len(extras)} column rows for {len(images)} images")
    else:
        images, extras = list(result), [{} for _ in range(n)]
    if len(images) != n:
        raise RuntimeError(f"transform returned {len(images)} images for {n} inputs")
    return images, extras
# Extra per-row columns computed from (inputs, outputs, rows), e.g. faithfulness of output vs input and
# vs a clean reference. Runs in its own small actor pool so its model (LPIPS) also loads once.
Scorer = Callable[[list[np.ndarray], list[np.ndarray], list[dict[str, str]]], list[dict[str, float]]]

__all__ = ["ImageStage", "StageSummary", "run_image_stage", "all_inputs_done"]


@dataclass
class ImageStage:
    """What a stage does and how it is placed on the cluster.

    make_transform runs once per actor (or once per task for cheap transforms) and returns the batch
    function. A list of factories runs as a chain of steps, one actor pool each (the "pools" layout for
    purifier chains); a single factory runs the whole transform in one step ("fused").
    make_scorer, when set, returns a function that adds numeric columns per row.
    """

    name: str
    config: dict[str, Any]
    config_hash: str
    make_transform: Callable[[], Transform] | list[Callable[[], Transform]]
    make_scorer: Callable[[], Scorer] | None = None
    uses_model: bool = False  # load once per actor (actor pool) instead of per task
    uses_gpu: bool = False
    workers: int = 1
    gpus_per_worker: float = 1.0
    cpus_per_worker: float | None = None  # None: 1 with GPUs, a fraction on CPU-only clusters
    batch_size: int = 8
    max_pixels: int = DEFAULT_MAX_PIXELS
    scorer_workers: int = 1
    manifest_kind: str = "purify"  # the declared schema its manifest follows (raypdm/data/schemas.py)


@dataclass
class StageSummary:
    stage: str
    output: str
    total: int = 0
    processed: int = 0
    skipped: int = 0
    errors: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    # Resume bookkeeping: finished outputs checked against their rows, inputs done again and why
    # (missing / size / hash / config changed / input changed / failed before), and what a killed run had
    # left staged (renamed into place when its row was durable, removed otherwise).
    verified: int = 0
    recomputed: dict[str, int] = field(default_factory=dict)
    rolled_forward: int = 0
    cleaned: int = 0

    def resume_note(self) -> str | None:
        """One line about what the resume found, or None for a first run that found nothing to check."""
        parts = []
        if self.verified or self.skipped:
            parts.append(f"{self.verified} outputs verified, {self.skipped} inputs skipped")
        if self.recomputed:
            why = ", ".join(f"{n} {reason}" for reason, n in sorted(self.recomputed.items()))
            parts.append(f"{sum(self.recomputed.values())} recomputed ({why})")
        if self.rolled_forward or self.cleaned:
            parts.append(f"interrupted run: {self.rolled_forward} committed outputs renamed into place, "
                         f"{self.cleaned} staged files removed")
        return "; ".join(parts) or None

    @property
    def images_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


_SCORER_CPUS = 0.25  # LPIPS-Alex + SSIMs: light next to any model purifier


class _TransformWorker:
    """Actor-pool (or per-task) wrapper: builds the model once, isolates per-image failures.

    keep_input: copy the incoming images to an `input_image` column (the scorer compares against them).
    """

    def __init__(self, make_transform: Callable[[], Transform], keep_input: bool = False, threads: int | None = None):
        if threads:
            # Ray pins OMP_NUM_THREADS to an actor's (fractional) CPU share, i.e. one thread; a lone CPU
            # actor would then leave the machine's other cores idle.
            import torch

            torch.set_num_threads(threads)
        self.transform = make_transform()
        self.keep_input = keep_input

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["name"])
        images = list(batch["image"])
        errors = list(batch["error"])
        kinds = list(batch["error_kind"])
        todo = [i for i in range(n) if not batch["skipped"][i] and not errors[i]]
        outputs: list[np.ndarray] = [EMPTY_IMAGE] * n
        extras: list[dict[str, float]] = [{} for _ in range(n)]
        seconds = [0.0] * n
        if todo:
            start = time.perf_counter()
            try:
                results, columns = _split_extras(self.transform([images[i] for i in todo]), len(todo))
                per_image = (time.perf_counter() - start) / len(todo)  # amortised over the batch
                for i, out, cols in zip(todo, results, columns):
                    outputs[i], extras[i], seconds[i] = out, cols, per_image
            except Exception:
                # Find the image that broke the batch; the others still get their outputs.
                for i in todo:
                    t0 = time.perf_counter()
                    try:
                        one, cols = _split_extras(self.transform([images[i]]), 1)
                        outputs[i], extras[i] = one[0], cols[0]
                    except Exception as exc:
                        errors[i], kinds[i] = f"transform failed: {type(exc).__name__}: {exc}", ERROR_RUNTIME
                    seconds[i] = time.perf_counter() - t0
        result = {k: batch[k] for k in batch if k not in ("image", "error", "error_kind", "seconds")}
        if self.keep_input:
            result["input_image"] = batch["image"]
        prior = batch["seconds"] if "seconds" in batch else np.zeros(n)
        result.update(
            image=object_column(outputs),
            error=object_column(errors),
            error_kind=object_column(kinds),
            seconds=np.asarray(prior, dtype=np.float64) + np.array(seconds, dtype=np.float64),
        )
        for key in sorted({k for e in extras for k in e}):
            result[key] = np.array([float(e.get(key, np.nan)) for e in extras], dtype=np.float64)
        return result


def _transform_task(batch, *, make_transform, keep_input):
    # Cheap transforms run as tasks; building them per batch costs microseconds.
    return _TransformWorker(make_transform, keep_input)(batch)


class _ScoreWorker:
    """Adds the scorer's columns (NaN where a row has no output) and drops the kept input images."""

    def __init__(self, make_scorer: Callable[[], Scorer]):
        self.scorer = make_scorer()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["name"])
        ok = [i for i in range(n) if not batch["skipped"][i] and not batch["error"][i]]
        extras: list[dict[str, float]] = [{} for _ in range(n)]
        if ok:
            rows = [{k: str(batch[k][i]) for k in ("identity", "split", "name")} for i in ok]
            try:
                scores = self.scorer([batch["input_image"][i] for i in ok], [batch["image"][i] for i in ok], rows)
                for i, cols in zip(ok, scores):
                    extras[i] = cols
            except Exception as exc:  # scores are extra information: never lose the outputs over them
                log.warning("scoring failed for a batch of %d: %s", len(ok), exc)
        result = {k: v for k, v in batch.items() if k != "input_image"}
        for key in sorted({k for e in extras for k in e}):
            result[key] = np.array([e.get(key, np.nan) for e in extras], dtype=np.float64)
        return result


def _write_batch(batch: dict[str, np.ndarray], *, out_uri: str, stage: str, config_hash: str,
                 run_id: str) -> dict[str, np.ndarray]:
    """Encode and write each output under its staged name (the driver renames it once its row is durable)."""
    n = len(batch["name"])
    uris: list[str] = [""] * n
    out_sha: list[str] = [""] * n
    out_bytes = np.full(n, -1, dtype=np.int64)
    errors = list(batch["error"])
    kinds = list(batch["error_kind"])
    def write(i: int) -> None:
        ref = ImageRef(str(batch["identity"][i]), str(batch["split"][i]), str(batch["name"][i]), "")
        target = join(out_uri, ref.identity, ref.split, output_name(ref.name))
        try:
            data = encode_png(batch["image"][i])
            write_staged(target, data, run_id, root=out_uri)
            uris[i], out_sha[i], out_bytes[i] = target, sha256_hex(data), len(data)
        except Exception as exc:
            errors[i], kinds[i] = f"cannot write output: {type(exc).__name__}: {exc}", ERROR_RUNTIME

    todo = [i for i in range(n) if not batch["skipped"][i] and not errors[i]]
    if len(todo) > 1:
        # Concurrent writes: on an object store each is a round trip (PNG encoding releases the GIL in zlib).
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(8, len(todo))) as pool:
            list(pool.map(write, todo))
    else:
        for i in todo:
            write(i)
    result = {k: batch[k] for k in batch if k not in ("image", "input_image")}
    result.update(
        uri=object_column(uris),
        output_sha256=object_column(out_sha),
        output_bytes=out_bytes,
        error=object_column(errors),
        error_kind=object_column(kinds),
        stage=np.array([stage] * n, dtype=object),
        config_hash=np.array([config_hash] * n, dtype=object),
    )
    return result


def lost_rows(items: list[dict], stage: str, config_hash: str) -> pa.Table:
    """Runtime error rows for listed inputs whose worker died for good (the engine's `Lost`): retried by the
    next run, like any runtime error."""
    from raypdm.pipelines.engine import LOST_ERROR

    return pa.Table.from_pylist([
        {"identity": it["identity"], "split": it["split"], "name": it["name"], "src_uri": it["src_uri"],
         "stage": stage, "config_hash": config_hash, "error": f"transform failed: {LOST_ERROR}",
         "error_kind": ERROR_RUNTIME} for it in items])


def stage_placement(stage: ImageStage):
    """Where one transform actor of `stage` runs (engine.placement: one placement rule for every stage)."""
    from raypdm.pipelines.engine import placement

    pools = len(stage.make_transform) if isinstance(stage.make_transform, list) else 1
    scorers = _SCORER_CPUS * stage.scorer_workers if stage.make_scorer else 0.0
    return placement(actors=max(1, stage.workers) * pools, uses_gpu=stage.uses_gpu,
                     gpus_per_worker=stage.gpus_per_worker, cpus_per_worker=stage.cpus_per_worker,
                     reserved_cpus=scorers)


_OPTIONAL_STRINGS = ("uri", "input_sha256", "output_sha256", "error", "error_kind")


_OPTIONAL_NUMBERS = {"input_bytes": pa.int64(), "output_bytes": pa.int64(), "input_mtime": pa.float64()}


def _with_nulls(table: pa.Table) -> pa.Table:
    """Ray-side markers ("" for strings, -1 for sizes, NaN for times) back to nulls, with the manifest's types."""
    import pyarrow.compute as pc

    for name in _OPTIONAL_STRINGS:
        if name in table.column_names:
            col = table.column(name).cast(pa.string())
            col = pc.if_else(pc.equal(col, ""), pa.scalar(None, pa.string()), col)
            table = table.set_column(table.column_names.index(name), name, col)
    for name, typ in _OPTIONAL_NUMBERS.items():
        if name in table.column_names:
            col = table.column(name).cast(typ)
            missing = pc.is_nan(col) if pa.types.is_floating(typ) else pc.less(col, 0)
            col = pc.if_else(missing, pa.scalar(None, typ), col)
            table = table.set_column(table.column_names.index(name), name, col)
    return conform(table)



# Above this many inputs the driver does not pre-hash them (the pipeline's readers do it in parallel).
_DRIVER_CHECK_MAX = 5_000


def all_inputs_done(refs: list[ImageRef], config_hash: str, done: frozenset[str]) -> bool:
    """True when every input's key (its current bytes' sha256 + this config) is already in the manifest."""
    if len(done) < len(refs) or len(refs) > _DRIVER_CHECK_MAX:
        return False
    from concurrent.futures import ThreadPoolExecutor

    from raypdm.data.manifest import row_key
    from raypdm.data.uri import read_bytes

    def key(ref: ImageRef) -> str | None:
        try:
            return row_key(ref.identity, ref.split, ref.name, sha256_hex(read_bytes(ref.src_uri)), config_hash)
        except Exception:  # unreadable now: let the pipeline record the error row
            return None

    with ThreadPoolExecutor(max_workers=8) as pool:
        return all(k is not None and k in done for k in pool.map(key, refs))


def run_image_stage(
    stage: ImageStage,
    input_uri: str,
    output_uri: str,
    *,
    identities: list[str] | None = None,
    splits: tuple[str, ...] | list[str] = SPLITS,
    refs: list[ImageRef] | None = None,
    progress: Callable[[int, int], None] | None = None,
    flush_rows: int = 256,
    flush_seconds: float = 2.0,
    verify: Verify = "size",
    follow_symlinks: bool = False,
) -> StageSummary:
    """Run one stage over a dataset and return its summary. Safe to re-run, and to re-run after a kill at
    any moment: finished rows whose outputs verify are skipped, everything else is done (again).

    verify: how finished outputs are checked against their rows: "size" (a listing), or "full" (sha256 of
    every output and input).
    flush_rows, flush_seconds: rows are made durable (and their files renamed into place) at least this
    often; what a kill loses is at most that much work, and a part file per flush is cheap."""
    from raypdm.data.roots import check_apart

    t0 = time.perf_counter()
    check_apart(output_uri, {"input": input_uri})  # never write into the input (raises RootOverlapError)
    problems: list[str] = []
    if refs is None:
        refs, problems = list_images(input_uri, identities=identities, splits=splits,
                                     follow_symlinks=follow_symlinks)
    summary = StageSummary(stage=stage.name, output=output_uri, total=len(refs), problems=problems)
    output = StageOutput(output_uri, stage.manifest_kind, summary)
    latest = output.open()  # a killed run's staged files: renamed into place if their rows are durable
    plan = plan_resume(refs, latest, stage.config_hash, output_uri, verify)
    summary.skipped, summary.verified, summary.recomputed = plan.skipped, plan.verified, dict(plan.recomputed)
    if not plan.todo:
        # Nothing left: no Ray Data pipeline, no actors, no models loaded, no Ray started here.
        if progress and refs:
            progress(len(refs), len(refs))
        output.close()
        summary.seconds = time.perf_counter() - t0
        return summary

    from raypdm.pipelines.engine import Lost, Pool, Tasks, location, stream

    where = stage_placement(stage)
    batch = max(1, stage.batch_size)
    steps: list[Tasks | Pool] = [Tasks(load_batch, batch_size=batch, kwargs={
        "config_hash": stage.config_hash, "done_keys": plan.done_keys, "max_pixels": stage.max_pixels})]
    parts = stage.make_transform if isinstance(stage.make_transform, list) else [stage.make_transform]
    for k, make in enumerate(parts):
        keep_input = k == 0 and stage.make_scorer is not None
        if stage.uses_model:
            steps.append(Pool(_TransformWorker, (make, keep_input, where.threads), size=max(1, stage.workers),
                              batch_size=batch, placement=where))
        else:
            steps.append(Tasks(_transform_task, {"make_transform": make, "keep_input": keep_input},
                               batch_size=batch, num_cpus=where.num_cpus))
    if stage.make_scorer is not None:
        steps.append(Pool(_ScoreWorker, (stage.make_scorer,), size=max(1, stage.scorer_workers), batch_size=batch,
                          num_cpus=_SCORER_CPUS))
    steps.append(Tasks(_write_batch, batch_size=batch, kwargs={
        "out_uri": output_uri, "stage": stage.name, "config_hash": stage.config_hash, "run_id": output.run_id}))

    def to_rows(table: pa.Table) -> pa.Table:
        skipped = table.column("skipped").to_pylist()
        summary.skipped += sum(skipped)
        return _with_nulls(table.filter(pa.array([not s for s in skipped])).drop_columns(["skipped"]))

    lost = Lost(item_ids=lambda item: [location(item["identity"], item["split"], item["name"])],
                rows_for=lambda items: lost_rows(items, stage.name, stage.config_hash))
    try:
        stream(ref_items(plan.todo), steps, to_rows=to_rows, output=output, flush_rows=flush_rows,
               flush_seconds=flush_seconds, lost=lost,
               progress=(lambda seen: progress(plan.skipped + seen, len(refs))) if progress else None)
    finally:
        output.close()
    summary.seconds = time.perf_counter() - t0
    return summary
