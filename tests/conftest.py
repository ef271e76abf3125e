"""Shared fixtures. Ray tests share one local cluster per session (starting Ray costs seconds)."""

from __future__ import annotations

import os
import tempfile

import pytest

# Ray 2.60 turns on token auth and writes ~/.ray; tests keep everything in a temporary folder.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
_RAY_TMP = tempfile.mkdtemp(prefix="raypdm-ray-")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under `-n 2` each worker runs its own embedded Ray: its own session folder, not the controller's.
    os.environ["RAY_TMPDIR"] = _RAY_TMP
os.environ.setdefault("RAY_TMPDIR", _RAY_TMP)
# Never reach a model hub from tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# A test not marked `slow` must stay fast: the fast loop (`pytest -m "not slow"`) is what contributors run
# after every change. Over this many seconds (setup or call) it is listed at the end of every run, and with
# `--max-test-seconds N` it fails, naming itself (README: the fast loop's command passes 15).
FAST_LIMIT_S = 15.0


def pytest_addoption(parser):
    parser.addoption("--max-test-seconds", type=float, default=None, metavar="N",
                     help="fail any test not marked slow whose setup or call takes over N seconds")


_over_limit: list[tuple[str, str, float]] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when not in ("setup", "call") or "slow" in item.keywords or not rep.passed:
        return
    strict = item.config.getoption("--max-test-seconds")
    limit = strict if strict is not None else FAST_LIMIT_S
    if rep.duration <= limit:
        return
    if strict is not None:
        rep.outcome = "failed"
        rep.longrepr = (f"{item.nodeid}: {rep.when} took {rep.duration:.1f} s, over --max-test-seconds {limit:g}; "
                        "make it cheaper or mark it `slow`")


def pytest_runtest_logreport(report):
    # Collected here, not in makereport: under `-n 2` reports reach the controller, which prints the summary.
    if report.when in ("setup", "call") and "slow" not in report.keywords and report.duration > FAST_LIMIT_S:
        _over_limit.append((report.nodeid, report.when, report.duration))


def pytest_terminal_summary(terminalreporter):
    if _over_limit:
        terminalreporter.section(f"tests not marked slow over {FAST_LIMIT_S:g} s")
        for nodeid, when, seconds in sorted(_over_limit, key=lambda t: -t[2]):
            terminalreporter.write_line(f"{seconds:7.1f} s  {when:5s}  {nodeid}")


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
