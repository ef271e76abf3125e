"""Purifier throughput at several job sizes: the paper's way, a plain loop, one batched process, raypdm on Ray.

    python benchmarks/purifier_throughput.py --output benchmarks/results            # tiny preset, CPU
    python benchmarks/purifier_throughput.py --output r --purifiers jpeg --images 16,64,1000,10000 --size 64
    python benchmarks/purifier_throughput.py --output r --set preset=full --images 16,64   # on a GPU node

Same as `raypdm bench purifiers`. Writes purifier_throughput.parquet and .png under --output and prints the
Markdown table that goes into benchmarks/RESULTS.md. Targets (issue 35, 2-core machine): JPEG 64² at
10,200 images >= 1.0x the plain loop (wall), at 1,020 >= 0.5x; SR (tiny) >= 1.0x the paper's way at 16
images and >= 1.3x at 64.
"""

from raypdm.cli import main

if __name__ == "__main__":
    import sys

    main_args = ["bench", "purifiers", *sys.argv[1:]]
    sys.argv = [sys.argv[0], *main_args]
    main()
