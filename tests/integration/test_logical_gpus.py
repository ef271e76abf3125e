"""GPU placement on a CPU-only machine: a local Ray that declares a logical GPU schedules model actors
with `num_gpus`, and the code inside still runs on the CPU (CUDA is absent)."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import ray
    from raypdm.runtime import init_ray, default_device
    from raypdm.data.synthetic import make_synthetic
    from raypdm.data.manifest import Manifest
    from raypdm.pipelines.stage import ImageStage, run_image_stage

    resources = init_ray(num_cpus=2, logical_gpus=1)
    root, out, log = sys.argv[1], sys.argv[2], sys.argv[3]
    make_synthetic(root, identities=1, images=2, size=24)

    def make():
        ids = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
        with open(log, "w") as f:
            json.dump({"gpu_ids": ids, "device": default_device()}, f)
        return lambda images: images

    stage = ImageStage(name="gpu-probe", config={}, config_hash="g", make_transform=make, uses_model=True,
                       uses_gpu=True, gpus_per_worker=1.0)
    summary = run_image_stage(stage, root, out)
    print(json.dumps({"gpus": resources.get("GPU", 0), "processed": summary.processed}))
    """
)


def test_model_actor_gets_a_logical_gpu_and_runs_on_cpu(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    ray_tmp = tempfile.mkdtemp(prefix="rp-")  # short: Ray's socket paths must stay under 107 bytes
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    try:
        proc = subprocess.run(
            [sys.executable, str(script), str(tmp_path / "d"), str(tmp_path / "o"), str(tmp_path / "log.json")],
            capture_output=True, text=True, env=env, timeout=300,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"gpus": 1.0, "processed": 6}
    probe = json.loads((tmp_path / "log.json").read_text())
    assert probe["gpu_ids"] == ["0"] and probe["device"] == "cpu"
