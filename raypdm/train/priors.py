"""Class-prior images for DreamBooth's prior preservation (paper: 200 images of "a photo of a person"
from the base model), generated once on a Ray Data actor pool and shared by every identity.

    cfg = ClassPriorConfig(preset="tiny", count=8, steps=2, resolution=64)
    folder = generate_class_images(cfg, "s3://bucket/cache/class-priors")
    # folder = <cache_root>/sd21-base-tiny/<key>/  with 00000.png ... 00007.png, manifest.parquet, prior.json

The folder is named by a hash of everything that changes the pixels (model, prompt, count, seed, steps,
guidance, resolution, scheduler, preset, weights), so any identity asking for the same priors gets the
same folder:

- cached: when every image is there and the manifest is compacted, a call writes nothing and starts no
  Ray work;
- resumable: an interrupted run (or a deleted image) generates only the missing images;
- concurrent callers of one key (identities trained in parallel) take a per-key lease from one named Ray
  actor in the "raypdm" namespace: one generates, the others wait and then find the folder complete. The
  lease is renewed while its holder works, so a holder that dies frees it after `lease_s` (120 s).

Generation: the stage engine's actor pool (pipelines/engine.py; images staged, then renamed once their rows
are durable, so a killed run never leaves a half-written image), the base model loaded once per actor on its
device, one pipeline call per batch, and per image a CPU `torch.Generator().manual_seed(seed_i)` with
seed_i = `prior_seed(seed, i)`: image i is the same whichever batch or machine draws it (batched float
kernels may move a pixel by one grey level between batches of different sizes; the same batch is
bit-identical). Classifier-free guidance with the empty unconditional prompt, as diffusers' DreamBooth
script generates its class images; PNDM (the SD 2.1-base hub sampler) by default.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from raypdm.config import StrictModel, Uri, config_hash
from raypdm.train.prompts import CDLPrompts

log = logging.getLogger(__name__)

__all__ = [
    "ClassPriorConfig",
    "ClassPriorSection",
    "class_prior_key",
    "class_prior_uri",
    "generate_class_images",
    "missing_class_images",
    "prior_seed",
]

MODEL = "sd21-base"
INFO_FILE = "prior.json"
_LOCK_NAMESPACE = "raypdm"


class ClassPriorConfig(StrictModel):
    """Which class-prior images to make and how. Defaults are the paper's (200 images, 50 steps, 7.5)."""

    model: Literal["sd21-base"] = MODEL
    prompt: str = Field(default_factory=lambda: CDLPrompts().prior_generation_prompt())
    count: int = Field(200, ge=1, le=100_000)
    seed: int = Field(0, ge=0)
    steps: int = Field(50, ge=1, le=1000)
    guidance: float = Field(7.5, ge=0.0, allow_inf_nan=False, description="diffusers guidance_scale (≤1: none)")
    resolution: int = Field(512, ge=8, le=2048)
    scheduler: Literal["pndm", "ddim", "dpm", "euler", "model"] = Field(
        "pndm", description="'model' = the loaded model's own (DDPM training) scheduler"
    )
    preset: Literal["tiny", "full"] = "tiny"
    weights_dir: str | None = Field(None, description="real weights (<dir>/sd21-base/) for the full preset")
    workers: int = Field(1, ge=1, le=10_000)
    batch_size: int = Field(8, ge=1, le=1024)
    gpus_per_worker: float = Field(1.0, ge=0, le=8)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt is empty")
        return v

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"resolution must be a multiple of 8 (the VAE's downsampling), got {v}")
        return v

    @property
    def weights(self) -> str | None:
        """The weights the images come from: None means the preset's seeded random weights."""
        from raypdm.models.context import ModelContext

        real = ModelContext(preset=self.preset, weights_dir=self.weights_dir).real_weights
        return str(self.weights_dir) if real else None

    def key_fields(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "prompt": self.prompt,
            "count": self.count,
            "seed": self.seed,
            "steps": self.steps,
            "guidance": self.guidance,
            "resolution": self.resolution,
            "scheduler": self.scheduler,
            "preset": self.preset,
            "weights": self.weights,
        }


class ClassPriorSection(ClassPriorConfig):
    """A job's `class_prior:` section (train, sweep, red-team): `ClassPriorConfig`'s fields, typed and
    validated with the job's config. `preset`, `weights_dir`, `prompt` and `resolution` left out (None) are
    the job's: its preset and weights, the prompts' prior-generation prompt, the training resolution."""

    preset: Literal["tiny", "full"] | None = Field(None, description="None: the job's preset")
    weights_dir: Uri | None = Field(None, description="None: the job's weights_dir")
    prompt: str | None = Field(None, description="None: the prompts' prior-generation prompt")
    resolution: int | None = Field(None, ge=8, le=2048, description="None: the training resolution")
    cache: Uri | None = Field(
        None, description="class-image cache folder (content-keyed, safe to share between jobs); None: <output>/_class_priors"
    )

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str | None) -> str | None:  # replaces ClassPriorConfig's: None is allowed here
        if v is not None and not v.strip():
            raise ValueError("prompt is empty")
        return v

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, v: int | None) -> int | None:
        if v is not None and v % 8:
            raise ValueError(f"resolution must be a multiple of 8 (the VAE's downsampling), got {v}")
        return v

    def resolve(self, *, preset: str, weights_dir: str | None, prompt: str, resolution: int) -> ClassPriorConfig:
        """The full `ClassPriorConfig`, the job's values filling what the section leaves out."""
        fields = self.model_dump(exclude={"cache"})
        defaults = {"preset": preset, "weights_dir": weights_dir, "prompt": prompt, "resolution": resolution}
        for name, value in defaults.items():
            if fields[name] is None:
                fields[name] = value
        return ClassPriorConfig.model_validate(fields)


def class_prior_cache(section: ClassPriorSection, output: str) -> str:
    """Where a job's class images are cached: the section's `cache`, else `<output>/_class_priors`."""
    from raypdm.data.uri import join

    return section.cache or join(output, "_class_priors")


def class_prior_key(cfg: ClassPriorConfig) -> str:
    return config_hash(cfg.key_fields())


def class_prior_uri(cfg: ClassPriorConfig, cache_root: str) -> str:
    from raypdm.data.uri import join

    return join(str(cache_root), f"{cfg.model}-{cfg.preset}", class_prior_key(cfg)) + "/"


def prior_seed(seed: int, index: int) -> int:
    """The generator seed of class image `index` (63 bits: fits int64 and manual_seed)."""
    digest = hashlib.sha256(f"raypdm.priors/{int(seed)}/{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def image_name(index: int) -> str:
    return f"{index:05d}.png"


def _listing(folder: str) -> set[str]:
    from raypdm.data.uri import fs_and_path

    fs, path = fs_and_path(folder)
    path = path.rstrip("/")
    try:
        fs.invalidate_cache(path)
    except Exception:
        pass
    if not fs.exists(path):
        return set()
    return {posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)}


def missing_class_images(cfg: ClassPriorConfig, cache_root: str) -> list[int]:
    """Indices whose image is not in the folder yet."""
    names = _listing(class_prior_uri(cfg, cache_root))
    return [i for i in range(cfg.count) if image_name(i) not in names]


# ------------------------------------------------------------------------------------------ lock


class _KeyLockActor:
    """Leases by key: whoever holds one renews it; an expired lease (its holder died) can be taken over."""

    def __init__(self) -> None:
        self.leases: dict[str, tuple[str, float]] = {}

    def acquire(self, key: str, token: str, lease_s: float) -> bool:
        now = time.time()
        holder, until = self.leases.get(key, (None, 0.0))
        if holder in (None, token) or now > until:
            self.leases[key] = (token, now + lease_s)
            return True
        return False

    def renew(self, key: str, token: str, lease_s: float) -> bool:
        if self.leases.get(key, (None, 0.0))[0] == token:
            self.leases[key] = (token, time.time() + lease_s)
            return True
        return False

    def release(self, key: str, token: str) -> None:
        if self.leases.get(key, (None, 0.0))[0] == token:
            del self.leases[key]


_REMOTE_LOCK: Any = None
_LOCK_HANDLE: Any = None
_LOCK_NAME = "raypdm-class-prior-locks"


def _lock_handle(fresh: bool = False):
    """The cluster's one lock actor (named, in the "raypdm" namespace; made by the first caller)."""
    global _REMOTE_LOCK, _LOCK_HANDLE
    import ray

    if _REMOTE_LOCK is None:
        _REMOTE_LOCK = ray.remote(num_cpus=0, max_restarts=0)(_KeyLockActor)
    job = ray.get_runtime_context().get_job_id()  # a handle is only good in the Ray session that made it
    if _LOCK_HANDLE is None or fresh or _LOCK_HANDLE[0] != job:
        handle = _REMOTE_LOCK.options(name=_LOCK_NAME, namespace=_LOCK_NAMESPACE, get_if_exists=True).remote()
        _LOCK_HANDLE = (job, handle)
    return _LOCK_HANDLE[1]


@contextmanager
def _key_lock(key: str, lease_s: float = 120.0, poll_s: float = 0.5) -> Iterator[None]:
    """Hold the lease on `key` while the body runs (renewed in a thread)."""
    import ray
    from ray.exceptions import RayActorError

    token = uuid.uuid4().hex
    fresh = False
    while True:
        try:
            lock = _lock_handle(fresh)
            if ray.get(lock.acquire.remote(key, token, lease_s)):
                break
            fresh = False
        except RayActorError:  # the actor's owner (an earlier caller's process) exited: make a new one
            fresh = True
        time.sleep(poll_s)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(lease_s / 4):
            try:
                ray.get(lock.renew.remote(key, token, lease_s))
            except Exception:  # the lock actor is gone: the work is idempotent, keep going
                return

    thread = threading.Thread(target=renew, daemon=True, name=f"lease-{key}")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        try:
            ray.get(lock.release.remote(key, token))
        except Exception:
            pass


# --------------------------------------------------------------------------------------- workers


def build_scheduler(base, name: str):
    """A sampling scheduler built from the model's scheduler config ('model' keeps its own class)."""
    from raypdm.sample.decoupled import SCHEDULERS

    if name == "model":
        return type(base).from_config(base.config)
    extra = {"skip_prk_steps": True} if name == "pndm" else {}
    return SCHEDULERS[name].from_config(base.config, **extra)


def load_base_pipeline(preset: str, weights: str | None, device: str):
    """The base SD 2.1 pipeline: real weights from `weights` (set only at the full preset, see
    `ClassPriorConfig.weights`) or the preset's seeded random weights, from the one model context."""
    from raypdm.models.context import ModelContext

    parts = ModelContext(device=str(device), preset=preset, weights_dir=weights).model(MODEL, fresh=True)
    pipe = parts.to_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _PriorWorker:
    """One actor: loads the base model once, then draws batches of class images and writes them."""

    def __init__(self, cfg: dict[str, Any], folder: str, threads: int | None, run_id: str = ""):
        import torch

        from raypdm.runtime import default_device

        if threads:
            torch.set_num_threads(threads)
        self.cfg = ClassPriorConfig.model_validate(cfg)
        self.key = class_prior_key(self.cfg)
        self.folder = folder
        self.run_id = run_id
        self.device = default_device()
        self.pipe = load_base_pipeline(self.cfg.preset, self.cfg.weights, self.device)
        self.pipe.scheduler = build_scheduler(self.pipe.scheduler, self.cfg.scheduler)

    def _generate(self, seeds: list[int]) -> list[np.ndarray]:
        import torch

        cfg = self.cfg
        with torch.no_grad():
            out = self.pipe(
                prompt=[cfg.prompt] * len(seeds),
                guidance_scale=cfg.guidance,
                num_inference_steps=cfg.steps,
                height=cfg.resolution,
                width=cfg.resolution,
                generator=[torch.Generator().manual_seed(int(s)) for s in seeds],
                output_type="np",
            ).images
        return [np.clip(np.rint(np.asarray(x) * 255.0), 0, 255).astype(np.uint8) for x in out]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from raypdm.data.commit import write_staged
        from raypdm.data.decode import encode_png, sha256_hex
        from raypdm.data.uri import join
        from raypdm.pipelines.engine import row_columns

        indices = [int(i) for i in batch["index"]]
        seeds = [int(s) for s in batch["seed"]]
        rows: list[dict[str, Any]] = [{"index": i, "seed": s} for i, s in zip(indices, seeds, strict=True)]
        t0 = time.perf_counter()
        try:
            images = self._generate(seeds)
        except Exception as exc:
            images = None
            for row in rows:
                row["error"] = f"generation failed: {type(exc).__name__}: {exc}"
        seconds = (time.perf_counter() - t0) / max(1, len(rows))
        for row, image in zip(rows, images or [None] * len(rows), strict=True):
            row["seconds"] = seconds
            if image is None:
                continue
            target = join(self.folder, image_name(row["index"]))
            try:
                # Under its staged name: the driver renames it once its row is durable (data/commit.py).
                data = encode_png(image)
                write_staged(target, data, self.run_id, root=self.folder)
                row.update(uri=target, output_sha256=sha256_hex(data), output_bytes=len(data))
            except Exception as exc:
                row["error"] = f"cannot write output: {type(exc).__name__}: {exc}"
        return row_columns(_rows(self.cfg, self.key, rows), "class_priors")


# ------------------------------------------------------------------------------------- manifest


def _rows(cfg: ClassPriorConfig, key: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Manifest rows (identity = '<model>-<preset>', split = key, name = file name) of generated images."""
    from raypdm.data.manifest import ERROR_RUNTIME

    ident = f"{cfg.model}-{cfg.preset}"
    return [{
        "identity": ident, "split": key, "name": image_name(r["index"]), "uri": r.get("uri"),
        "input_sha256": hashlib.sha256(f"{cfg.prompt}|{r['seed']}".encode()).hexdigest(),
        "output_sha256": r.get("output_sha256"), "output_bytes": r.get("output_bytes"), "stage": "class-prior",
        "config_hash": key, "seconds": float(r.get("seconds") or 0.0), "error": r.get("error"),
        "error_kind": ERROR_RUNTIME if r.get("error") else None,
        "index": int(r["index"]), "seed": int(r["seed"]), "prompt": cfg.prompt,
    } for r in rows]


def _reconcile(cfg: ClassPriorConfig, key: str, folder: str, manifest) -> None:
    """Rows for images that are on disk but not in the manifest (a run interrupted before it flushed)."""
    from raypdm.data.decode import sha256_hex
    from raypdm.data.uri import join, read_bytes

    table = manifest.read()
    have = {
        r["name"] for r in table.select(["name", "error"]).to_pylist() if r["error"] is None
    } if table.num_rows else set()
    names = _listing(folder)
    extra = []
    for i in range(cfg.count):
        name = image_name(i)
        if name in names and name not in have:
            uri = join(folder, name)
            data = read_bytes(uri)
            extra.append({"index": i, "seed": prior_seed(cfg.seed, i), "uri": uri,
                          "output_sha256": sha256_hex(data), "output_bytes": len(data), "seconds": 0.0})
    if extra:
        manifest.append(pa.Table.from_pylist(_rows(cfg, key, extra)))


def _complete(cfg: ClassPriorConfig, folder: str) -> bool:
    from raypdm.data.manifest import Manifest

    names = _listing(folder)
    if any(image_name(i) not in names for i in range(cfg.count)):
        return False
    if Manifest.FILE not in names or INFO_FILE not in names:
        return False
    # Leftover parts are an interrupted run's rows still to fold into the manifest.
    return Manifest.PARTS not in names or not any(
        n.endswith(".parquet") for n in _listing(folder.rstrip("/") + "/" + Manifest.PARTS)
    )


# ------------------------------------------------------------------------------------------ entry


def generate_class_images(
    cfg: ClassPriorConfig,
    cache_root: str,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> str:
    """Make sure the class images of `cfg` exist under `cache_root`; return their folder URI.

    A complete folder returns at once (nothing written, no Ray work). Otherwise only the missing images
    are generated. Raises RuntimeError (after recording them in the manifest) if any image failed.
    """
    import json

    from raypdm.data.uri import join, write_bytes
    from raypdm.pipelines.engine import StageOutput
    from raypdm.pipelines.stage import StageSummary
    from raypdm.runtime import init_ray

    folder = class_prior_uri(cfg, cache_root)
    if _complete(cfg, folder):
        return folder
    init_ray()
    key = class_prior_key(cfg)
    failures: list[str] = []
    with _key_lock(key):
        if _complete(cfg, folder):  # another caller finished it while we waited
            return folder
        output = StageOutput(folder, "class_priors", StageSummary(stage="class-prior", output=folder), discard=False)
        output.open()  # a killed run's staged images: renamed into place if their rows are durable
        missing = missing_class_images(cfg, cache_root)
        try:
            if missing:
                failures = _generate_missing(cfg, folder, missing, output, progress)
            _reconcile(cfg, key, folder, output.manifest)
        finally:
            output.close()
        names = _listing(folder)
        if INFO_FILE not in names:
            info = {"key": key, **cfg.key_fields(), "files": [image_name(i) for i in range(cfg.count)]}
            write_bytes(join(folder, INFO_FILE), json.dumps(info, indent=2).encode())
    if failures:
        shown = "; ".join(failures[:3])
        raise RuntimeError(f"{len(failures)} of {cfg.count} class images failed under {folder}: {shown}")
    return folder


def _generate_missing(
    cfg: ClassPriorConfig,
    folder: str,
    missing: list[int],
    output,
    progress: Callable[[int, int], None] | None,
) -> list[str]:
    """Draw the `missing` images on the stage engine's actor pool; the failed ones as 'name: error'."""
    from raypdm.pipelines.engine import LOST_ERROR, Lost, Pool, location, placement, stream

    items = [{"index": i, "seed": prior_seed(cfg.seed, i)} for i in missing]
    batch = max(1, cfg.batch_size)
    size = max(1, min(cfg.workers, -(-len(items) // batch)))
    where = placement(actors=size, gpus_per_worker=cfg.gpus_per_worker)
    worker = Pool(_PriorWorker, (cfg.model_dump(mode="json"), folder, where.threads, output.run_id), size=size,
                  batch_size=batch, placement=where)
    failures: list[str] = []

    def to_rows(table: pa.Table) -> pa.Table:
        failures.extend(f"{name}: {error}" for name, error in
                        zip(table.column("name").to_pylist(), table.column("error").to_pylist()) if error)
        return table

    ident, key = f"{cfg.model}-{cfg.preset}", class_prior_key(cfg)

    def lost_rows(lost_items: list[dict]) -> pa.Table:
        rows = _rows(cfg, key, [{**it, "error": f"generation failed: {LOST_ERROR}"} for it in lost_items])
        failures.extend(f"{r['name']}: {r['error']}" for r in rows)
        return pa.Table.from_pylist(rows)

    lost = Lost(item_ids=lambda it: [location(ident, key, image_name(it["index"]))], rows_for=lost_rows)
    # Every batch is committed as it arrives (flush_rows=1): an interruption keeps it.
    stream(items, [worker], to_rows=to_rows, output=output, flush_rows=1, lost=lost,
           progress=(lambda seen: progress(seen, len(items))) if progress else None)
    return failures
