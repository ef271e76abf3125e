"""Reading the layout into Ray Data: one row per file, decoded inside our own map step.

Ray's `read_images` / `read_binary_files` fail the whole job on one unreadable file; the field's data
sets always contain a few. So the driver lists the files (cheap, metadata only), Ray Data fans the list
out, and `load_batch` reads, hashes and decodes each file, turning every failure into an error row.
"""

from __future__ import annotations

import numpy as np

from raypdm.data.decode import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image, sha256_hex
from raypdm.data.layout import ImageRef
from raypdm.data.manifest import ERROR_INPUT, ERROR_RUNTIME, row_key
from raypdm.data.uri import read_bytes

EMPTY_IMAGE = np.zeros((0, 0, 3), dtype=np.uint8)  # stands in for "no image" so the column keeps one type

__all__ = ["EMPTY_IMAGE", "ref_items", "load_batch", "object_column"]


def object_column(values: list) -> np.ndarray:
    """A 1-D object array (np.array would try to stack same-shaped images into one block)."""
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr


def ref_items(refs: list[ImageRef]) -> list[dict]:
    # Sizes and times from the listing; -1 / NaN where it said nothing (Ray Data columns keep one type).
    return [
        {"identity": r.identity, "split": r.split, "name": r.name, "src_uri": r.src_uri, "name_error": r.error or "",
         "src_bytes": -1 if r.size is None else int(r.size), "src_mtime": np.nan if r.mtime is None else r.mtime}
        for r in refs
    ]


_FETCH_THREADS = 8


def fetch_all(uris: list[str]) -> list[bytes | Exception]:
    """The bytes of each URI (or the exception reading it raised), read concurrently: on an object store
    each read is a round trip, and a batch's reads one after the other would leave the stage waiting on
    the network (local reads are unaffected)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(uri: str) -> bytes | Exception:
        try:
            return read_bytes(uri)
        except Exception as exc:  # noqa: BLE001 (recorded as that input's error row)
            return exc

    if len(uris) <= 1:
        return [one(u) for u in uris]
    with ThreadPoolExecutor(max_workers=min(_FETCH_THREADS, len(uris))) as pool:
        return list(pool.map(one, uris))


def load_batch(
    batch: dict[str, np.ndarray],
    *,
    config_hash: str,
    done_keys: frozenset[str] | set[str] = frozenset(),
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, np.ndarray]:
    """Read, hash and decode a batch of listed files.

    Output columns: identity, split, name, src_uri, input_sha256, input_bytes, input_mtime, image (uint8
    HxWx3 or empty), error, error_kind, skipped (already in the manifest under this config: no image is
    decoded). input_mtime is the listing's time, kept only when the bytes read have the listed size (a
    file replaced in between gets no time, so the next run hashes it rather than trusting the stamp).
    Missing strings are "" inside Ray Data (an all-None column would come back as float NaN in the next
    step); the driver turns them into nulls when it writes the manifest.
    """
    n = len(batch["src_uri"])
    fetched = fetch_all([str(u) for u in batch["src_uri"]])
    out: dict[str, list] = {k: [] for k in ("input_sha256", "input_bytes", "input_mtime", "image", "error",
                                            "error_kind", "skipped")}
    listed_bytes = batch["src_bytes"] if "src_bytes" in batch else np.full(n, -1)
    listed_mtime = batch["src_mtime"] if "src_mtime" in batch else np.full(n, np.nan)
    for i in range(n):
        sha, image, error, kind, skipped = "", EMPTY_IMAGE, "", "", False
        size, mtime = -1, np.nan
        try:
            data = fetched[i]
            if isinstance(data, Exception):
                raise data
            sha = sha256_hex(data)
            size = len(data)
            if int(listed_bytes[i]) == size:
                mtime = float(listed_mtime[i])
        except Exception as exc:  # network and permission failures may pass: retry on a re-run
            error, kind = f"cannot read file: {type(exc).__name__}: {exc}", ERROR_RUNTIME
        if sha:
            key = row_key(str(batch["identity"][i]), str(batch["split"][i]), str(batch["name"][i]), sha, config_hash)
            if key in done_keys:
                skipped = True
            elif batch["name_error"][i]:
                error, kind = str(batch["name_error"][i]), ERROR_INPUT
            else:
                try:
                    image = decode_image(data, max_pixels=max_pixels)
                except ImageDecodeError as exc:
                    error, kind = str(exc), ERROR_INPUT
        out["input_sha256"].append(sha)
        out["input_bytes"].append(size)
        out["input_mtime"].append(mtime)
        out["image"].append(image)
        out["error"].append(error)
        out["error_kind"].append(kind)
        out["skipped"].append(skipped)
    return {
        "identity": batch["identity"],
        "split": batch["split"],
        "name": batch["name"],
        "src_uri": batch["src_uri"],
        "input_sha256": object_column(out["input_sha256"]),
        "input_bytes": np.array(out["input_bytes"], dtype=np.int64),
        "input_mtime": np.array(out["input_mtime"], dtype=np.float64),
        "image": object_column(out["image"]),
        "error": object_column(out["error"]),
        "error_kind": object_column(out["error_kind"]),
        "skipped": np.array(out["skipped"], dtype=bool),
    }
