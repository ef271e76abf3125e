"""One declared Parquet schema per kind of manifest: the base columns every stage writes
(`raypdm.data.manifest.MANIFEST_FIELDS`) plus the columns that kind may add, each with its one type.

A manifest says its kind in the Parquet schema's metadata (`raypdm.manifest`), so a reader (or
`check_manifest`) knows which declaration it follows. Writers conform their rows to it: a flag is a bool
(never 1.0/0.0), a count an int64, a missing value a null of the declared type. Evaluate's `--setting
key=value` labels are extra string columns of the user's choosing (`labels`).
"""

from __future__ import annotations

import pyarrow as pa

KIND_KEY = b"raypdm.manifest"

_F64, _I64, _STR, _BOOL = pa.float64(), pa.int64(), pa.string(), pa.bool_()
_FAITHFULNESS = {"lpips": _F64, "ssim": _F64, "ms_ssim": _F64, "psnr": _F64}

EXTRA_COLUMNS: dict[str, dict[str, pa.DataType]] = {
    # protected set_A: the measured perturbation of the saved PNG and the attack loss before/after; per-identity
    # methods add the wall-clock span of their identity's task.
    "protect": {"loss_before": _F64, "loss_after": _F64, "l2": _F64, "linf": _F64, "lpips": _F64,
                "started_at": _F64, "finished_at": _F64},
    # faithfulness vs the purifier's input, and (`ref_*`) vs the clean image when a reference is given
    "purify": {**_FAITHFULNESS, **{f"ref_{k}": v for k, v in _FAITHFULNESS.items()}},
    "sample": {"prompt": _STR, "prompt_index": _I64, "image_index": _I64, "positive_prompt": _STR,
               "negative_prompt": _STR, "seed": _I64, "w": _F64, "cfg_scale": _F64, "token": _STR, "steps": _I64,
               "scheduler": _STR, "height": _I64, "width": _I64},
    "evaluate": {"ims": _F64, "ims_ip": _F64, "ims_vgg": _F64, "face_found": _BOOL, "face_found_vgg": _BOOL,
                 "q": _F64, "liqe": _F64, "liqe_raw": _F64, "clip_iqac": _F64, **_FAITHFULNESS,
                 "p_noise": _F64, "is_noise": _BOOL, "cos_person": _F64, "cos_noise": _F64,
                 "clip_embedding": pa.list_(pa.float32())},
    "class_priors": {"index": _I64, "seed": _I64, "prompt": _STR},
}
KINDS: tuple[str, ...] = tuple(EXTRA_COLUMNS)

__all__ = ["EXTRA_COLUMNS", "KINDS", "KIND_KEY", "check_manifest", "declared_type", "kind_of"]


def declared_type(kind: str | None, column: str) -> pa.DataType | None:
    """The declared type of an extra column of `kind` (None: not declared)."""
    return EXTRA_COLUMNS.get(kind or "", {}).get(column)


def kind_of(schema: pa.Schema) -> str | None:
    meta = schema.metadata or {}
    value = meta.get(KIND_KEY)
    return value.decode() if value else None


def check_manifest(schema: pa.Schema, labels: tuple[str, ...] = ()) -> list[str]:
    """What in `schema` differs from its declaration (empty: it conforms). `labels`: extra string columns
    allowed (evaluate's settings)."""
    from raypdm.data.manifest import MANIFEST_FIELDS

    problems = []
    kind = kind_of(schema)
    if kind not in EXTRA_COLUMNS:
        problems.append(f"unknown manifest kind {kind!r} (metadata {KIND_KEY.decode()})")
    names = schema.names
    base = [f.name for f in MANIFEST_FIELDS]
    if names[: len(base)] != base:
        problems.append(f"base columns {names[: len(base)]} != {base}")
    for f in MANIFEST_FIELDS:
        if f.name in names and schema.field(f.name).type != f.type:
            problems.append(f"{f.name}: {schema.field(f.name).type} != {f.type}")
    for name in names[len(base):]:
        want = declared_type(kind, name) or (_STR if name in labels else None)
        got = schema.field(name).type
        if want is None:
            problems.append(f"{name}: not declared for {kind} manifests")
        elif got != want:
            problems.append(f"{name}: {got} != {want}")
    return problems
