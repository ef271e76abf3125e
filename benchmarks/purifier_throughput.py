"""Purifier throughput: per-image processes vs one batched process vs the Ray Data pipeline.

    python benchmarks/purifier_throughput.py --out benchmarks/results            # tiny preset, CPU
    python benchmarks/purifier_throughput.py --out r --set preset=full --set images=32   # on a GPU node

Same as `raypdm bench purifiers`. Writes purifier_throughput.parquet and .png under --out and prints the
Markdown table that goes into benchmarks/RESULTS.md. Targets (tiny preset, 2-core machine): the Ray
pipeline with one worker keeps >= 0.85x the batched process's throughput, and is >= 10x faster per sample
than one process per image.
"""

from raypdm.cli import main

if __name__ == "__main__":
    import sys

    main_args = ["bench", "purifiers", *sys.argv[1:]]
    sys.argv = [sys.argv[0], *main_args]
    main()
