"""`raypdm models fetch` against a local mirror: hub files through HF_ENDPOINT, release-URL files, resume,
corrupt files, files already present. Nothing leaves 127.0.0.1."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from raypdm import models
from raypdm.models import registry
from raypdm.models.cli import models_cli
from raypdm.models.fetch import fetch_models
from raypdm.models.registry import ModelSpec, WeightFile
from raypdm.models.weights import load_weights_into, module_layout, read_state_dict

REVISION = "0123456789abcdef0123456789abcdef01234567"
HUB_REPO = "raypdm-test/tiny-linear"
_HUB_PATH = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


class Mirror:
    """What the server holds and what it was asked for."""

    def __init__(self):
        self.files: dict[str, bytes] = {}  # URL path -> body
        self.drop_after: dict[str, int] = {}  # URL path -> bytes sent before the first GET is cut off
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)

    def gets(self, path: str) -> list[str | None]:
        return [rng for method, p, rng in self.requests if method == "GET" and p == path]


def _handler(mirror: Mirror):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep pytest output clean
            pass

        def do_HEAD(self):
            self._serve(head=True)

        def do_GET(self):
            self._serve(head=False)

        def _serve(self, head: bool):
            path = urlsplit(self.path).path
            mirror.requests.append((self.command, path, self.headers.get("Range")))
            data = mirror.files.get(path)
            if data is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start, status = 0, 200
            if rng := self.headers.get("Range"):
                start, status = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1)), 206
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
            body = data[start:]
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            if m := _HUB_PATH.match(path):
                # huggingface_hub refuses an endpoint without these (see shared/ENVIRONMENT.md).
                self.send_header("X-Repo-Commit", m["rev"])
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.end_headers()
            if head:
                return
            cut = mirror.drop_after.pop(path, None) if not self.headers.get("Range") else None
            if cut is not None:
                self.wfile.write(body[:cut])  # then close: the client sees a short body
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler


@pytest.fixture
def mirror(monkeypatch, tmp_path):
    from huggingface_hub import constants

    state = Mirror()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", state.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("RAYPDM_CACHE_DIR", str(tmp_path / "raypdm-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets HF_HUB_OFFLINE=1 for every test
    models.list_models()  # built-ins register lazily: into the real registry, before it is swapped for a copy
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    yield state
    server.shutdown()
    server.server_close()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _linear(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 3)


def _safetensors_bytes(module: torch.nn.Module, tmp_path: Path) -> bytes:
    path = tmp_path / "src.safetensors"
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, path)
    return path.read_bytes()


def _register(name: str, files: tuple[WeightFile, ...], hub: bool) -> ModelSpec:
    return models.register(ModelSpec(
        name=name, description="test model", licence="MIT", licence_note="",
        hub_repo=HUB_REPO if hub else None, hub_revision=REVISION if hub else None, files=files,
        builder=lambda preset, device, dtype: _linear(),
        loader=lambda model_dir, device, dtype: load_weights_into(
            torch.nn.Linear(4, 3, device="meta"), model_dir / "model.safetensors"),
        layouts=lambda: {"linear": module_layout(torch.nn.Linear(4, 3, device="meta"))},
    ))  # fmt: skip


@pytest.fixture
def hub_model(mirror, tmp_path):
    """A hub-layout test model: a config and a safetensors file, both pinned, served at the revision."""
    weights = _safetensors_bytes(_linear(), tmp_path)
    config = json.dumps({"in_features": 4, "out_features": 3}).encode()
    base = f"/{HUB_REPO}/resolve/{REVISION}"
    mirror.files[f"{base}/config.json"] = config
    mirror.files[f"{base}/model.safetensors"] = weights
    spec = _register("test-hub", (
        WeightFile("config.json", sha256=_sha(config)),
        WeightFile("model.safetensors", sha256=_sha(weights), layout="linear"),
    ), hub=True)  # fmt: skip
    return spec, base, weights


@pytest.fixture
def url_model(mirror):
    """A release-URL test model: one pickle of tensors, pinned."""
    data = bytes(range(256)) * 4096  # 1 MiB: several of fetch's 256 KiB chunks, so a cut leaves a partial file
    mirror.files["/releases/net.pth"] = data
    spec = _register("test-url", (WeightFile("net.pth", sha256=_sha(data), url=f"{mirror.url}/releases/net.pth"),),
                     hub=False)  # fmt: skip
    return spec, "/releases/net.pth", data


def _by_file(results):
    return {r.file: r for r in results}


def test_hub_fetch_lands_in_the_layout_load_and_check_accept(hub_model, tmp_path, monkeypatch):
    results = _by_file(fetch_models(tmp_path / "w", ["test-hub"]))
    assert {f: (r.status, r.sha256) for f, r in results.items()} == {
        "config.json": ("downloaded", "ok"), "model.safetensors": ("downloaded", "ok")}  # fmt: skip
    assert results["model.safetensors"].path == tmp_path / "w" / "test-hub" / "model.safetensors"
    statuses = models.check_weights(tmp_path / "w", ["test-hub"])
    assert all(s.status == "present" and "sha256 ok" in s.detail for s in statuses), statuses
    from raypdm.models import verify

    monkeypatch.setattr(verify, "sha256_file", lambda path: pytest.fail(f"re-hashed {path} after fetch"))
    loaded = models.load("test-hub", tmp_path / "w")  # fetch recorded the verified digests
    assert torch.equal(loaded.weight, _linear().weight)
    assert not (tmp_path / "w" / "test-hub" / ".fetch").exists()  # staging removed once every file moved


def test_url_fetch_and_already_present_files_are_skipped(url_model, mirror, tmp_path):
    data = url_model[2]
    (first,) = fetch_models(tmp_path / "w", ["test-url"])
    assert (first.status, first.sha256, first.size) == ("downloaded", "ok", len(data))
    assert first.path.read_bytes() == data and not first.path.with_name("net.pth.part").exists()
    mirror.requests.clear()
    (again,) = fetch_models(tmp_path / "w", ["test-url"])
    assert (again.status, again.sha256) == ("already present", "ok")
    assert mirror.requests == []  # nothing asked of the server


def test_hub_files_already_present_are_not_downloaded_again(hub_model, mirror, tmp_path):
    fetch_models(tmp_path / "w", ["test-hub"])
    mirror.requests.clear()
    results = fetch_models(tmp_path / "w", ["test-hub"])
    assert {r.status for r in results} == {"already present"} and mirror.requests == []


def test_corrupt_download_is_an_error_and_not_kept(url_model, mirror, tmp_path):
    _, path, data = url_model
    mirror.files[path] = data[:-1] + b"\x00"  # same size, one byte off
    (res,) = fetch_models(tmp_path / "w", ["test-url"])
    assert res.failed and res.sha256 == "mismatch"
    assert "does not match its pin" in res.detail and "not kept" in res.detail
    assert not res.path.exists() and not res.path.with_name("net.pth.part").exists()
    result = CliRunner().invoke(models_cli, ["fetch", "-w", str(tmp_path / "w"), "-m", "test-url"])
    assert result.exit_code == 1 and "failed" in result.output and "mismatch" in result.output


def test_corrupt_hub_download_is_not_kept(hub_model, mirror, tmp_path):
    _, base, weights = hub_model
    mirror.files[f"{base}/model.safetensors"] = weights[:-4] + b"\x00\x00\x00\x00"
    results = _by_file(fetch_models(tmp_path / "w", ["test-hub"]))
    assert results["model.safetensors"].failed and results["config.json"].status == "downloaded"
    assert not (tmp_path / "w" / "test-hub" / "model.safetensors").exists()
    assert not list((tmp_path / "w").rglob("model.safetensors"))  # not under the staging folder either


def test_dropped_connection_resumes_with_range_and_verifies(url_model, mirror, tmp_path):
    _, path, data = url_model
    mirror.drop_after[path] = 600_000
    (res,) = fetch_models(tmp_path / "w", ["test-url"], backoff_s=0)
    assert (res.status, res.sha256) == ("resumed", "ok")
    assert res.path.read_bytes() == data
    first, second = mirror.gets(path)  # the retry asks only for what did not arrive (whole chunks are kept)
    assert first is None and 0 < int(re.fullmatch(r"bytes=(\d+)-", second).group(1)) <= 600_000


def test_part_file_from_an_earlier_run_is_continued(url_model, mirror, tmp_path):
    _, path, data = url_model
    part = tmp_path / "w" / "test-url" / "net.pth.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:7000])
    (res,) = fetch_models(tmp_path / "w", ["test-url"])
    assert (res.status, res.sha256) == ("resumed", "ok") and res.path.read_bytes() == data
    assert mirror.gets(path) == ["bytes=7000-"] and not part.exists()


def test_interrupted_hub_download_is_resumed_by_huggingface_hub(hub_model, mirror, tmp_path):
    _, base, weights = hub_model
    mirror.drop_after[f"{base}/model.safetensors"] = 100
    results = _by_file(fetch_models(tmp_path / "w", ["test-hub"]))
    assert (results["model.safetensors"].status, results["model.safetensors"].sha256) == ("downloaded", "ok")
    assert (tmp_path / "w" / "test-hub" / "model.safetensors").read_bytes() == weights
    # huggingface_hub retried within the call (it resumes from its last complete 10 MB chunk: here, 0).
    assert len(mirror.gets(f"{base}/model.safetensors")) == 2


def test_mismatching_existing_file_is_replaced_only_by_a_verified_one(url_model, mirror, tmp_path):
    _, path, data = url_model
    target = tmp_path / "w" / "test-url" / "net.pth"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"an older, different release")
    mirror.files[path] = b"also wrong"
    (res,) = fetch_models(tmp_path / "w", ["test-url"])
    assert res.failed and target.read_bytes() == b"an older, different release"  # kept: nothing better came
    mirror.files[path] = data
    (res,) = fetch_models(tmp_path / "w", ["test-url"])
    assert (res.status, res.sha256) == ("replaced", "ok") and target.read_bytes() == data


def test_bring_your_own_unpinned_and_cli_table(url_model, mirror, tmp_path):
    models.register(dataclasses.replace(models.get("antelopev2")))  # real spec: no public URL
    mirror.files["/releases/extra.bin"] = b"extra"
    _register("test-unpinned", (WeightFile("extra.bin", url=f"{mirror.url}/releases/extra.bin"),), hub=False)
    w = tmp_path / "w"
    result = CliRunner().invoke(models_cli, ["fetch", "-w", str(w), "-m", "test-url", "-m", "test-unpinned",
                                             "-m", "antelopev2"])  # fmt: skip
    assert result.exit_code == 0, result.output  # bring-your-own files are reported, not failures
    for text in ("downloaded", "unpinned", "bring your own", str(w / "antelopev2" / "glintr100.onnx")):
        assert text in result.output
    assert (w / "test-unpinned" / "extra.bin").read_bytes() == b"extra"


def test_offline_mode_and_unknown_models_are_clear_errors(hub_model, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    results = fetch_models(tmp_path / "w", ["test-hub"])
    assert all(r.failed and "HF_HUB_OFFLINE" in r.detail for r in results)
    bad = CliRunner().invoke(models_cli, ["fetch", "-w", str(tmp_path / "w"), "-m", "nope"])
    assert bad.exit_code == 2 and "sd21-base" in bad.output
    with pytest.raises(KeyError):
        fetch_models(tmp_path / "w", ["nope"])


def test_url_file_read_back_as_a_state_dict(mirror, tmp_path):
    """A pickle fetched from a release URL is what `read_state_dict` (weights_only=True) reads."""
    src = tmp_path / "src.pth"
    torch.save({"weight": torch.arange(6.0).reshape(2, 3)}, src)
    mirror.files["/releases/tensors.pth"] = src.read_bytes()
    _register("test-pickle", (WeightFile("tensors.pth", sha256=_sha(src.read_bytes()),
                                         url=f"{mirror.url}/releases/tensors.pth"),), hub=False)  # fmt: skip
    (res,) = fetch_models(tmp_path / "w", ["test-pickle"])
    assert res.status == "downloaded"
    assert torch.equal(read_state_dict(res.path)["weight"], torch.arange(6.0).reshape(2, 3))


def test_a_restricted_licence_is_accepted_once_before_anything_downloads(url_model, mirror, tmp_path):
    from raypdm.models.licences import LICENCE_FILE

    spec = models.register(dataclasses.replace(url_model[0], restricted=True, licence="NON-COMMERCIAL test terms"))
    w = tmp_path / "w"
    refused = CliRunner().invoke(models_cli, ["fetch", "-w", str(w), "-m", spec.name])
    assert refused.exit_code == 2, refused.output
    assert "NON-COMMERCIAL test terms" in refused.output and f"--accept-licence {spec.name}" in refused.output
    assert mirror.requests == [] and not (w / spec.name).exists()  # refused before any byte moved
    ok = CliRunner().invoke(models_cli, ["fetch", "-w", str(w), "-m", spec.name, "--accept-licence", spec.name])
    assert ok.exit_code == 0, ok.output
    assert (w / spec.name / "net.pth").read_bytes() == url_model[2]
    assert json.loads((w / LICENCE_FILE).read_text())[spec.name]["licence"] == "NON-COMMERCIAL test terms"
    again = CliRunner().invoke(models_cli, ["fetch", "-w", str(w), "-m", spec.name])  # accepted once is enough
    assert again.exit_code == 0 and "already present" in again.output, again.output
    models.register(dataclasses.replace(spec, licence="NON-COMMERCIAL test terms, version 2"))
    changed = CliRunner().invoke(models_cli, ["fetch", "-w", str(w), "-m", spec.name])
    assert changed.exit_code == 2 and "version 2" in changed.output  # new terms are asked for again
    typo = CliRunner().invoke(models_cli, ["fetch", "-w", str(w), "-m", spec.name, "--accept-licence", "codefromer"])
    assert typo.exit_code == 2 and "codefromer" in typo.output


def test_for_a_use_fetches_what_that_use_reads(url_model, hub_model, mirror, tmp_path, monkeypatch):
    monkeypatch.setitem(registry.USES, "scoring", ("test-url",))
    res = CliRunner().invoke(models_cli, ["fetch", "-w", str(tmp_path / "w"), "--for", "scoring"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "w").iterdir() if not p.name.startswith(".")) == ["test-url"]


def test_every_use_names_registered_models_and_restricted_ones_say_so():
    for use, names in registry.USES.items():
        for name in names:
            models.get(name)  # a typo in USES fails here
    assert registry.USES["paper"] and set(registry.USES["codesr"]) <= set(registry.USES["paper"])
    assert models.get("codeformer").restricted and not models.get("sd21-base").restricted


def test_check_for_a_use_lists_only_what_that_use_reads(tmp_path):
    res = CliRunner().invoke(models_cli, ["check", "-w", str(tmp_path / "w"), "--for", "codesr", "--no-hash"])
    assert res.exit_code == 1, res.output  # nothing there yet
    for name in registry.USES["codesr"]:
        assert name in res.output
    assert "sd21-base" not in res.output
