"""The evaluation stage: identity (IMS, FDFR), quality (Q), faithfulness and the CLIP latent-mismatch probe
for a folder of images, on Ray Data, one Parquet row per image.

    driver: list images ─▶ reference task (per identity: clean reference embeddings; CLIP embeddings of
            the probe's groups) ─▶ from_items ─▶ load_batch (tasks) ─▶ scoring actor pool (all scorers
            load once per actor) ─▶ driver streams rows into the manifest ─▶ summary Parquet + tables

`--images` is any `<identity>/<folder>/<image>` tree: a sampling stage's output (`<identity>/<prompt>/`),
a purified or protected dataset (`<identity>/set_A/`). Faithfulness compares each image with the clean
image of the same identity/folder/name under `--reference` (NaN where there is none, e.g. for generated
images). Rows are keyed like every manifest (identity, folder, name, input sha256, config hash), so a
re-run scores only what is new; a corrupt image is an error row.

Outputs under `--output`:
    manifest.parquet      one row per image: identity, split (folder), name, every metric, face_found, error
    summary.parquet       one row per identity and one "ALL" row: metric means, FDFR, counts
    summary.md            the same as a Markdown table
    mismatch.parquet/png  the probe's per-group summary and its 2-D projection (with `mismatch`)
    reference.parquet     per identity: how many clean reference images had a face (IMS is only as good as it)
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from raypdm.config import Identities, JobConfig, StrictModel, Uri, config_hash
from raypdm.data.decode import sha256_hex
from raypdm.data.layout import SPLITS
from raypdm.data.manifest import in_run_scope

log = logging.getLogger(__name__)

__all__ = ["ALL_METRICS", "EvaluateConfig", "EvaluateSummary", "run_evaluate", "summarise_scores"]

ALL_METRICS = ("ims", "q", "lpips", "ssim", "ms_ssim", "psnr", "mismatch")
FAITHFULNESS = ("lpips", "ssim", "ms_ssim", "psnr")
# Metric columns each metric name adds (the summary averages these).
METRIC_COLUMNS: dict[str, tuple[str, ...]] = {
    "ims": ("ims", "ims_ip", "ims_vgg", "face_found", "face_found_vgg"),
    "q": ("q", "liqe", "liqe_raw", "clip_iqac"),
    "lpips": ("lpips",),
    "ssim": ("ssim",),
    "ms_ssim": ("ms_ssim",),
    "psnr": ("psnr",),
    "mismatch": ("p_noise", "is_noise", "cos_person", "cos_noise"),
}
PSNR_CAP = 100.0  # dB: identical pairs would give +inf, which no mean survives


class IdentityWeights(StrictModel):
    ip_weight: float = Field(0.7, ge=0, description="weight of the InsightFace ArcFace cosine in IMS")
    vgg_weight: float = Field(0.3, ge=0, description="weight of the DeepFace VGG-Face cosine in IMS")
    penalty: float = Field(-1.0, description="score of an image where no face is found (counts toward FDFR)")


class EvaluateConfig(JobConfig):
    images: Uri = Field(description="images to score (fsspec URI): <identity>/<folder>/<image>")
    reference: Uri | None = Field(None, description="clean dataset root (<identity>/set_B/... for IMS)")
    output: Uri = Field(description="output root (fsspec URI)")
    metrics: list[str] = Field(default_factory=lambda: list(ALL_METRICS))
    preset: Literal["tiny", "full"] = "tiny"
    weights_dir: Uri | None = None
    identities: Identities = Field(None, description="comma-separated identity folder names, or all")
    splits: list[str] | None = Field(None, description="only these <identity>/<folder> names (default: all)")
    reference_split: str = Field("set_B", description="the clean split whose mean face embedding IMS compares with")
    class_noun: str = Field("person", min_length=1, description="CLIP-IQAC's prompts: 'a good photo of a {class}'")
    identity: IdentityWeights = Field(default_factory=IdentityWeights)
    settings: dict[str, str] = Field(default_factory=dict, description="labels added to every row (method=…, protection=…)")
    mismatch_groups: dict[str, Uri] = Field(
        default_factory=dict, description="extra image sets for the probe, name -> dataset URI (e.g. protected=…)"
    )
    lpips_backbone: Literal["pretrained", "random"] = "pretrained"
    batch_size: int = Field(8, ge=1, le=4096)
    workers: int = Field(1, ge=1, le=10_000)
    gpus_per_worker: float = Field(1.0, ge=0, le=8)

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, v: list[str]) -> list[str]:
        v = [m.strip().lower().replace("-", "_") for m in v if m.strip()]
        bad = [m for m in v if m not in ALL_METRICS]
        if bad or not v:
            raise ValueError(f"unknown metrics {bad}; choose from {', '.join(ALL_METRICS)}")
        return list(dict.fromkeys(v))

    @field_validator("reference_split")
    @classmethod
    def _known_split(cls, v: str) -> str:
        if v not in SPLITS:
            raise ValueError(f"reference_split must be one of {list(SPLITS)}, got {v!r}")
        return v

    @field_validator("settings")
    @classmethod
    def _plain_settings(cls, v: dict[str, str]) -> dict[str, str]:
        reserved = set(METRIC_COLUMNS) | {c for cols in METRIC_COLUMNS.values() for c in cols}
        reserved |= {"identity", "split", "name", "uri", "src_uri", "error", "error_kind", "seconds"}
        clash = sorted(set(v) & reserved)
        if clash:
            raise ValueError(f"setting names {clash} clash with result columns")
        return {str(k): str(val) for k, val in v.items()}

    @model_validator(mode="after")
    def _needs_reference(self) -> EvaluateConfig:
        if "ims" in self.metrics and not self.reference:
            raise ValueError("metric 'ims' needs `reference` (the clean dataset with the reference split)")
        return self

    def stage_config(self) -> dict[str, Any]:
        """What changes the scores (the row key): not the output, workers or batch size."""
        return {
            "stage": "evaluate", "metrics": sorted(self.metrics), "preset": self.preset, "weights_dir": self.weights_dir,
            "reference": self.reference, "reference_split": self.reference_split, "class_noun": self.class_noun,
            "identity": self.identity.model_dump(), "lpips": self.lpips_backbone, "settings": self.settings,
        }


# ------------------------------------------------------------------------------------------- workers


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _identity_scorer(cfg: EvaluateConfig, device: str):
    from raypdm.metrics.identity import IdentityOptions, IdentityScorer

    options = IdentityOptions(**cfg.identity.model_dump())
    return IdentityScorer(preset=cfg.preset, weights_dir=cfg.weights_dir, device=device, options=options)


def _reference_images(reference: str, identity: str, split: str) -> list[np.ndarray]:
    from raypdm.data.decode import decode_image
    from raypdm.data.layout import list_images
    from raypdm.data.uri import read_bytes

    refs, _ = list_images(reference, identities=[identity], splits=(split,))
    images = []
    for ref in refs:
        if ref.error:
            continue
        try:
            images.append(decode_image(read_bytes(ref.src_uri)))
        except Exception as exc:  # a bad reference image only shrinks the reference set
            log.warning("reference image %s skipped: %s", ref.src_uri, exc)
    return images


def _prepare(cfg: EvaluateConfig, identities: list[str]) -> dict[str, Any]:
    """Ray task: per identity the clean reference embeddings; CLIP embeddings of the probe's groups."""
    device = _device()
    out: dict[str, Any] = {"reference": {}, "reference_counts": {}, "groups": {}, "group_rows": {}}
    if "ims" in cfg.metrics:
        from raypdm.metrics.identity import reference_from_embeddings

        scorer = _identity_scorer(cfg, device)
        for ident in identities:
            images = _reference_images(cfg.reference, ident, cfg.reference_split)
            # one detection + embedding pass serves both the reference and its face count
            embedded = scorer.embed(images) if images else []
            emb = reference_from_embeddings(embedded) if embedded else {"ip": None, "vgg": None}
            found = sum(1 for e in embedded if e.get("ip") is not None)
            out["reference"][ident] = emb
            out["reference_counts"][ident] = (len(images), found)
    if "mismatch" in cfg.metrics:
        from raypdm.metrics.mismatch import MismatchProbe

        probe = MismatchProbe(preset=cfg.preset, weights_dir=cfg.weights_dir, device=device)
        groups = dict(cfg.mismatch_groups)
        if cfg.reference and "clean" not in groups:
            groups = {"clean": cfg.reference, **groups}
        for name, uri in groups.items():
            images = [im for ident in identities for im in _all_images(uri, ident, cfg.splits)]
            if images:
                out["groups"][name] = probe.embed_images(images)
                out["group_rows"][name] = probe.image_rows(out["groups"][name])
    return out


def _all_images(root: str, identity: str, splits: list[str] | None = None) -> list[np.ndarray]:
    from raypdm.data.decode import decode_image
    from raypdm.data.layout import list_images
    from raypdm.data.uri import read_bytes

    try:
        refs, _ = list_images(root, identities=[identity], any_split=True)
    except Exception as exc:
        log.warning("probe group %s: %s", root, exc)
        return []
    images = []
    for ref in refs:
        if splits and ref.split not in splits:
            continue
        try:
            images.append(decode_image(read_bytes(ref.src_uri)))
        except Exception:
            continue
    return images


class _ScoreWorker:
    """Loads every requested scorer once; scores a batch; a failure on one image is that image's error row."""

    def __init__(self, cfg: EvaluateConfig, reference: dict[str, dict[str, np.ndarray | None]] | _Deferred,
                 threads: int | None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        device = _device()
        self.cfg = cfg
        self.identity = _identity_scorer(cfg, device) if "ims" in cfg.metrics else None
        self.quality = None
        if "q" in cfg.metrics:
            from raypdm.metrics.quality import QualityScorer

            self.quality = QualityScorer(preset=cfg.preset, weights_dir=cfg.weights_dir, device=device,
                                         class_noun=cfg.class_noun)
        self.faithfulness = None
        if set(FAITHFULNESS) & set(cfg.metrics):
            from raypdm.pipelines.purify import FaithfulnessColumns

            self.faithfulness = FaithfulnessColumns(cfg.reference, cfg.lpips_backbone == "pretrained", cfg.weights_dir,
                                                    with_lpips="lpips" in cfg.metrics)
            self.faithfulness.scorer.psnr_cap = PSNR_CAP
        self.probe = None
        if "mismatch" in cfg.metrics:
            from raypdm.metrics.mismatch import MismatchProbe

            self.probe = MismatchProbe(preset=cfg.preset, weights_dir=cfg.weights_dir, device=device)
        # Last: the reference embedding ran while the models above loaded.
        self.reference = reference.get() if isinstance(reference, _Deferred) else reference

    def _score(self, images: list[np.ndarray], rows: list[dict[str, str]]) -> list[dict[str, Any]]:
        n = len(images)
        cols: list[dict[str, Any]] = [{} for _ in range(n)]
        if self.identity is not None:
            # One reference per identity: score each identity's images together (still batched).
            by_identity: dict[str, list[int]] = {}
            for i, row in enumerate(rows):
                by_identity.setdefault(row["identity"], []).append(i)
            for ident, idx in by_identity.items():
                ref = self.reference.get(ident) or {"ip": None, "vgg": None}
                for i, s in zip(idx, self.identity.score([images[i] for i in idx], ref)):
                    cols[i].update(s)
        if self.quality is not None:
            for i, s in enumerate(self.quality.score(images)):
                cols[i].update(s)
        if self.faithfulness is not None:
            # Faithfulness of the image to its clean counterpart (the `ref_*` columns of the purify scorer).
            for i, s in enumerate(self.faithfulness.reference_scores(images, rows)):
                cols[i].update({m: s.get(m, math.nan) for m in FAITHFULNESS if m in self.cfg.metrics})
        if self.probe is not None:
            emb = self.probe.embed_images(images)
            for i, s in enumerate(self.probe.image_rows(emb)):
                cols[i].update(s)
                cols[i]["clip_embedding"] = emb[i].astype(np.float32)
        return cols

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from raypdm.data.manifest import ERROR_RUNTIME
        from raypdm.data.read import object_column

        n = len(batch["name"])
        errors, kinds = list(batch["error"]), list(batch["error_kind"])
        todo = [i for i in range(n) if not batch["skipped"][i] and not errors[i]]
        rows = [{k: str(batch[k][i]) for k in ("identity", "split", "name")} for i in range(n)]
        cols: list[dict[str, Any]] = [{} for _ in range(n)]
        seconds = [0.0] * n
        if todo:
            t0 = time.perf_counter()
            try:
                for i, c in zip(todo, self._score([batch["image"][i] for i in todo], [rows[i] for i in todo])):
                    cols[i] = c
                per = (time.perf_counter() - t0) / len(todo)
                for i in todo:
                    seconds[i] = per
            except Exception:
                for i in todo:  # find the image that broke the batch; the others keep their scores
                    t1 = time.perf_counter()
                    try:
                        cols[i] = self._score([batch["image"][i]], [rows[i]])[0]
                    except Exception as exc:
                        errors[i], kinds[i] = f"scoring failed: {type(exc).__name__}: {exc}", ERROR_RUNTIME
                    seconds[i] = time.perf_counter() - t1
        out = {k: batch[k] for k in ("identity", "split", "name", "src_uri", "input_sha256", "skipped")}
        out.update(uri=batch["src_uri"], error=object_column(errors), error_kind=object_column(kinds),
                   seconds=np.asarray(seconds, dtype=np.float64))
        names = [c for m in self.cfg.metrics for c in METRIC_COLUMNS[m]]
        for name in names:
            out[name] = np.array([float(c.get(name, math.nan)) for c in cols], dtype=np.float64)
        if self.probe is not None:
            dim = next((len(c["clip_embedding"]) for c in cols if "clip_embedding" in c), 0)
            empty = np.zeros(dim, dtype=np.float32)
            out["clip_embedding"] = object_column([c.get("clip_embedding", empty) for c in cols])
        for key, value in self.cfg.settings.items():
            out[key] = np.array([value] * n, dtype=object)
        return out


# -------------------------------------------------------------------------------------------- driver


class EvaluateSummary(StrictModel):
    stage: str = "evaluate"
    output: str
    total: int = 0
    processed: int = 0
    skipped: int = 0
    errors: int = 0
    seconds: float = 0.0
    problems: list[str] = Field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


def _to_table(batch: pa.Table) -> pa.Table:
    from raypdm.pipelines.stage import _with_nulls

    if "clip_embedding" in batch.column_names:
        # Ray hands object columns of arrays back as its tensor extension type; store plain float lists.
        col = batch.column("clip_embedding").to_pylist()
        emb = pa.array([None if v is None or len(v) == 0 else [float(x) for x in v] for v in col], pa.list_(pa.float32()))
        batch = batch.set_column(batch.column_names.index("clip_embedding"), "clip_embedding", emb)
    return _with_nulls(batch)


@in_run_scope
def run_evaluate(cfg: EvaluateConfig, *, progress=None) -> EvaluateSummary:
    """Score every image under `cfg.images`; resumable; returns the summary and writes the tables."""
    import ray
    import ray.data

    from raypdm.config import save_resolved_config
    from raypdm.data.layout import list_images
    from raypdm.pipelines.engine import StageOutput, placement
    from raypdm.runtime import init_ray

    t0 = time.perf_counter()
    if "lpips" in cfg.metrics and cfg.lpips_backbone == "pretrained":
        from raypdm.models.preflight import check_models

        check_models([], cfg.weights_dir, lpips=["alex"])  # in the driver, before any work
    refs, problems = list_images(cfg.images, identities=cfg.identities, any_split=True)
    if cfg.splits:
        refs = [r for r in refs if r.split in cfg.splits]
    summary = EvaluateSummary(output=cfg.output, total=len(refs), problems=problems)
    chash = config_hash(cfg.stage_config())
    # Scores are rows only: no output files, so nothing staged to recover or publish.
    output = StageOutput(cfg.output, "evaluate", summary, files=False)
    done = frozenset(output.manifest.done_keys())
    identities = sorted({r.identity for r in refs})

    prepared_key = _prepared_key(cfg, identities, chash)
    if _finished_before(cfg, refs, chash, done, prepared_key):
        # A finished evaluation re-run: same inputs, config and reference/probe images as the run that wrote
        # the tables. No reference embedding, no Ray Data pipeline, no scorer models (the demo's re-run).
        summary.skipped = len(refs)
        if progress:
            progress(len(refs), len(refs))
        summary.seconds = time.perf_counter() - t0
        return summary

    init_ray()  # only now: a finished re-run (above) starts no Ray
    # The scorers hold models, so they get GPUs when the cluster has them (the engine's one placement rule).
    where = placement(actors=cfg.workers, gpus_per_worker=cfg.gpus_per_worker)
    prepared: dict[str, Any] = {"reference": {}, "reference_counts": {}, "groups": {}, "group_rows": {}}
    pending = None  # the reference embedding, while it runs
    memo = ""
    if identities and ({"ims", "mismatch"} & set(cfg.metrics)):
        memo = _prepare_memo_key(cfg, identities, prepared_key)
        if memo in _PREPARED:  # e.g. the cells of a red-team matrix: one reference set, embedded once
            prepared = _PREPARED[memo]
        else:
            prepare = ray.remote(_prepare).options(**where.remote_args, max_retries=2)
            pending = prepare.remote(cfg, identities)

    todo_refs = refs
    try:
        if todo_refs:
            _score_rows(cfg, todo_refs, done, chash, where, output, summary, progress,
                        prepared["reference"] if pending is None else _Deferred(pending))
    except Exception:
        if pending is not None:
            ray.get(pending)  # the reference embedding's own error says more than the actor pool's
        raise
    if pending is not None:
        prepared = ray.get(pending)
        _PREPARED.clear()  # keep one: the embeddings of a large reference set are not small
        _PREPARED[memo] = prepared
    scores = output.manifest.read()
    _write_outputs(cfg, scores, prepared)
    save_resolved_config(cfg, cfg.output)
    from raypdm.data.uri import join, write_bytes

    # Written last: its presence says the tables above belong to these rows and these reference images.
    write_bytes(join(cfg.output, PREPARED_MARKER), json.dumps(prepared_key, sort_keys=True).encode())
    summary.seconds = time.perf_counter() - t0
    return summary


class _Deferred:
    """The reference embedding's ObjectRef, resolved by each scorer actor after it has loaded its models.
    Ray resolves an ObjectRef given as an argument before it starts the actor; one held inside this object it
    does not, so the actors' model loading overlaps the embedding instead of waiting for it."""

    def __init__(self, ref):
        self.refs = [ref]

    def get(self) -> dict[str, Any]:
        import ray

        return ray.get(self.refs[0])["reference"]


def _score_rows(cfg: EvaluateConfig, todo_refs, done: frozenset[str], chash: str, where, output, summary,
                progress, reference) -> None:
    """The scoring pipeline on the stage engine: read (tasks) -> score (actor pool) -> rows committed."""
    from raypdm.data.read import load_batch, ref_items
    from raypdm.pipelines.engine import Lost, Pool, Tasks, location, stream
    from raypdm.pipelines.stage import lost_rows

    batch = cfg.batch_size
    steps = [Tasks(load_batch, {"config_hash": chash, "done_keys": done}, batch_size=batch),
             Pool(_ScoreWorker, (cfg, reference, where.threads), size=cfg.workers, batch_size=batch, placement=where)]

    def to_rows(table: pa.Table) -> pa.Table:
        skipped = table.column("skipped").to_pylist()
        summary.skipped += sum(skipped)
        rows = table.filter(pa.array([not s for s in skipped])).drop_columns(["skipped"])
        rows = rows.append_column("stage", pa.array(["evaluate"] * rows.num_rows, pa.string()))
        rows = rows.append_column("config_hash", pa.array([chash] * rows.num_rows, pa.string()))
        return _to_table(rows)

    lost = Lost(item_ids=lambda item: [location(item["identity"], item["split"], item["name"])],
                rows_for=lambda items: lost_rows(items, "evaluate", chash))
    try:
        stream(ref_items(todo_refs), steps, to_rows=to_rows, output=output, lost=lost,
               progress=(lambda seen: progress(seen, len(todo_refs))) if progress else None)
    finally:
        output.close()


PREPARED_MARKER = "_tables.json"
# The last `_prepare` result in this driver, by `_prepare_memo_key`: what it embeds, from which bytes.
_PREPARED: dict[str, dict[str, Any]] = {}


def _prepare_memo_key(cfg: EvaluateConfig, identities: list[str], prepared_key: dict[str, Any]) -> str:
    """Everything `_prepare`'s result depends on (not the row config: labels, faithfulness metrics)."""
    return json.dumps({
        "metrics": sorted({"ims", "mismatch"} & set(cfg.metrics)), "preset": cfg.preset,
        "weights_dir": cfg.weights_dir, "reference": cfg.reference, "reference_split": cfg.reference_split,
        "splits": cfg.splits, "identities": identities, "sources": prepared_key["sources"],
        "images": prepared_key["images"],
    }, sort_keys=True)


def _prepared_key(cfg: EvaluateConfig, identities: list[str], chash: str) -> dict[str, Any]:
    """What the tables beyond the rows depend on: the row config, and the bytes of the reference images and
    probe groups `_prepare` embeds (a reference image replaced in place changes IMS without changing a row key)."""
    from concurrent.futures import ThreadPoolExecutor

    from raypdm.data.layout import list_images
    from raypdm.data.uri import read_bytes

    sources: list[tuple[str, str]] = []  # (group, dataset root) that `_prepare` reads
    if "ims" in cfg.metrics and cfg.reference:
        sources.append(("reference", cfg.reference))
    if "mismatch" in cfg.metrics:
        groups = dict(cfg.mismatch_groups)
        if cfg.reference and "clean" not in groups:
            groups = {"clean": cfg.reference, **groups}
        sources += sorted(groups.items())
    uris: list[str] = []
    for _, root in sources:
        try:
            found, _ = list_images(root, identities=identities, any_split=True)
        except Exception:  # noqa: BLE001 (a missing group: `_prepare` logs it; the key still differs)
            found = []
        uris += sorted(r.src_uri for r in found)

    def digest(uri: str) -> str:
        try:
            return sha256_hex(read_bytes(uri))
        except Exception:  # noqa: BLE001
            return "unreadable"

    with ThreadPoolExecutor(max_workers=8) as pool:
        hashes = list(pool.map(digest, uris))
    return {"config_hash": chash, "identities": identities, "sources": sources,
            "images": config_hash(dict(zip(uris, hashes)))}


def _finished_before(cfg: EvaluateConfig, refs, chash: str, done: frozenset[str], key: dict[str, Any]) -> bool:
    from raypdm.data.uri import exists, join, read_bytes
    from raypdm.pipelines.stage import all_inputs_done

    marker = join(cfg.output, PREPARED_MARKER)
    if not refs or not exists(marker) or not exists(join(cfg.output, "summary.parquet")):
        return False
    try:
        if json.loads(read_bytes(marker)) != json.loads(json.dumps(key, sort_keys=True)):
            return False
    except ValueError:
        return False
    return all_inputs_done(refs, chash, done)


def summarise_scores(scores, metrics: list[str]):
    """Per identity and overall ("ALL") means of every metric column, FDFR and counts (pandas)."""
    import pandas as pd

    df = scores.to_pandas() if isinstance(scores, pa.Table) else scores
    cols = [c for m in metrics for c in METRIC_COLUMNS[m] if c in df.columns]
    ok = df[df["error"].isna()] if "error" in df.columns else df
    rows = []
    for ident, group in list(ok.groupby("identity", sort=True)) + [("ALL", ok)]:
        row: dict[str, Any] = {"identity": ident, "images": len(group),
                               "errors": int(df["error"].notna().sum()) if ident == "ALL" else
                               int(df[(df["identity"] == ident)]["error"].notna().sum())}
        for c in cols:
            # astype: flags are bools (with nulls where a scorer had nothing), averaged as shares
            row[c] = float(group[c].astype("float64").mean()) if len(group) else math.nan
        if "face_found" in group.columns and len(group):
            from raypdm.metrics.identity import fdfr

            row["fdfr"] = fdfr(group["face_found"].fillna(0.0).tolist())
        rows.append(row)
    return pd.DataFrame(rows)


def _write_outputs(cfg: EvaluateConfig, scores: pa.Table, prepared: dict[str, Any]) -> None:
    import io

    import pandas as pd
    import pyarrow.parquet as pq

    from raypdm.data.uri import join, write_bytes

    def parquet(df: pd.DataFrame, name: str) -> None:
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), sink)
        write_bytes(join(cfg.output, name), sink.getvalue())

    summary = summarise_scores(scores, cfg.metrics)
    for key, value in reversed(list(cfg.settings.items())):
        summary.insert(0, key, value)
    parquet(summary, "summary.parquet")
    write_bytes(join(cfg.output, "summary.md"), _markdown(summary).encode())
    if prepared.get("reference_counts"):
        ref = pd.DataFrame(
            [{"identity": k, "reference_images": v[0], "reference_faces": v[1]}
             for k, v in sorted(prepared["reference_counts"].items())]
        )
        parquet(ref, "reference.parquet")
    if "mismatch" in cfg.metrics and scores.num_rows and "clip_embedding" in scores.column_names:
        _write_mismatch(cfg, scores, prepared, parquet)


def _write_mismatch(cfg: EvaluateConfig, scores: pa.Table, prepared: dict[str, Any], parquet) -> None:
    from raypdm.data.uri import join
    from raypdm.metrics.mismatch import plot_projection, summarise

    df = scores.to_pandas()
    df = df[df["error"].isna() & df["clip_embedding"].notna()]
    embeddings = dict(prepared.get("groups", {}))
    rows = dict(prepared.get("group_rows", {}))
    if len(df):
        embeddings["evaluated"] = np.stack([np.asarray(v, dtype=np.float32) for v in df["clip_embedding"]])
        keys = METRIC_COLUMNS["mismatch"]
        rows["evaluated"] = [{k: float(r[k]) for k in keys} for r in df[list(keys)].to_dict("records")]
    if not rows:
        return
    baseline = "clean" if "clean" in rows else next(iter(rows))
    parquet(summarise(rows, baseline=baseline), "mismatch.parquet")
    if sum(len(e) for e in embeddings.values()) >= 3:
        plot_projection(embeddings, join(cfg.output, "mismatch.png"))


def _markdown(df) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4f}"
        return str(v)

    head = "| " + " | ".join(df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body]) + "\n"
