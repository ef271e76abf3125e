"""Shared fixtures. Ray tests share one local cluster per session (starting Ray costs seconds)."""

from __future__ import annotations

import os
import tempfile

import pytest

# Ray 2.60 turns on token auth and writes ~/.ray; tests keep everything in a temporary folder.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
_RAY_TMP = tempfile.mkdtemp(prefix="raypdm-ray-")
os.environ.setdefault("RAY_TMPDIR", _RAY_TMP)
# Never reach a model hub from tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray cluster with 2 logical CPUs, shared by the session's integration tests."""
    import ray

    from raypdm.runtime import init_ray

    init_ray(num_cpus=2, num_gpus=0)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a small shared machine: torch's intra-op thread pool costs far more than it gains
    (5-20x slower under load). Modules opt in with `pytestmark = pytest.mark.usefixtures(...)`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def astronaut():
    from skimage import data

    return data.astronaut()


def pytest_sessionfinish(session, exitstatus):
    # Ray sessions leave hundreds of MB of logs and sockets behind; remove the folder this run made.
    import shutil

    if os.environ.get("RAY_TMPDIR") == _RAY_TMP:
        shutil.rmtree(_RAY_TMP, ignore_errors=True)
