"""A job entrypoint for tests/integration/test_submit_cluster.py: where do a Ray job's driver and its GPU work run?

It takes the flags every jobs/*.py entrypoint takes (--config FILE, --output DIR, --smoke) and writes
DIR/probe.json with:
- driver: the node it runs on, its working directory and what that holds (the runtime env's excludes
  must have kept tests/, .venv/ ... out), where `raypdm` was imported from (the uploaded working dir
  must shadow the installed copy), and the runtime env's variables;
- gpu_task: the same from inside a `num_gpus=1` task, plus the GPU ids Ray assigned and
  CUDA_VISIBLE_DEVICES;
- nodes: every alive node's id, whether it is the head, and its resources;
- config (the parsed YAML), smoke, argv.
`--fail` exits with status 3 after writing the record (the failure path of `raypdm submit --follow`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import ray
import yaml

ENV_KEYS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM", "PYTHONUNBUFFERED")


def _where() -> dict:
    import raypdm
    return {
        "node_id": ray.get_runtime_context().get_node_id(),
        "cwd": os.getcwd(),
        "cwd_entries": sorted(os.listdir(".")),
        "raypdm_file": os.path.realpath(raypdm.__file__) if raypdm.__file__ else f"namespace: {list(raypdm.__path__)}",
        "env": {k: os.environ.get(k) for k in ENV_KEYS},
    }


@ray.remote(num_gpus=1, num_cpus=0.5)
def gpu_task() -> dict:
    info = _where()
    info["gpu_ids"] = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
    info["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--fail", action="store_true")
    args = parser.parse_args(argv)

    with open(args.config) as f:  # relative paths resolve inside the uploaded working dir
        config = yaml.safe_load(f)
    ray.init()  # the job supervisor set RAY_ADDRESS
    record = {
        "driver": _where(),
        "gpu_task": ray.get(gpu_task.remote()),
        "nodes": [
            {"node_id": n["NodeID"], "is_head": "node:__internal_head__" in n["Resources"], "resources": n["Resources"]}
            for n in ray.nodes()
            if n["Alive"]
        ],
        "config": config,
        "smoke": args.smoke,
        "argv": sys.argv[1:],
    }
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "probe.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(f"probe: driver on {record['driver']['node_id'][:8]}, gpu task on {record['gpu_task']['node_id'][:8]}")
    return 3 if args.fail else 0


if __name__ == "__main__":
    sys.exit(main())
