"""The one way every stage runs: work items -> Ray Data steps -> manifest rows -> the commit order.

    stage: its work items (plain dicts: an image ref, a prompt x seeds unit, an identity's images, a class
           image index), what is left of them after its resume plan
      ─▶ ray.data.from_items ─▶ steps, in order:
             Tasks  cheap work (decode, encode + write): plain Ray tasks with a CPU share
             Pool   a model: an actor pool, the worker class constructed once per actor (the model loads
                    once), its GPUs/CPUs/threads from `placement`
      ─▶ the driver turns each result batch into typed rows of the stage's manifest kind (`to_rows`)
      ─▶ StageOutput.commit: rows durable first, then the staged files renamed into place
         (data/commit.py: a file under its final name always has a row), at least every `flush_rows`
         rows or `flush_seconds`, and always once more when the stream stops, even by an exception.

A stage supplies the items, the steps and `to_rows`; recovery of a killed run's staged files, the commit
order, error and processed counts and progress are here, so every stage gets the same guarantees.
"""

from __future__ import annotations

import logging
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

log = logging.getLogger(__name__)

__all__ = ["LOST_ERROR", "Lost", "Placement", "location", "row_locations", "Pool", "Tasks", "StageOutput", "placement", "row_columns", "stream"]

# Ray Data's read/decode and encode/write tasks need CPU tokens too: on a CPU-only cluster the model actors
# together take at most what is left after this reserve (half the CPUs, at most one).
_RESERVE_FRACTION = 0.5


@dataclass(frozen=True)
class Placement:
    """Where one model actor runs: its Ray resources, and torch threads for CPU actors (None on GPUs)."""

    num_cpus: float
    num_gpus: float
    threads: int | None

    @property
    def remote_args(self) -> dict[str, float]:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}


def placement(*, actors: int, uses_gpu: bool = True, gpus_per_worker: float = 1.0,
              cpus_per_worker: float | None = None, reserved_cpus: float = 0.0) -> Placement:
    """Resources of one model actor of a stage that runs `actors` model actors in all (every pool).

    With GPUs in the cluster a GPU actor takes `gpus_per_worker` GPUs and one CPU. On a CPU-only cluster the
    actors' CPU shares are scheduling tokens (the OS shares the real cores): if they added up to every CPU,
    Ray Data's read and write tasks would never be scheduled and the stream would stall silently, so all
    actors together take at most the CPUs left after a reserve and `reserved_cpus` (scorer pools). Each CPU
    actor then gets torch threads = the smallest node's CPUs / actors: Ray pins OMP_NUM_THREADS to the
    (fractional) share, i.e. one thread, which would leave the other cores idle; more threads than cores
    would make every actor many times slower."""
    import ray

    from raypdm.runtime import init_ray

    init_ray()  # the cluster decides (a no-op once Ray is up; callers reach here only with work to do)
    cluster = ray.cluster_resources()
    actors = max(1, actors)
    gpus = gpus_per_worker if (uses_gpu and cluster.get("GPU", 0) > 0) else 0.0
    cpus = cpus_per_worker
    if cpus is None and gpus:
        cpus = 1.0
    elif cpus is None:
        total = cluster.get("CPU", 1)
        reserve = min(1.0, total * _RESERVE_FRACTION)
        cpus = min(1.0, max(0.01, (total - reserve - reserved_cpus) / actors))
    threads = None
    if not gpus:
        node_cpus = [n["Resources"].get("CPU", 1) for n in ray.nodes() if n.get("Alive")] or [1]
        threads = max(1, int(min(node_cpus) // actors))
    return Placement(num_cpus=float(cpus), num_gpus=float(gpus), threads=threads)


def row_columns(rows: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """Rows (dicts, any subset of the fields) as the columns a worker returns to Ray Data: every base column
    and every column `kind` declares, in object arrays (None where a row has no value), so all batches of a
    stage have one set of columns whatever each row carries; `StageOutput.commit` gives them their types."""
    import numpy as np

    from raypdm.data.manifest import MANIFEST_COLUMNS
    from raypdm.data.schemas import EXTRA_COLUMNS

    names = [*MANIFEST_COLUMNS, *EXTRA_COLUMNS[kind]]
    unknown = sorted({k for r in rows for k in r} - set(names))
    if unknown:
        raise ValueError(f"columns {unknown} are not declared for {kind} manifests (raypdm/data/schemas.py)")
    out = {}
    for name in names:
        col = np.empty(len(rows), dtype=object)
        col[:] = [r.get(name) for r in rows]
        out[name] = col
    return out


@dataclass
class Tasks:
    """A step of plain Ray tasks: `fn(batch, **kwargs)` (cheap: building its state per batch costs nothing)."""

    fn: Callable[..., dict]
    kwargs: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 8
    num_cpus: float = 0.25


@dataclass
class Pool:
    """A step run by an actor pool: `worker(*args)` once per actor (its model loads once), then called with
    each batch. `placement` None: a light pool (scorers) with `num_cpus` and no GPU.

    one_at_a_time: heavy items (an identity's protection, minutes each) are given to an actor only when it is
    free, so a second actor never waits behind a queue on the first."""

    worker: type
    args: tuple = ()
    size: int = 1
    batch_size: int = 8
    placement: Placement | None = None
    num_cpus: float = 0.25
    one_at_a_time: bool = False


LOST_ERROR = "its worker died and was retried (out of memory? a crash in native code?): see the Ray logs"


def location(identity, split, name) -> str:
    """The id of one output location: what `Lost` matches work items and result rows by."""
    return f"{identity}/{split}/{name}"


def row_locations(table: pa.Table) -> list[str]:
    cols = [table.column(c).to_pylist() for c in ("identity", "split", "name")]
    return [location(*k) for k in zip(*cols)]


@dataclass
class Lost:
    """What a stream does with items whose worker died for good (killed by the OS for memory, a crash in
    native code, a node lost): Ray restarts the actor and retries the item `retries` times, then the stream
    carries on without it and, once it ends, the stage's rows for the lost items (`rows_for(items)`:
    runtime error rows, retried by the next run) are committed. Ray Data alone would retry such an item
    forever (a run that never ends) or, with retries limited, fail the whole run.

    item_ids(item): the output locations (`location(identity, split, name)`) an item's rows will have; an
    item is lost when any of them never comes back."""

    item_ids: Callable[[dict], list[str]]
    rows_for: Callable[[list[dict]], pa.Table]
    retries: int = 1


@dataclass
class StageOutput:
    """A stage's manifest and output root: recovery before, the commit order during, compaction after.

    files: the stage writes output files under staged names (False: rows only, e.g. scores).
    discard: an input that now fails leaves no output of an earlier run behind (layout outputs only).
    summary: anything with `processed`, `errors`, `rolled_forward` and `cleaned` counters."""

    root: str
    kind: str
    summary: Any
    files: bool = True
    discard: bool = True

    def __post_init__(self) -> None:
        from raypdm.data.manifest import Manifest

        self.manifest = Manifest(self.root, kind=self.kind)

    @property
    def run_id(self) -> str:
        return self.manifest.run_id

    def open(self) -> list[dict]:
        """The manifest's latest rows, after finishing (or removing) what a killed run left staged."""
        from raypdm.data.commit import recover

        latest = self.manifest.read().to_pylist()
        if self.files:
            recovery = recover(self.root, latest)
            self.summary.rolled_forward, self.summary.cleaned = recovery.rolled_forward, recovery.removed
        return latest

    def commit(self, rows: pa.Table) -> None:
        """Make `rows` durable, then publish their staged files; count them into the summary."""
        from raypdm.data.commit import discard_stale, publish

        if not rows.num_rows:
            return
        rows = self.manifest.stamp(rows)
        errors = rows.num_rows - rows.column("error").null_count
        self.summary.errors += errors
        self.summary.processed += rows.num_rows - errors
        self.manifest.append(rows)
        if self.files:
            publish(rows, self.run_id)
            if self.discard:
                discard_stale(self.root, rows)

    def close(self) -> None:
        self.manifest.compact()


def stream(
    items: list[dict],
    steps: list[Tasks | Pool],
    *,
    to_rows: Callable[[pa.Table], pa.Table],
    output: StageOutput,
    progress: Callable[[int], None] | None = None,
    flush_rows: int = 256,
    flush_seconds: float = 2.0,
    blocks: int | None = None,
    lost: Lost | None = None,
) -> None:
    """Run `items` through `steps` on Ray Data and commit the rows `to_rows` makes of each result batch.

    progress(n): called with how many items' results have come back so far. blocks: how many blocks the
    items are cut into (default: one per first-step batch, at most 200), i.e. how finely work spreads.
    lost: turn items whose worker died for good into error rows instead of failing the run (see `Lost`)."""
    import ray.data

    from raypdm.runtime import init_ray

    if not items:
        return
    init_ray()
    first = steps[0].batch_size if steps else 1
    n_blocks = blocks or max(1, min(-(-len(items) // max(1, first)), 200))
    ctx = ray.data.DataContext.get_current()
    errored_before = ctx.max_errored_blocks
    if lost is not None:
        ctx.max_errored_blocks = -1  # a block whose task failed for good is dropped; its items are found below
    ds = ray.data.from_items(items, override_num_blocks=min(n_blocks, len(items)))
    tag = uuid.uuid4().hex[:8]
    for step in steps:
        if isinstance(step, Tasks):
            ds = ds.map_batches(step.fn, batch_size=step.batch_size, fn_kwargs=step.kwargs, num_cpus=step.num_cpus)
            continue
        size = max(1, step.size)
        pool = ray.data.ActorPoolStrategy(
            min_size=1, max_size=size, initial_size=size,
            max_tasks_in_flight_per_actor=1 if step.one_at_a_time else None,
        )
        resources = step.placement.remote_args if step.placement else {"num_cpus": step.num_cpus}
        with warnings.catch_warnings():
            # Ray Data retries an actor task forever by default (max_task_retries=-1): an item that kills its
            # actor every time would hang the run. Ray's own note says to pass max_task_retries here; it is
            # deprecated for Ray 2.64 with no named replacement yet (we pin 2.60).
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated", category=Warning)
            retries = {"max_task_retries": lost.retries} if lost else {}
            ds = ds.map_batches(_tagged(step.worker, tag), fn_constructor_args=step.args,
                                batch_size=step.batch_size, compute=pool, **resources, **retries)

    pending: list[pa.Table] = []
    pending_rows, last_flush, seen = 0, time.monotonic(), 0
    came_back: set[str] = set()

    def flush() -> None:
        nonlocal pending, pending_rows, last_flush
        if pending:
            output.commit(pa.concat_tables(pending, promote_options="permissive"))
        pending, pending_rows, last_flush = [], 0, time.monotonic()

    try:
        for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            seen += table.num_rows
            if lost is not None:
                came_back.update(row_locations(table))
            rows = to_rows(table)
            if rows is not None and rows.num_rows:
                pending.append(rows)
                pending_rows += rows.num_rows
            if pending_rows >= flush_rows or time.monotonic() - last_flush > flush_seconds:
                flush()
            if progress:
                progress(seen)
        if lost is not None:
            missing = [item for item in items if not came_back.issuperset(lost.item_ids(item))]
            if missing:
                pending.append(lost.rows_for(missing))
    finally:
        # Whatever finished is kept even when the run is interrupted.
        flush()
        ctx.max_errored_blocks = errored_before
        _reap(tag)


def _tagged(worker: type, tag: str) -> type:
    """`worker` under a name unique to one stream (its actors show as MapWorker(MapBatches(<name>))), so
    `_reap` finds exactly this stream's actors."""
    return type(f"{worker.__name__}_{tag}", (worker,), {"__qualname__": f"{worker.__qualname__}_{tag}"})


def _reap(tag: str) -> None:
    """Kill actors of a finished stream that Ray Data left behind.

    Ray Data 2.60 sometimes loses track of a pool actor that died and was restarted while a task failed on it
    (ActorUnavailableError): the restarted actor then lives on after the dataset has finished, holding its
    CPUs or GPUs, and the next stage's pool can starve on a small cluster (a hang, seen on 2 CPUs). Uses Ray's
    debugging actor table (ray._private.state) and the core worker's kill, the call ray.kill makes."""
    try:
        import ray
        from ray._private import state
        from ray._raylet import ActorID

        worker = ray._private.worker.global_worker
        for status in ("ALIVE", "RESTARTING", "PENDING_CREATION"):
            for actor_id, info in state.actors(actor_state_name=status).items():
                if info.get("ActorClassName", "").endswith(f"_{tag}))"):
                    log.info("stopping %s left behind by Ray Data", info["ActorClassName"])
                    worker.core_worker.kill_actor(ActorID.from_hex(actor_id), True)
    except Exception as exc:  # best effort: never fail a finished stage over the clean-up
        log.debug("could not check for leftover actors: %s", exc)
