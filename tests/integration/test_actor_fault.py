"""A transform actor that dies mid-run is restarted by Ray; every input still ends up exactly once."""

import os

import numpy as np
import pytest

from raypdm.data.manifest import Manifest
from raypdm.data.synthetic import make_synthetic
from raypdm.pipelines.stage import ImageStage, run_image_stage

pytestmark = pytest.mark.ray


def _dying_transform(flag_dir):
    def make():
        def transform(images):
            # The first worker process to get here dies hard (like a segfault or an OOM kill); exactly one
            # crash, decided by an atomic file creation shared by every process.
            try:
                fd = os.open(os.path.join(flag_dir, "crashed"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return [np.ascontiguousarray(im[:, ::-1]) for im in images]
            os.close(fd)
            os._exit(1)

        return transform

    return make


def test_actor_killed_mid_run_is_restarted_and_no_row_is_lost(ray_local, tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    make_synthetic(str(data), identities=2, images=4, size=24)  # 24 images
    stage = ImageStage(name="mirror", config={}, config_hash="m1", make_transform=_dying_transform(str(tmp_path)),
                       uses_model=True, batch_size=3)
    summary = run_image_stage(stage, str(data), str(out))
    assert (tmp_path / "crashed").exists(), "the fault was never injected"
    rows = Manifest(str(out)).read().to_pylist()
    assert len(rows) == 24 == summary.total
    assert len({(r["identity"], r["split"], r["name"]) for r in rows}) == 24
    assert all(r["error"] is None for r in rows), [r["error"] for r in rows if r["error"]]
    assert len(list(out.rglob("*.png"))) == 24
