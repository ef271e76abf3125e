"""`raypdm data check`: validate a dataset before spending GPU hours on it.

Lists the layout, then reads and decodes every file on Ray Data (the same `load_batch` every stage uses,
so "check passes" means "every stage can read it"), and reports per-identity/split counts, every bad
file with its reason, and layout problems.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from raypdm.data.decode import DEFAULT_MAX_PIXELS
from raypdm.data.layout import SPLITS, list_images
from raypdm.data.read import load_batch, ref_items

__all__ = ["CheckReport", "check_dataset"]


@dataclass
class CheckReport:
    root: str
    counts: dict[tuple[str, str], int] = field(default_factory=dict)  # good images per (identity, split)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (src_uri, reason)
    problems: list[str] = field(default_factory=list)  # layout problems (stray files and folders)
    sizes: Counter = field(default_factory=Counter)  # (h, w) -> count of good images

    @property
    def ok(self) -> bool:
        return not self.bad and not self.problems and sum(self.counts.values()) > 0

    @property
    def identities(self) -> list[str]:
        return sorted({identity for identity, _ in self.counts})


def _summarise(batch: dict[str, np.ndarray], *, max_pixels: int) -> dict[str, np.ndarray]:
    loaded = load_batch(batch, config_hash="check", max_pixels=max_pixels)
    shapes = [f"{im.shape[0]}x{im.shape[1]}" if im.size else "" for im in loaded["image"]]
    return {
        "identity": loaded["identity"],
        "split": loaded["split"],
        "src_uri": loaded["src_uri"],
        "error": loaded["error"],
        "shape": np.array(shapes, dtype=object),
    }


def check_dataset(root: str, *, splits: tuple[str, ...] = SPLITS, max_pixels: int = DEFAULT_MAX_PIXELS) -> CheckReport:
    import ray.data

    from raypdm.runtime import init_ray

    refs, problems = list_images(root, splits=splits)
    report = CheckReport(root=root, problems=problems)
    if not refs:
        report.problems.append(f"no images found under {root} (expected <identity>/<split>/<image>)")
        return report
    init_ray()
    ds = ray.data.from_items(ref_items(refs), override_num_blocks=max(1, min(len(refs) // 32, 100)))
    ds = ds.map_batches(_summarise, batch_size=32, fn_kwargs={"max_pixels": max_pixels}, num_cpus=0.5)
    counts: Counter = Counter()
    for row in ds.iter_rows():
        key = (str(row["identity"]), str(row["split"]))
        counts.setdefault(key, 0)
        if row["error"]:
            report.bad.append((str(row["src_uri"]), str(row["error"])))
        else:
            counts[key] += 1
            h, w = (int(x) for x in str(row["shape"]).split("x"))
            report.sizes[(h, w)] += 1
    report.counts = dict(sorted(counts.items()))
    report.bad.sort()
    return report
