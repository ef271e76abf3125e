"""Protection crafting throughput: images/s of the per-image methods, seconds per identity of the bi-level ones.

    python benchmarks/protect_throughput.py --out benchmarks/results                  # tiny preset, CPU
    python benchmarks/protect_throughput.py --out r --preset full --weights-dir W --size 512 --images 16
                                                                                      # on a GPU node

In-process, one model load per method (what one actor of `raypdm protect` does): per-image methods protect
--images images of --size px in batches of --batch-size; bi-level methods protect one identity of
--images images with --images clean references. Model loading is timed separately from crafting. Step
counts are the methods' defaults unless --steps / --outer / --surrogate-steps / --class-images are given
(the tiny CPU defaults use few of each: their figures are plumbing speed, not the full attacks' cost; pass
0 for a method's own default). Writes protect_throughput.parquet and prints a Markdown
table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--preset", default="tiny", choices=["tiny", "full"])
    p.add_argument("--weights-dir", default=None)
    p.add_argument("--methods", default="advdm,photoguard_encoder,photoguard_diffusion,glaze,adaptive_codesr,"
                                        "fsmg,aspl,easpl,metacloak")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=2, help="PGD steps (0: the method's default)")
    p.add_argument("--outer", type=int, default=1, help="outer rounds of bi-level methods (0: default)")
    p.add_argument("--surrogate-steps", type=int, default=4,
                   help="surrogate training steps of bi-level methods: fsmg's finetune_steps, metacloak's "
                        "pool_train_steps (0: the defaults, 1000)")
    p.add_argument("--class-images", type=int, default=4,
                   help="class-prior images the bi-level surrogates generate (0: the default, 200)")
    p.add_argument("--class-prior-steps", type=int, default=2, help="their sampling steps (0: the default, 50)")
    args = p.parse_args(argv)

    import numpy as np
    import pandas as pd
    import torch

    from raypdm.data.synthetic import synthetic_face
    from raypdm.protect import build_protection, protection_options_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    images = [synthetic_face(0, "bench", i, args.size) for i in range(args.images)]
    clean = [synthetic_face(0, "bench", 100 + i, args.size) for i in range(args.images)]
    rows = []
    for method in args.methods.split(","):
        fields = protection_options_model(method).model_fields
        opts: dict = {"batch_size": args.batch_size}
        if args.steps:
            opts["steps"] = args.steps
        if args.outer:
            for name in ("outer_iterations", "rounds", "iterations"):
                if name in fields:
                    opts[name] = args.outer
        if "resolution" in fields:  # surrogates train and attack at the benchmark's image size
            opts["resolution"] = args.size
        if args.surrogate_steps:
            for name in ("finetune_steps", "pool_train_steps"):
                if name in fields:
                    opts[name] = args.surrogate_steps
            if "pool_interval" in fields:
                opts["pool_interval"] = max(1, args.surrogate_steps // 2)
        if args.class_images and "num_class_images" in fields:
            opts["num_class_images"] = args.class_images
        if args.class_prior_steps and "class_prior_steps" in fields:
            opts["class_prior_steps"] = args.class_prior_steps
        t0 = time.perf_counter()
        protection = build_protection(method, options=opts, device=device, preset=args.preset,
                                      weights_dir=args.weights_dir)
        load_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        if protection.per_identity:
            results = protection.protect_identity(images, clean, "bench")
        else:
            results = protection.protect(images)
        craft_s = time.perf_counter() - t1
        gain = float(np.mean([r.loss_after - r.loss_before for r in results]))
        rows.append({"method": method, "runs": "per identity" if protection.per_identity else "per image",
                     "preset": args.preset, "device": device, "images": len(images), "size": args.size,
                     "options": str(opts), "load_s": round(load_s, 2), "craft_s": round(craft_s, 2),
                     "images_per_s": round(len(images) / craft_s, 3),
                     "s_per_identity": round(craft_s, 2) if protection.per_identity else None,
                     "mean_loss_gain": gain})
        print(f"{method}: {craft_s:.1f} s for {len(images)} images (load {load_s:.1f} s)", file=sys.stderr)
    df = pd.DataFrame(rows)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    df.to_parquet(Path(args.out) / "protect_throughput.parquet", index=False)
    cols = ["method", "runs", "images", "size", "load_s", "craft_s", "images_per_s", "s_per_identity", "mean_loss_gain"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in df[cols].itertuples(index=False):
        print("| " + " | ".join("" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
