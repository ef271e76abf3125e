"""The cluster files (clusters/**, jobs/runtime_env.yaml) and `raypdm submit`, checked without a cluster.

- Every YAML under clusters/ and jobs/ parses. Launcher configs pass Ray's own schema (`prepare_config` +
  `validate_config`, what `ray up` runs before touching a cloud) and keep the head free of work, GPU workers
  autoscaling, spot for inference and on-demand for training, and the dashboard on 127.0.0.1. KubeRay
  manifests have the fields the operator needs (ray.io/v1, rayVersion, head and GPU worker groups with
  nvidia.com/gpu limits and tolerations, a /tmp/ray emptyDir, the shared PVC) and a RayJob entrypoint.
- Every `jobs/...py` / `jobs/configs/...yaml` the files mention exists, and entrypoints are the job set.
- Nothing publishes the dashboard (no 0.0.0.0, no LoadBalancer/NodePort) and no file holds a credential.
- The runtime env's excludes, applied by Ray's own packager, keep tests/.venv/results out and the code in.
- `raypdm submit` against a fake job client: entrypoint, runtime env, metadata, errors, exit codes.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest
import ray
import yaml

from raypdm.cli.jobs import JOBS as JOB_TABLE

ROOT = Path(__file__).resolve().parents[2]
CLUSTERS = ROOT / "clusters"
JOBS = ROOT / "jobs"
# The job entrypoints the cluster files may name (jobs/<name>.py, each taking --config/--output/--smoke):
# the job table's names and their aliases.
JOB_ENTRYPOINTS = tuple(name for spec in JOB_TABLE for name in (spec.name, *spec.aliases))
LAUNCHER_CONFIGS = ("aws-gpu.yaml", "gcp-gpu.yaml")
KUBERAY = CLUSTERS / "kuberay"
IMAGE_RE = re.compile(rf"rayproject/ray:{re.escape(ray.__version__)}-py311-cu1\d\d$")


def _yaml_files() -> list[Path]:
    return sorted([*CLUSTERS.rglob("*.yaml"), *JOBS.rglob("*.yaml")])


def _docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _strings(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


def _cluster_texts() -> dict[Path, str]:
    return {p: p.read_text() for p in sorted(CLUSTERS.rglob("*")) if p.is_file()}


def _kuberay(kind: str) -> list[dict]:
    return [d for p in sorted(KUBERAY.glob("*.yaml")) for d in _docs(p) if d.get("kind") == kind]


def _ray_cluster_specs() -> list[tuple[str, dict]]:
    specs = [(d["metadata"]["name"], d["spec"]) for d in _kuberay("RayCluster")]
    specs += [(d["metadata"]["name"], d["spec"]["rayClusterSpec"]) for d in _kuberay("RayJob")]
    return specs


# ------------------------------------------------------------------------------------------- all files
def test_the_cluster_files_exist():
    for name in (*LAUNCHER_CONFIGS, "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/shared.yaml",
                 "docker/Dockerfile", "README.md"):
        assert (CLUSTERS / name).is_file(), f"clusters/{name} is missing"
    assert (JOBS / "runtime_env.yaml").is_file()


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_parses(path):
    assert _docs(path), f"{path.relative_to(ROOT)} is empty"


def test_referenced_entrypoints_and_configs_exist():
    """Every jobs/X.py names one of the job entrypoints, and it and every jobs/configs/X.yaml mentioned in
    clusters/ exist (the entrypoints arrive with the jobs/ package)."""
    # Lower-case names only: `jobs/JOB.py` in prose is a placeholder.
    ref = re.compile(r"\bjobs/(?:configs/)?[a-z0-9_][a-z0-9_.-]*\.(?:py|yaml)\b")
    seen = set()
    for path, text in _cluster_texts().items():
        for match in ref.findall(text):
            seen.add(match)
            assert (ROOT / match).is_file(), f"{path.relative_to(ROOT)} names {match}, which does not exist"
            if match.endswith(".py"):
                assert Path(match).stem in JOB_ENTRYPOINTS, f"{path.relative_to(ROOT)}: {match} is not a job entrypoint"
    assert "jobs/redteam.py" in seen and "jobs/runtime_env.yaml" in seen


def test_nothing_binds_the_dashboard_publicly():
    for path, text in _cluster_texts().items():
        assert "0.0.0.0" not in text, f"{path.relative_to(ROOT)} mentions 0.0.0.0"
    for path in _yaml_files():
        for doc in _docs(path):
            if isinstance(doc, dict) and doc.get("kind") == "Service":
                assert doc.get("spec", {}).get("type", "ClusterIP") == "ClusterIP", path
    for name, spec in _ray_cluster_specs():
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", name
        assert "dashboard-host" not in spec["headGroupSpec"].get("rayStartParams", {}), name
    for path, text in _cluster_texts().items():
        assert not re.search(r"\b(LoadBalancer|NodePort)\b", text.replace("no LoadBalancer, no NodePort", "")), path


def test_no_credentials_in_the_files():
    secret_patterns = [
        r"AKIA[0-9A-Z]{16}",  # AWS access key id
        r"(?i)aws_secret_access_key\s*[:=]",
        r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
        r"(?i)\"private_key\"\s*:",  # GCP service account JSON
        r"(?i)password\s*[:=]\s*\S",
    ]
    for path, text in {**_cluster_texts(), JOBS / "runtime_env.yaml": (JOBS / "runtime_env.yaml").read_text()}.items():
        for pattern in secret_patterns:
            assert not re.search(pattern, text), f"{path.relative_to(ROOT)} matches {pattern}"
    # Tokens only ever come from Secrets or files on the user's machine, never as literal values.
    for _, spec in _ray_cluster_specs():
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            for c in group["template"]["spec"]["containers"]:
                for env in c.get("env", []):
                    if env["name"] in ("RAY_AUTH_TOKEN", "AWS_SECRET_ACCESS_KEY", "GOOGLE_APPLICATION_CREDENTIALS"):
                        assert "value" not in env, f"{env['name']} must come from a Secret"


# ---------------------------------------------------------------------------------- launcher configs
@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_passes_rays_schema_and_keeps_the_shape(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((CLUSTERS / name).read_text())
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers"):
        assert key in cfg, f"clusters/{name}: {key} is required"
    assert cfg["provider"]["type"] in ("aws", "gcp")
    validate_config(prepare_config(cfg))  # what `ray up` checks first; raises with the offending field

    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and head["resources"].get("GPU", 0) == 0, "the head must take no work"
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert workers and all(w["resources"].get("GPU", 0) >= 1 for w in workers.values())
    for k, w in workers.items():  # autoscaling from zero
        assert w.get("min_workers", 0) == 0 and w["max_workers"] > 0, k
    assert sum(w["max_workers"] for w in workers.values()) <= cfg["max_workers"]

    def is_spot(node_config: dict) -> bool:
        aws = node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
        gcp = node_config.get("scheduling", {}).get("provisioningModel") == "SPOT"
        return aws or gcp

    spot = [k for k, w in workers.items() if is_spot(w["node_config"])]
    on_demand = [k for k, w in workers.items() if not is_spot(w["node_config"])]
    assert spot and on_demand, "spot workers for inference, on-demand workers for training"
    assert all("spot_gpu" in workers[k]["resources"] for k in spot)
    assert all("ondemand_gpu" in workers[k]["resources"] for k in on_demand)

    assert IMAGE_RE.match(cfg["docker"]["image"]), cfg["docker"]["image"]
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start, "Ray's default binds the dashboard on every interface"
    assert any("/mnt/shared" in o for o in cfg["docker"]["run_options"]), "shared storage must reach the container"
    assert any("mount" in c and "/mnt/shared" in c for c in cfg["initialization_commands"])
    assert "RAY_AUTH_MODE=token" in " ".join(cfg["docker"]["run_options"])
    assert "~/.ray/auth_token" in cfg["file_mounts"], "the token is copied from the user's machine"


# ------------------------------------------------------------------------------------------- KubeRay
def _groups(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def test_kuberay_manifests_have_what_the_operator_needs():
    docs = [d for p in sorted(KUBERAY.glob("*.yaml")) for d in _docs(p)]
    kinds = {d["kind"] for d in docs}
    assert {"RayCluster", "RayJob", "PersistentVolumeClaim", "ServiceAccount"} <= kinds
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    for d in docs:
        if d["kind"] in ("RayCluster", "RayJob"):
            assert d["apiVersion"] == "ray.io/v1", d["metadata"]["name"]
    for name, spec in _ray_cluster_specs():
        assert spec["rayVersion"] == ray.__version__, name
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", f"{name}: the head must take no work"
        assert spec["workerGroupSpecs"], name
        for group_name, group in _groups(spec):
            pod = group["template"]["spec"]
            assert pod["serviceAccountName"] in accounts, (name, group_name)
            volumes = {v["name"]: v for v in pod["volumes"]}
            (container,) = pod["containers"]
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert "emptyDir" in volumes[mounts["/tmp/ray"]], f"{name}/{group_name}: /tmp/ray must be an emptyDir"
            assert volumes[mounts["/mnt/shared"]]["persistentVolumeClaim"]["claimName"] in claims
            limits = container["resources"]["limits"]
            if group_name == "head":
                assert "nvidia.com/gpu" not in limits
                continue
            assert int(limits["nvidia.com/gpu"]) >= 1, f"{name}/{group_name}: GPU limit"
            assert group["minReplicas"] == 0 and group["maxReplicas"] > 0, f"{name}/{group_name}: autoscaling"
            assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]), f"{name}/{group_name}: GPU taint"
        if spec.get("enableInTreeAutoscaling") is not True:
            raise AssertionError(f"{name}: the autoscaler must be on")
        assert spec["authOptions"]["mode"] == "token", name
    for d in docs:
        for container in _containers(d):
            assert container["image"] == "raypdm:0.1.0", "the image built from clusters/docker/Dockerfile"


def _containers(doc: dict) -> list[dict]:
    if doc["kind"] == "RayCluster":
        spec = doc["spec"]
    elif doc["kind"] == "RayJob":
        spec = doc["spec"]["rayClusterSpec"]
    else:
        return []
    return [c for _, g in _groups(spec) for c in g["template"]["spec"]["containers"]]


def test_rayjob_entrypoint_runs_a_job_with_the_runtime_env_of_jobs():
    (job,) = _kuberay("RayJob")
    argv = job["spec"]["entrypoint"].split()
    assert argv[0] == "python" and argv[1].startswith("jobs/") and Path(argv[1]).stem in JOB_ENTRYPOINTS
    assert (ROOT / argv[1]).is_file(), f"RayJob entrypoint {argv[1]} does not exist"
    config = argv[argv.index("--config") + 1]
    assert (ROOT / config).is_file(), f"RayJob config {config} does not exist"
    assert argv[argv.index("--output") + 1].startswith("/mnt/shared/")
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    shared = yaml.safe_load((JOBS / "runtime_env.yaml").read_text())
    assert env["env_vars"] == shared["env_vars"], "keep the RayJob's env in step with jobs/runtime_env.yaml"
    assert env["working_dir"] == "/home/ray/raypdm"
    assert "WORKDIR /home/ray/raypdm" in (CLUSTERS / "docker" / "Dockerfile").read_text()


def test_dockerfile_builds_on_the_current_ray_image():
    text = (CLUSTERS / "docker" / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)
    assert IMAGE_RE.match(base), base
    assert "ray-ml" not in base
    launcher_images = {yaml.safe_load((CLUSTERS / n).read_text())["docker"]["image"] for n in LAUNCHER_CONFIGS}
    assert launcher_images == {base}
    for copied in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", text, flags=re.MULTILINE):
        for src in copied.split():
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"


# ----------------------------------------------------------------------------------------- runtime env
def test_runtime_env_ships_the_code_and_leaves_the_rest_out():
    from ray._private.runtime_env.packaging import create_package

    env = yaml.safe_load((JOBS / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    assert "pip" not in env and "conda" not in env, "dependencies come from the image (see the file's comment)"
    assert all(isinstance(v, str) for v in env["env_vars"].values()), "Ray requires string env values"
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    tree = Path(tempfile.mkdtemp(prefix="rp-env-"))
    try:
        files = ["raypdm/__init__.py", "raypdm/submit.py", "jobs/redteam.py", "jobs/runtime_env.yaml",
                 "jobs/configs/redteam.yaml", "benchmarks/RESULTS.md", "pyproject.toml",
                 "tests/unit/test_x.py", ".venv/lib/site.py", "benchmarks/results/r.parquet", "runs/a/b.png",
                 "benchmarks/results/plot.png",
                 ".git/HEAD", "raypdm/__pycache__/x.pyc", "raypdm.egg-info/PKG-INFO", "weights/unet.safetensors"]
        for f in files:
            (tree / f).parent.mkdir(parents=True, exist_ok=True)
            (tree / f).write_text("x")
        pkg = tree.parent / f"{tree.name}.zip"
        create_package(str(tree), pkg, include_gitignore=True, excludes=env["excludes"])
        shipped = set(zipfile.ZipFile(pkg).namelist())
        pkg.unlink()
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    assert shipped == {"raypdm/__init__.py", "raypdm/submit.py", "jobs/redteam.py", "jobs/runtime_env.yaml",
                       "jobs/configs/redteam.yaml", "benchmarks/RESULTS.md", "pyproject.toml",
                       "benchmarks/results/plot.png"}  # the report shows the benchmark plots


# ------------------------------------------------------------------------------ raypdm submit (no cluster)
class FakeJobClient:
    """Stands in for ray.job_submission.JobSubmissionClient; records what was submitted."""

    submitted: ClassVar[list[dict]] = []
    final_status = "SUCCEEDED"

    def __init__(self, address):
        self.address = address

    def submit_job(self, **kwargs):
        FakeJobClient.submitted.append({"address": self.address, **kwargs})
        return kwargs["submission_id"]

    async def tail_job_logs(self, submission_id):
        for line in ("starting\n", "done\n"):
            yield line

    def get_job_status(self, submission_id):
        from ray.job_submission import JobStatus

        return JobStatus(self.final_status)

    def get_job_info(self, submission_id):
        return SimpleNamespace(message="Job entrypoint command failed with exit code 3, last available logs "
                                       "(truncated to 20,000 chars):\ndone")


@pytest.fixture
def fake_client(monkeypatch):
    import ray.job_submission

    FakeJobClient.submitted = []
    FakeJobClient.final_status = "SUCCEEDED"
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeJobClient)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return FakeJobClient


@pytest.fixture
def checkout(monkeypatch):
    """A minimal checkout (own temp folder: concurrent pytest sessions prune each other's tmp_path)."""
    root = Path(tempfile.mkdtemp(prefix="rp-checkout-"))
    for f in ("jobs/purify.py", "jobs/redteam.py", "jobs/_helpers.py", "jobs/configs/redteam.yaml",
              "tests/cfg.yaml", "my.yaml"):
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text("x: 1\n")
    shutil.copy(JOBS / "runtime_env.yaml", root / "jobs" / "runtime_env.yaml")
    monkeypatch.chdir(root)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _submit(**kwargs):
    from raypdm.submit import submit_job

    args = {"address": "http://127.0.0.1:8265", "config": None, "smoke": False, "output": None, "extra_args": [],
            "follow": False}
    args.update(kwargs)
    return submit_job(args.pop("job", "redteam"), **args)


def test_submit_builds_the_entrypoint_runtime_env_and_metadata(fake_client, checkout):
    sid, status = _submit(smoke=True, output="/mnt/shared/runs/x", extra_args=["--set", "seed=1"])
    assert status is None and sid.startswith("raypdm-redteam-")
    (sub,) = fake_client.submitted
    assert sub["address"] == "http://127.0.0.1:8265"
    assert sub["entrypoint"] == ("python jobs/redteam.py --config jobs/configs/redteam.yaml --smoke "
                                 "--output /mnt/shared/runs/x --set seed=1")
    assert sub["runtime_env"]["working_dir"] == str(checkout.resolve())
    assert sub["runtime_env"]["env_vars"]["HF_HUB_OFFLINE"] == "1" and "/tests" in sub["runtime_env"]["excludes"]
    # No entrypoint resources: Ray pins the driver to the head, which advertises no CPUs.
    assert sub["entrypoint_num_cpus"] is None
    assert sub["metadata"]["raypdm_job"] == "redteam" and sub["metadata"]["smoke"] == "true"
    assert all(isinstance(v, str) for v in sub["metadata"].values())


def test_submit_options_config_address_and_driver_cpus(fake_client, checkout, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:8265")
    _submit(job="purify", address=None, config="my.yaml", driver_cpus=0.5, output="s3://bucket/run")
    sub = fake_client.submitted[-1]
    assert sub["address"] == "http://127.0.0.1:8265"  # RAY_ADDRESS, scheme added
    assert sub["entrypoint"] == "python jobs/purify.py --config my.yaml --output s3://bucket/run"
    assert sub["entrypoint_num_cpus"] == 0.5
    _submit(job="purify", config="gs://bucket/cfg.yaml")
    assert fake_client.submitted[-1]["entrypoint"] == "python jobs/purify.py --config gs://bucket/cfg.yaml"
    _submit(job="purify", runtime_env={"env_vars": {"A": "1"}})  # no example config for purify here
    assert fake_client.submitted[-1]["entrypoint"] == "python jobs/purify.py"
    assert fake_client.submitted[-1]["runtime_env"] == {"env_vars": {"A": "1"}, "working_dir": str(checkout.resolve())}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"job": "nope"}, "unknown job 'nope'; jobs in .*: purify, redteam$"),
        ({"address": None}, "pass --address .* or set RAY_ADDRESS"),
        ({"address": "ray://head:10001"}, "an address for ray.init; job submission talks to the dashboard"),
        ({"address": "auto"}, "'auto', an address for ray.init"),
        ({"output": "runs/x"}, "--output runs/x is a relative path"),
        ({"config": "missing.yaml"}, "--config missing.yaml: file not found"),
        ({"config": "tests/cfg.yaml"}, "excluded from the upload"),
        ({"config": str(ROOT / "pyproject.toml")}, "outside the working directory"),
        ({"driver_cpus": -1}, "--driver-cpus must be >= 0"),
    ],
)
def test_submit_refuses_what_cannot_work_before_uploading(fake_client, checkout, kwargs, message):
    from raypdm.submit import SubmitError

    with pytest.raises(SubmitError, match=message):
        _submit(**kwargs)
    assert fake_client.submitted == []


def test_submit_without_jobs_says_where_it_looked(fake_client, tmp_path):
    from raypdm.submit import SubmitError

    with pytest.raises(SubmitError, match=r"none \(no .*/jobs/\*\.py: run from the repository root"):
        _submit(working_dir=str(tmp_path))


def test_submit_follow_returns_the_final_status(fake_client, checkout):
    logs = []
    _, status = _submit(follow=True, echo=logs.append)
    assert status == "SUCCEEDED" and logs == ["starting\n", "done\n"]


@pytest.mark.parametrize(("final", "exit_code"), [("SUCCEEDED", 0), ("FAILED", 1), ("STOPPED", 1)])
def test_cli_follow_prints_the_status_and_sets_the_exit_code(fake_client, checkout, final, exit_code):
    from click.testing import CliRunner

    from raypdm.submit import submit_command

    fake_client.final_status = final
    result = CliRunner().invoke(
        submit_command, ["redteam", "--address", "http://127.0.0.1:8265", "--smoke", "--follow",
                         "--output", "/mnt/shared/runs/x", "--", "--set", "seed=1"])
    assert result.exit_code == exit_code, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("submitted raypdm-redteam-") and lines[1:3] == ["starting", "done"]
    assert lines[-1].startswith("job raypdm-redteam-") and f" {final}" in lines[-1]
    if final == "FAILED":  # Ray's message, without the log tail it repeats
        assert lines[-1].endswith("FAILED: Job entrypoint command failed with exit code 3")
    assert fake_client.submitted[-1]["entrypoint"].endswith("--smoke --output /mnt/shared/runs/x --set seed=1")


def test_cli_errors_are_one_line_messages(fake_client, checkout):
    from click.testing import CliRunner

    from raypdm.submit import submit_command

    result = CliRunner().invoke(submit_command, ["redteam"])
    assert result.exit_code == 1
    assert "Error: no cluster address: pass --address" in result.output and "RAY_ADDRESS" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(submit_command, ["redteam", "--address", "http://127.0.0.1:8265"])
    assert result.exit_code == 0 and "ray job logs --address http://127.0.0.1:8265 --follow raypdm-redteam-" in result.output


def test_cli_reports_an_unreachable_job_server(checkout, monkeypatch):
    from click.testing import CliRunner

    from raypdm.submit import submit_command

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # Nothing listens on port 9 (discard) on 127.0.0.1 here: the real client fails to connect.
    result = CliRunner().invoke(submit_command, ["redteam", "--address", "http://127.0.0.1:9"])
    assert result.exit_code == 1
    assert "cannot reach the Ray job server at http://127.0.0.1:9" in result.output and "port-forward" in result.output
