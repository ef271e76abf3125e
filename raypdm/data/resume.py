"""What a re-run still has to do: decided in the driver from the manifest, one listing of the inputs and
one of the outputs, before any Ray work.

An input counts as done only when its location's latest manifest row
    - was made under the same stage config (else: "config changed"),
    - did not fail for a passing reason (else: "failed before"; an input error such as a corrupt file
      stays done: the file would fail again),
    - describes an input that has not changed since: same size and modification time as the listing
      says (the quick check rsync and make use); with `verify="full"` the input is hashed instead,
    - and, for a finished row, has its output on disk as the row describes it: present (else "missing"),
      of the recorded size (else "size"), and with `verify="full"`, or when an older row recorded no size,
      with the recorded sha256 (else "hash").
Inputs whose output verified but whose quick check could not decide (an older row without a modification
time, a touched file) go to the pipeline with their key: the reader hashes them and skips those whose
bytes are unchanged. Everything else is recomputed and its new row replaces the old one.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

from raypdm.data.layout import ImageRef
from raypdm.data.manifest import ERROR_INPUT, row_key
from raypdm.data.uri import fs_and_path

Verify = Literal["size", "full"]
VERIFY_MODES: tuple[str, ...] = ("size", "full")

__all__ = ["DRIVER_HASH_MAX", "VERIFY_MODES", "OutputCheck", "ResumePlan", "Verify", "check_outputs", "plan_resume",
           "verified_done_keys"]

_HASH_THREADS = 8
# Inputs the quick check cannot decide are hashed in the driver up to this many; above, by the pipeline.
DRIVER_HASH_MAX = 5_000  # hashlib releases the GIL: reading and hashing overlap across threads


@dataclass
class ResumePlan:
    """The driver's decision for one stage run."""

    todo: list[ImageRef] = field(default_factory=list)  # to run through the pipeline
    done_keys: frozenset[str] = frozenset()  # keys whose outputs verified: the reader skips them if unchanged
    skipped: int = 0  # decided done here: no Ray work at all
    verified: int = 0  # finished outputs checked against their rows and found as described
    recomputed: Counter = field(default_factory=Counter)  # reason -> count of inputs done again

    def reasons(self) -> str:
        return ", ".join(f"{n} {why}" for why, n in sorted(self.recomputed.items())) or "none"


def _sha256_of(uri: str) -> str | None:
    fs, path = fs_and_path(uri)
    h = hashlib.sha256()
    try:
        with fs.open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except (FileNotFoundError, OSError):
        return None
    return h.hexdigest()


def _hashes(uris: list[str]) -> dict[str, str | None]:
    if not uris:
        return {}
    with ThreadPoolExecutor(max_workers=min(_HASH_THREADS, len(uris))) as pool:
        return dict(zip(uris, pool.map(_sha256_of, uris)))


def _output_sizes(out_uri: str) -> dict[str, int]:
    """path -> size of every file under the output root (one recursive listing)."""
    fs, root = fs_and_path(out_uri)
    root = root.rstrip("/")
    fs.invalidate_cache()  # object stores cache listings: this one must be of the folder as it is now
    if not fs.exists(root):
        return {}
    return {p: int(info.get("size") or 0) for p, info in fs.find(root, detail=True).items()
            if info.get("type", "file") == "file"}


def _same(a, b) -> bool:
    return a is not None and b is not None and a == a and b == b and a == b  # NaN never matches


@dataclass
class OutputCheck:
    ok: list[bool]  # per row: True for a finished row whose file matches it, and for rows with no output
    reasons: Counter  # why the others failed: missing / size / hash


def check_outputs(rows: list[dict], out_uri: str, verify: Verify = "size",
                  sizes: dict[str, int] | None = None) -> OutputCheck:
    """Check each finished row's output against it: present, of `output_bytes`, and with `verify="full"`
    (or when a row recorded no size) of `output_sha256`. Rows with an error have no output (ok)."""
    sizes = _output_sizes(out_uri) if sizes is None else sizes
    result = OutputCheck(ok=[True] * len(rows), reasons=Counter())
    to_hash: list[int] = []
    for i, row in enumerate(rows):
        if row.get("error") is not None:
            continue
        size = sizes.get(fs_and_path(row["uri"])[1]) if row.get("uri") else None
        if size is None:
            result.ok[i], result.reasons["missing"] = False, result.reasons["missing"] + 1
        elif row.get("output_bytes") is not None and int(row["output_bytes"]) != size:
            result.ok[i], result.reasons["size"] = False, result.reasons["size"] + 1
        elif verify == "full" or row.get("output_bytes") is None:
            to_hash.append(i)
    digests = _hashes([rows[i]["uri"] for i in to_hash])
    for i in to_hash:
        if digests.get(rows[i]["uri"]) != rows[i].get("output_sha256"):
            result.ok[i], result.reasons["hash"] = False, result.reasons["hash"] + 1
    return result


def verified_done_keys(latest: list[dict], out_uri: str, verify: Verify = "size") -> tuple[set[str], OutputCheck]:
    """For stages whose inputs are not files (sampling: a model and a seed): the keys of the latest rows
    that still count as done (finished with a matching output, or failed for the input's own reason)."""
    checked = check_outputs(latest, out_uri, verify)
    keys = set()
    for row, ok in zip(latest, checked.ok):
        if ok and (row.get("error") is None or row.get("error_kind") == ERROR_INPUT):
            keys.add(row_key(row["identity"], row["split"], row["name"], row.get("input_sha256"), row["config_hash"]))
    return keys, checked


def plan_resume(refs: list[ImageRef], latest: Iterable[dict], config_hash: str, out_uri: str,
                verify: Verify = "size") -> ResumePlan:
    """Split `refs` into done (verified here) and to-do, with the reason each earlier row was not enough.

    `latest` are the manifest's current rows (one per output location)."""
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    rows = {(r["identity"], r["split"], r["name"]): r for r in latest}
    plan = ResumePlan()
    if not rows:
        plan.todo = list(refs)
        return plan
    candidates: list[tuple[ImageRef, dict]] = []
    for ref in refs:
        row = rows.get((ref.identity, ref.split, ref.name))
        if row is None:
            plan.todo.append(ref)
        elif row.get("config_hash") != config_hash:
            plan.todo.append(ref)
            plan.recomputed["config changed"] += 1
        elif row.get("error") is not None and row.get("error_kind") != ERROR_INPUT:
            plan.todo.append(ref)
            plan.recomputed["failed before"] += 1
        else:
            candidates.append((ref, row))

    # Outputs: present, of the recorded size, and (full, or no recorded size) of the recorded hash.
    checked = check_outputs([row for _, row in candidates], out_uri, verify)
    plan.recomputed.update(checked.reasons)
    output_ok = dict(enumerate(checked.ok))

    # Inputs: unchanged since the row was made (quick check, or their hash with verify="full").
    input_digests = _hashes([ref.src_uri for i, (ref, _) in enumerate(candidates) if output_ok.get(i, True)]
                            ) if verify == "full" else {}
    undecided: list[tuple[ImageRef, dict]] = []
    for i, (ref, row) in enumerate(candidates):
        if not output_ok.get(i, True):
            plan.todo.append(ref)
            continue
        if row.get("error") is None:
            plan.verified += 1
        if verify == "full":
            unchanged = input_digests.get(ref.src_uri) == row.get("input_sha256")
            if not unchanged:
                plan.recomputed["input changed"] += 1
                plan.todo.append(ref)
                continue
        elif not (_same(row.get("input_bytes"), ref.size) and _same(row.get("input_mtime"), ref.mtime)):
            undecided.append((ref, row))  # an older row without a stamp, or a touched file
            continue
        plan.skipped += 1

    if len(undecided) <= DRIVER_HASH_MAX:
        digests = _hashes([ref.src_uri for ref, _ in undecided])
        for ref, row in undecided:
            if digests.get(ref.src_uri) == row.get("input_sha256"):
                plan.skipped += 1
            else:
                plan.recomputed["input changed"] += 1
                plan.todo.append(ref)
    else:
        # Too many to read here: the pipeline's readers hash them in parallel and skip the unchanged.
        plan.todo += [ref for ref, _ in undecided]
        plan.done_keys = frozenset(row_key(ref.identity, ref.split, ref.name, row.get("input_sha256"), config_hash)
                                   for ref, row in undecided)
    return plan
