"""Job submission against a real two-node Ray cluster on 127.0.0.1: `raypdm submit` (library and CLI) and
the documented `ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/JOB.py`.

The cluster mirrors the ones in clusters/: a head that takes no GPU work (2 CPUs, 0 GPUs, dashboard and job
server on 127.0.0.1 only) and a worker node with one logical GPU, tagged with a custom resource. Both are
`ray start --block` processes of this test, stopped by their process ids (SIGTERM: each takes its Ray
processes down with it), never `ray stop`, which would end every Ray process on this shared machine.
Each node has its own --temp-dir, as separate machines have separate disks: sharing one session folder, the
two nodes' runtime-env agents unpacked the uploaded working dir into the same folder, and one node's unpack
once removed the driver's working directory under it (and once showed it raypdm/ without __init__.py).

What runs is a copy of the checkout (raypdm/, jobs/, pyproject.toml) plus decoy folders that the runtime
env's excludes must keep out of the upload, and the probe job tests/integration/data/gpu_probe_job.py
installed as jobs/gpu_probe.py: it records where the driver and a `num_gpus=1` task ran, which raypdm they
imported and what reached the cluster.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from procs import kill_processes_naming  # tests/integration is on sys.path (rootdir imports)

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).parent / "data" / "gpu_probe_job.py"
RAY_BIN = str(Path(sys.executable).parent / "ray")
GPU_TAG = "raypdm_test_gpu_node"

# `raypdm submit` runs the smoke red-team matrix once on this cluster (its model stages must land on the GPU
# node); the probe job checks placement and the upload in the other tests, `ray job submit` included.
PROBE_CONFIG = {"name": "probe", "steps": 1}


# ---------------------------------------------------------------------------------------------- cluster
def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM the `ray start --block` process if this test process dies, so its Ray
    processes never outlive an interrupted run (PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)


def _wait_for(predicate, timeout: float, what: str, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: `ray start` exited with {p.returncode}")
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what}: not ready after {timeout:.0f} s")


def _stop(procs: list[subprocess.Popen], tmp: str) -> None:
    """SIGTERM each `ray start --block` we started; its handler ends the Ray processes it launched. Then
    kill, by pid, any process still naming our session folder (only ours can: the folder is unique)."""
    for p in reversed(procs):  # worker first, then head
        if p.poll() is None:
            p.terminate()
    for p in reversed(procs):
        try:
            p.wait(timeout=10)  # SIGKILL after that: the sweep below still ends its Ray processes
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)
    kill_processes_naming(tmp, timeout=10)


@pytest.fixture(scope="module")
def cluster():
    # Ray's socket paths live under RAY_TMPDIR and must stay under 107 bytes: a short folder in /tmp.
    tmp = tempfile.mkdtemp(prefix="rp", dir="/tmp")
    env = dict(os.environ, RAY_TMPDIR=tmp, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python` in entrypoints
    env.pop("RAY_ADDRESS", None)
    (gcs, dash, client, *node_ports) = _free_ports(3 + 2 * 6)
    url = f"http://127.0.0.1:{dash}"

    def node_flags(ports: list[int]) -> list[str]:
        nm, om, agent, agent_grpc, rte, metrics = ports
        return [f"--node-manager-port={nm}", f"--object-manager-port={om}", f"--dashboard-agent-listen-port={agent}",
                f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={rte}",
                f"--metrics-export-port={metrics}"]

    head_cmd = [RAY_BIN, "start", "--block", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
                "--num-cpus=2", "--num-gpus=0", "--disable-usage-stats", *node_flags(node_ports[:6])]
    worker_tmp = Path(tmp) / "w"  # under `tmp`: _stop finds its processes by that prefix
    worker_tmp.mkdir()
    worker_cmd = [RAY_BIN, "start", "--block", f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1",
                  f"--temp-dir={worker_tmp}",
                  "--num-cpus=2", "--num-gpus=1", f"--resources={json.dumps({GPU_TAG: 1})}", "--disable-usage-stats",
                  *node_flags(node_ports[6:])]
    procs: list[subprocess.Popen] = []
    logs = [open(Path(tmp) / f"{name}.log", "w") for name in ("head", "worker")]
    try:
        procs.append(subprocess.Popen(head_cmd, env=env, stdout=logs[0], stderr=subprocess.STDOUT,
                                      preexec_fn=_die_with_parent))
        _wait_for(lambda: urllib.request.urlopen(f"{url}/api/version", timeout=2).status == 200, 120,
                  "head node", procs)
        procs.append(subprocess.Popen(worker_cmd, env=env, stdout=logs[1], stderr=subprocess.STDOUT,
                                      preexec_fn=_die_with_parent))

        def two_nodes() -> bool:
            from ray.util.state import list_nodes

            return len([n for n in list_nodes(address=url) if n.state == "ALIVE"]) == 2

        _wait_for(two_nodes, 120, "GPU worker node", procs)
        yield {"url": url, "env": env, "tmp": tmp}
    except BaseException:
        for log, name in zip(logs, ("head", "worker")):
            log.flush()
            sys.stderr.write(f"--- ray start ({name}) ---\n{Path(log.name).read_text()[-3000:]}\n")
        raise
    finally:
        _stop(procs, tmp)
        for log in logs:
            log.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def scratch():
    """Our own temporary folder, not pytest's tmp_path: concurrent pytest sessions on a shared machine prune
    each other's numbered basetemp folders, which once deleted the checkout while Ray was uploading it."""
    folder = Path(tempfile.mkdtemp(prefix="raypdm-submit-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def out(scratch, request) -> Path:
    """A fresh --output folder per test (absolute, as `raypdm submit` requires)."""
    return scratch / "out" / request.node.name


@pytest.fixture(scope="module")
def workdir(scratch) -> Path:
    """A checkout to submit from, with the probe as jobs/gpu_probe.py and folders that must not be uploaded."""
    wd = scratch / "checkout"
    shutil.copytree(ROOT / "raypdm", wd / "raypdm", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "jobs", wd / "jobs", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", wd / "pyproject.toml")
    shutil.copy(PROBE, wd / "jobs" / "gpu_probe.py")
    (wd / "jobs" / "configs").mkdir(exist_ok=True)
    (wd / "jobs" / "configs" / "gpu_probe.yaml").write_text(yaml.safe_dump(PROBE_CONFIG))
    for decoy in ("tests/test_decoy.py", ".venv/lib/decoy.py", "benchmarks/results/decoy.parquet"):
        (wd / decoy).parent.mkdir(parents=True, exist_ok=True)
        (wd / decoy).write_text("must not reach the cluster\n")
    (wd / "benchmarks" / "RESULTS.md").write_text("uploaded\n")
    (wd / "benchmarks" / "results" / "plot.png").write_bytes(b"\x89PNG uploaded: the report shows it\n")
    return wd


def _uploaded_files(cwd: str) -> set[str]:
    root = Path(cwd)
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _check_probe(record: dict, workdir: Path) -> None:
    """The driver ran on the head, the GPU task on the tagged GPU node, both on the uploaded code."""
    nodes = {n["node_id"]: n for n in record["nodes"]}
    assert len(nodes) == 2
    (head,) = [n for n in nodes if nodes[n]["is_head"]]
    (gpu_node,) = [n for n in nodes if GPU_TAG in nodes[n]["resources"]]
    assert head != gpu_node
    driver, task = record["driver"], record["gpu_task"]
    assert driver["node_id"] == head, "the driver must stay on the head node"
    assert task["node_id"] == gpu_node, "a num_gpus=1 task must land on the GPU node"
    assert task["gpu_ids"] == ["0"] and task["cuda_visible_devices"] == "0"
    for where in (driver, task):
        # Ray's unpacked copy of the working dir, first on PYTHONPATH: not the installed checkout.
        assert where["raypdm_file"].startswith(os.path.realpath(where["cwd"]) + os.sep), where
        assert not where["raypdm_file"].startswith(str(ROOT) + os.sep)
        assert not where["cwd"].startswith(str(workdir))
        assert where["env"] == {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                                "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    files = _uploaded_files(driver["cwd"])
    assert {"raypdm/__init__.py", "raypdm/submit.py", "jobs/runtime_env.yaml", "jobs/gpu_probe.py",
            "benchmarks/RESULTS.md", "benchmarks/results/plot.png"} <= files
    assert not [f for f in files if f.startswith(("tests/", ".venv/")) or f.endswith(".parquet")], sorted(files)


# ------------------------------------------------------------------------------------------------ tests
def test_submit_job_runs_the_driver_on_the_head_and_gpu_work_on_the_gpu_node(cluster, workdir, out):
    from raypdm.submit import submit_job

    logs: list[str] = []
    submission_id, status = submit_job(
        "gpu_probe", address=cluster["url"], config=None, smoke=True, output=str(out), extra_args=[],
        follow=True, working_dir=str(workdir), echo=logs.append,
    )
    assert submission_id.startswith("raypdm-gpu_probe-")
    assert status == "SUCCEEDED", "".join(logs)[-3000:]
    assert "probe: driver on" in "".join(logs)
    record = json.loads((out / "probe.json").read_text())
    _check_probe(record, workdir)
    # --config defaulted to the job's example config; --smoke and --output reached the entrypoint.
    assert record["config"] == PROBE_CONFIG and record["smoke"] is True
    assert record["argv"] == ["--config", "jobs/configs/gpu_probe.yaml", "--smoke", "--output", str(out)]

    from ray.job_submission import JobSubmissionClient

    info = JobSubmissionClient(cluster["url"]).get_job_info(submission_id)
    assert info.metadata["raypdm_job"] == "gpu_probe" and info.metadata["smoke"] == "true"


@pytest.mark.timeout(1200)
def test_raypdm_submit_runs_the_smoke_redteam_with_model_stages_on_the_gpu_node(cluster, workdir, out):
    from ray.util.state import list_actors, list_nodes

    from raypdm.submit import submit_job

    logs: list[str] = []
    # The smoke's two cells (none + vanilla, codesr + cdl) keep every stage; `--set` after `--` reaches the
    # job's own override parser.
    _, status = submit_job("redteam", address=cluster["url"], config=None, smoke=True, output=str(out),
                           extra_args=["--set", "seeds=[1]"], follow=True, working_dir=str(workdir),
                           echo=logs.append)
    assert status == "SUCCEEDED", "".join(logs)[-4000:]
    resolved = yaml.safe_load((out / "redteam_config.yaml").read_text())
    assert resolved["seeds"] == [1] and resolved["methods"] == ["none + vanilla", "codesr + cdl"]
    for table in ("table1", "table2", "table4"):
        for ext in ("md", "html", "parquet"):
            assert (out / "tables" / f"{table}.{ext}").stat().st_size > 0, (table, ext)
    assert (out / "results.parquet").is_file() and (out / "report.html").stat().st_size > 10_000
    # The model stages' actor pools (protect, CodeSR, sampling, scoring) asked for a GPU: they ran on the GPU node.
    gpu_node = next(n.node_id for n in list_nodes(address=cluster["url"], detail=True)
                    if GPU_TAG in (n.resources_total or {}))
    pools = [a for a in list_actors(address=cluster["url"], detail=True, limit=10_000)
             if "_TransformWorker" in a.class_name or "_ScoreWorker" in a.class_name or "_SampleWorker" in a.class_name]
    assert pools, "no actor pool ran"
    gpu_pools = [a for a in pools if (a.required_resources or {}).get("GPU")]
    assert gpu_pools, sorted({(a.class_name, str(a.required_resources)) for a in pools})
    assert {a.node_id for a in gpu_pools} == {gpu_node}


def test_ray_job_submit_command_line_from_the_checkout(cluster, workdir, out):
    """The command clusters/README.md documents, run from the checkout's root: the probe job, so the placement
    and the upload are checked as they come through Ray's own CLI (the red-team job ran through
    `raypdm submit` above; running it again here only re-read its finished stages, 2 minutes of CI)."""
    from ray.job_submission import JobSubmissionClient

    submission_id = f"cli-gpu_probe-{os.getpid()}"
    cmd = [RAY_BIN, "job", "submit", "--address", cluster["url"], "--submission-id", submission_id,
           "--working-dir", ".", "--runtime-env", "jobs/runtime_env.yaml", "--",
           "python", "jobs/gpu_probe.py", "--config", "jobs/configs/gpu_probe.yaml", "--output", str(out)]
    proc = subprocess.run(cmd, cwd=workdir, env=cluster["env"], capture_output=True, text=True, timeout=280,
                          check=False)
    status = JobSubmissionClient(cluster["url"]).get_job_status(submission_id)
    assert str(status.value) == "SUCCEEDED", (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0
    assert "probe: driver on" in proc.stdout  # `ray job submit` follows the logs by default
    record = json.loads((out / "probe.json").read_text())
    _check_probe(record, workdir)
    assert record["config"] == PROBE_CONFIG and record["smoke"] is False


def test_raypdm_submit_follow_exits_nonzero_when_the_job_fails(cluster, workdir, out):
    from click.testing import CliRunner

    from raypdm.submit import submit_command

    args = ["gpu_probe", "--address", cluster["url"], "--working-dir", str(workdir), "--output", str(out),
            "--follow", "--", "--fail"]
    result = CliRunner().invoke(submit_command, args, env={"RAY_ADDRESS": None})
    assert result.exit_code == 1, result.output
    assert "submitted raypdm-gpu_probe-" in result.output
    assert "probe: driver on" in result.output  # the followed logs
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("job raypdm-gpu_probe-") and " FAILED" in last
    # The probe wrote its record before failing: extra args after `--` reached it.
    assert json.loads((out / "probe.json").read_text())["argv"][-1] == "--fail"
