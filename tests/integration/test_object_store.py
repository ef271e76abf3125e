"""raypdm against a real S3 API: a moto server on 127.0.0.1 reached through s3fs, with the endpoint and the
credentials in the usual environment variables, commands typed as a user types them (the CLI, relative
working directory, fresh TORCH_HOME/HF_HOME).

- purify on S3: outputs and manifest agree, a re-run skips everything, a rival run is refused by the lock on
  S3, a killed run converges on the re-run, no credential string in any object or any output line;
- bad credentials, a missing bucket, an unreachable endpoint: one line, exit 2, before Ray starts;
- the whole red-team chain (protect -> purify -> train -> sample -> evaluate) from s3:// inputs to s3://
  outputs, and again: everything resumed."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from procs import kill_processes_naming  # noqa: E402 (tests/integration is on sys.path)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from test_demo import fresh_env, raypdm_cmd  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

KEY, SECRET = "AKIARAYPDMTESTKEY042", "raypdm-test-secret-7f3a9c0d"  # distinctive: searched for in every output
IN, OUT = "raypdm-in", "raypdm-out"  # S3 bucket names need 3-63 characters


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _moto(tmp: Path, extra_env: dict[str, str] | None = None):
    port = _free_port()
    exe = Path(sys.executable).parent / "moto_server"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
    proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)], stdout=open(tmp / f"moto-{port}.log", "w"),
                            stderr=subprocess.STDOUT, env={**os.environ, **(extra_env or {})})
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "moto_server did not start"
            time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port}"


def _aws(endpoint: str, key: str = KEY, secret: str = SECRET) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server with the buckets `raypdm-in` (a synthetic dataset under data/) and `raypdm-out`."""
    tmp = tmp_path_factory.mktemp("moto")
    proc, endpoint = _moto(tmp)
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                          region_name="us-east-1")
    for bucket in (IN, OUT):
        client.create_bucket(Bucket=bucket)
    env = {**fresh_env(tmp), **_aws(endpoint)}
    res = subprocess.run([*raypdm_cmd(), "data", "make-synthetic", "--output", f"s3://{IN}/data",
                          "--num-identities", "2", "--images", "7", "--size", "64", "--seed", "0"],
                         cwd=tmp, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    yield endpoint
    proc.terminate()
    proc.wait(timeout=30)


def _fs(endpoint: str):
    import s3fs

    return s3fs.S3FileSystem(key=KEY, secret=SECRET, client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)


def _workdir(tmp_path: Path, endpoint: str) -> tuple[Path, dict[str, str]]:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    return cwd, {**fresh_env(tmp_path), **_aws(endpoint)}


def _purify(prefix: str, *extra: str) -> list[str]:
    return [*raypdm_cmd(), "purify", "--input", f"s3://{IN}/data", "--output", f"s3://{OUT}/{prefix}", "--purifier",
            "jpeg", "--lpips", "random", "--no-faithfulness", "--no-progress", *extra]


def _manifest(endpoint: str, root: str):
    import pyarrow.parquet as pq

    with _fs(endpoint).open(f"{root}/manifest.parquet", "rb") as f:
        return pq.read_table(f).to_pylist()


def _check_agrees(endpoint: str, root: str, n: int) -> None:
    """Every row's object exists with its size and sha256; nothing staged, no lock, no probe left behind."""
    fs = _fs(endpoint)
    rows = _manifest(endpoint, root)
    assert len(rows) == n and len({(r["identity"], r["split"], r["name"]) for r in rows}) == n
    for r in rows:
        assert r["error"] is None, r
        data = fs.cat_file(r["uri"])
        assert len(data) == r["output_bytes"] and hashlib.sha256(data).hexdigest() == r["output_sha256"], r["uri"]
    names = fs.find(root)
    assert not [p for p in names if ".tmp-" in p or ".raypdm.lock" in p or ".raypdm.probe" in p], names
    assert len([p for p in names if p.endswith(".png")]) == n


def _no_credentials(endpoint: str, root: str, *texts: str) -> None:
    fs = _fs(endpoint)
    for path in fs.find(root):
        data = fs.cat_file(path)
        assert KEY.encode() not in data and SECRET.encode() not in data, path
    for text in texts:
        assert KEY not in text and SECRET not in text


@pytest.mark.slow  # four CLI runs with Ray: ~35 s
def test_purify_on_s3_resumes_refuses_a_rival_and_converges_after_a_kill(s3, tmp_path):
    cwd, env = _workdir(tmp_path, s3)
    root = f"{OUT}/purified"
    # a run holding the lock on S3 (another process): this run is refused before Ray starts
    from raypdm.data.lock import OutputLock

    os.environ.update(_aws(s3))
    try:
        rival = OutputLock(f"s3://{root}", run_id="rival-run", command="raypdm purify (rival)")
        rival.acquire()
        try:
            res = subprocess.run(_purify("purified"), cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
            assert res.returncode == 2 and "being written by another run" in res.stderr, res.stderr[-2000:]
            assert "rival-run" in res.stderr and "Traceback" not in res.stderr
        finally:
            rival.release()
    finally:
        for k in _aws(s3):
            os.environ.pop(k, None)

    # killed once its first rows are durable on S3, then run again: converges
    proc = subprocess.Popen(_purify("purified"), cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    fs, deadline = _fs(s3), time.monotonic() + 240
    try:
        while not fs.exists(f"{root}/_manifest_parts") or not fs.ls(f"{root}/_manifest_parts", refresh=True):
            assert proc.poll() is None, "the run ended before its first manifest part appeared"
            assert time.monotonic() < deadline
            fs.invalidate_cache()
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_processes_naming(env["RAY_TMPDIR"])
    first = subprocess.run(_purify("purified"), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "taking over the lock" in first.stderr, first.stderr[-2000:]
    _check_agrees(s3, root, 42)
    again = subprocess.run(_purify("purified"), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "42 outputs verified, 42 inputs skipped" in again.stdout, again.stdout[-2000:]
    _check_agrees(s3, root, 42)
    _no_credentials(s3, root, first.stdout, first.stderr, again.stdout, again.stderr)


def _one_line_error(res: subprocess.CompletedProcess, env: dict[str, str], *expected: str) -> None:
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    for text in expected:
        assert text in errors[0], errors[0]
    assert not list(Path(env["RAY_TMPDIR"]).iterdir()), "Ray was started before the check"
    _no_credentials_in(res)


def _no_credentials_in(res: subprocess.CompletedProcess) -> None:
    assert KEY not in res.stdout + res.stderr and SECRET not in res.stdout + res.stderr


@pytest.mark.slow  # a baseline run with Ray, and botocore's retries against a closed port: ~30 s
def test_a_missing_bucket_or_endpoint_is_one_line_before_ray_starts(s3, tmp_path):
    cwd, env = _workdir(tmp_path, s3)
    res = subprocess.run(_purify("x"), cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]  # the baseline works (and leaves a clean root)
    kill_processes_naming(env["RAY_TMPDIR"])
    for i, (cmd, expected) in enumerate([
        ([*raypdm_cmd(), "purify", "--input", f"s3://{IN}/data", "--output", "s3://raypdm-typo/x", "--purifier", "jpeg",
          "--lpips", "random"], ("bucket 'raypdm-typo'", "does not exist", "never creates")),
        ([*raypdm_cmd(), "purify", "--input", "s3://raypdm-gone/data", "--output", f"s3://{OUT}/y", "--purifier",
          "jpeg", "--lpips", "random"], ("bucket 'raypdm-gone' of the input",)),
        ([*raypdm_cmd(), "purify", "--input", f"s3://{IN}/nothing-here", "--output", f"s3://{OUT}/y", "--purifier",
          "jpeg", "--lpips", "random"], ("the input s3://raypdm-in/nothing-here does not exist",)),
    ]):
        (tmp_path / f"case{i}").mkdir()
        _, fresh = _workdir(tmp_path / f"case{i}", s3)
        res = subprocess.run(cmd, cwd=cwd, env=fresh, capture_output=True, text=True, timeout=120)
        _one_line_error(res, fresh, *expected)
    import boto3

    client = boto3.client("s3", endpoint_url=s3, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                          region_name="us-east-1")
    assert "raypdm-typo" not in {b["Name"] for b in client.list_buckets()["Buckets"]}  # not created on the way
    assert not _fs(s3).exists(f"{OUT}/y")  # nothing written for the refused runs
    # nothing listens there: said in one line too
    (tmp_path / "closed").mkdir()
    _, fresh = _workdir(tmp_path / "closed", f"http://127.0.0.1:{_free_port()}")
    res = subprocess.run(_purify("z"), cwd=cwd, env=fresh, capture_output=True, text=True, timeout=300)
    _one_line_error(res, fresh, "cannot reach the bucket 'raypdm-in' of the input", "EndpointConnectionError")


def test_bad_credentials_are_one_line_before_ray_starts(tmp_path):
    # A second moto server that checks credentials (its first actions, our set-up, are let through).
    proc, endpoint = _moto(tmp_path, {"INITIAL_NO_AUTH_ACTION_COUNT": "1"})
    try:
        import boto3

        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                     region_name="us-east-1").create_bucket(Bucket=IN)
        cwd, env = _workdir(tmp_path, endpoint)
        res = subprocess.run(_purify("p"), cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
        _one_line_error(res, env, "access denied", "AWS_ACCESS_KEY_ID", "IAM role")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_the_red_team_chain_runs_from_s3_to_s3_and_resumes(s3, tmp_path):
    """protect -> purify -> train (checkpoints through Ray Train's storage) -> sample -> evaluate, inputs in
    s3://raypdm-in, every output under s3://raypdm-out; the same command again resumes every stage."""
    cwd, env = _workdir(tmp_path, s3)
    cmd = [*raypdm_cmd(), "redteam", "--smoke", "--data", f"s3://{IN}/data", "--output", f"s3://{OUT}/redteam",
           "--identities", "id000", "--no-progress"]  # one identity: every stage still runs, in half the time
    first = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    kill_processes_naming(env["RAY_TMPDIR"])
    fs = _fs(s3)
    names = fs.find(f"{OUT}/redteam")
    for stage in ("protect", "purify", "train", "sample", "evaluate", "tables"):
        assert any(p.startswith(f"{OUT}/redteam/{stage}/") for p in names), stage
    assert any(p.endswith("/export/model_index.json") for p in names)  # trained pipelines exported to S3
    assert any(p.endswith("report.html") for p in names)
    assert not [p for p in names if ".tmp-" in p or ".raypdm.lock" in p or ".raypdm.probe" in p]
    second = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    table = [line for line in second.stdout.splitlines() if line.startswith("│")]
    done = [line.split("│")[3].strip() for line in table]
    assert table and set(done) == {"0"}, second.stdout[-3000:]  # every stage resumed, nothing redone
    _no_credentials(s3, f"{OUT}/redteam", first.stdout, first.stderr, second.stdout, second.stderr)


@pytest.mark.slow  # one purify run with Ray: ~15 s
def test_a_storage_options_file_reaches_the_driver_and_the_workers_and_no_output(s3, tmp_path):
    """No AWS_* variables at all: endpoint and keys only in --storage-options (what fsspec's s3fs takes)."""
    cwd, env = _workdir(tmp_path, s3)
    for k in list(env):
        if k.startswith("AWS_"):
            env.pop(k)
    env["AWS_EC2_METADATA_DISABLED"] = "true"  # no instance-role lookup on a machine without one
    (cwd / "creds.yaml").write_text(f"s3:\n  endpoint_url: {s3}\n  key: {KEY}\n  secret: {SECRET}\n")
    res = subprocess.run(_purify("with-options", "--storage-options", "creds.yaml"), cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    kill_processes_naming(env["RAY_TMPDIR"])
    _check_agrees(s3, f"{OUT}/with-options", 42)
    _no_credentials(s3, f"{OUT}/with-options", res.stdout, res.stderr)
    (cwd / "bad.yaml").write_text("s3: [not, a, mapping]\n")
    bad = subprocess.run(_purify("never", "--storage-options", "bad.yaml"), cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "--storage-options bad.yaml: s3 must be a mapping" in bad.stderr, bad.stderr
