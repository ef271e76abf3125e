"""Subprocess entry points for the purifier benchmark's non-Ray modes.

    python -m raypdm.bench.worker --mode per-image --purifier codesr --inputs a.png --outdir o/
    python -m raypdm.bench.worker --mode batched   --purifier codesr --inputs a.png b.png ... --outdir o/

`per-image` is how the field's scripts ran: a fresh process per image that imports everything and loads
the model for that one image. `batched` is the best a single process does: load once, purify in
batches, write PNGs. Both print one JSON line with their timings and peak memory; the benchmark driver
measures the process's whole wall time from outside.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

T_START = time.perf_counter()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["per-image", "batched"], required=True)
    ap.add_argument("--purifier", required=True)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--weights-dir", default=None)
    ap.add_argument("--options", default="{}", help="JSON: per-purifier options")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--inputs", nargs="+", required=True)
    ap.add_argument("--outdir", required=True)
    args = ap.parse_args(argv)

    import os

    import torch

    from raypdm.data.decode import decode_image, encode_png
    from raypdm.data.uri import join, read_bytes, write_bytes
    from raypdm.purify import build_purifier

    t_import = time.perf_counter()
    purifier = build_purifier(args.purifier, preset=args.preset, weights_dir=args.weights_dir,
                              options=json.loads(args.options))
    t_load = time.perf_counter()
    n = 0
    for start in range(0, len(args.inputs), args.batch_size):
        uris = args.inputs[start : start + args.batch_size]
        images = [decode_image(read_bytes(u)) for u in uris]
        for uri, out in zip(uris, purifier(images)):
            write_bytes(join(args.outdir, f"{n:05d}_{os.path.basename(uri)}"), encode_png(out))
            n += 1
    t_end = time.perf_counter()
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    print(json.dumps({
        "images": n,
        "import_s": t_import - T_START,
        "load_s": t_load - t_import,
        "compute_s": t_end - t_load,
        "peak_rss_mb": _peak_rss_mb(),
        "peak_gpu_mb": gpu_peak,
        "device": str(getattr(purifier, "device", "cpu")),
        "threads": torch.get_num_threads(),
    }))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
