"""Pre-flight: one error for every missing file of a job, with the one fetch command; presence only."""

from __future__ import annotations

import shlex

import pytest
import torch

from raypdm import models
from raypdm.models import registry, verify
from raypdm.models.preflight import MissingJobWeightsError, check_models, missing_files
from raypdm.models.registry import ModelSpec, WeightFile

ALEX = "alexnet-owt-7be5be79.pth"


@pytest.fixture
def env(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    models.list_models()  # built-ins register lazily: into the real registry, before it is swapped for a copy
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    for name, files in (("test-a", ("a.pth", "sub/a.json")), ("test-b", ("b.safetensors",))):
        models.register(ModelSpec(
            name=name, description="test", licence="MIT", licence_note="", hub_repo=None, hub_revision=None,
            files=tuple(WeightFile(f, sha256="0" * 64, url=f"https://example.org/{f}") for f in files)
            + (WeightFile("optional.json", required=False),),
            builder=lambda preset, device, dtype: None, loader=lambda model_dir, device, dtype: None,
        ))  # fmt: skip
    return tmp_path


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def test_one_error_lists_every_missing_file_the_command_and_the_offline_flag(env):
    w = env / "w"
    _touch(w / "test-a" / "a.pth")
    with pytest.raises(MissingJobWeightsError) as err:
        check_models(["test-a", "test-b"], w, lpips=["alex"])
    e = err.value
    assert isinstance(e, models.MissingWeightsError) and isinstance(e, FileNotFoundError)
    assert e.missing == [w / "test-a" / "sub" / "a.json", w / "test-b" / "b.safetensors", w / "lpips-alex" / ALEX]
    msg = str(e)
    for path in e.missing:
        assert str(path) in msg
    assert "optional.json" not in msg and str(w / "test-a" / "a.pth") not in msg
    command = f"raypdm models fetch --weights-dir {w} --model test-a --model test-b --model lpips-alex"
    assert command in msg.splitlines()[msg.splitlines().index("Fetch them with:") + 1]
    assert shlex.split(command)[4] == str(w)
    assert "--lpips random" in msg and str(env / "torch-home" / "hub" / "checkpoints" / ALEX) in msg


def test_nothing_missing_is_silent_and_costs_no_hashing(env, monkeypatch):
    w = env / "w"
    for path in ("test-a/a.pth", "test-a/sub/a.json", "test-b/b.safetensors"):
        _touch(w / path)  # the pins ("0"*64) are wrong on purpose: presence is all pre-flight checks
    _touch(env / "torch-home" / "hub" / "checkpoints" / ALEX)  # torchvision's cache counts for LPIPS
    monkeypatch.setattr(verify, "sha256_file", lambda path: pytest.fail(f"pre-flight hashed {path}"))
    assert check_models(["test-a", "test-b"], w, lpips=["alex"]) is None
    assert check_models([], None) is None  # tiny presets: nothing to check, no weights dir needed
    assert missing_files(["test-b", "test-b"], w) == {}


def test_pickle_fallback_counts_as_present(env):
    w = env / "w"
    (w / "test-b").mkdir(parents=True)
    torch.save({}, w / "test-b" / "b.bin")  # what `models.load` accepts for a missing .safetensors
    assert "test-b" not in missing_files(["test-b"], w)


def test_without_a_weights_dir(env):
    with pytest.raises(MissingJobWeightsError) as err:
        check_models(["test-b"], None, lpips=["vgg"])
    msg = str(err.value)
    assert "No weights dir is set: pass --weights-dir W" in msg
    assert "raypdm models fetch --weights-dir W --model test-b --model lpips-vgg" in msg
    assert str(env / "torch-home" / "hub" / "checkpoints" / "vgg16-397923af.pth") in msg
    assert "options.impress.lpips_backbone=random" in msg


def test_bring_your_own_models_get_copy_instructions_not_a_fetch(env):
    with pytest.raises(MissingJobWeightsError) as err:
        check_models(["antelopev2", "test-b"], env / "w")
    msg = str(err.value)
    assert "--model antelopev2" not in msg and "--model test-b" in msg
    assert "antelopev2 has no public download: copy scrfd_10g_bnkps.onnx, glintr100.onnx" in msg
    with pytest.raises(KeyError, match="known models"):
        check_models(["nope"], env / "w")


def test_real_registry_models_are_checked_file_by_file(env):
    missing = missing_files(["codeformer", "sd-x4-upscaler"], env / "w", lpips=["alex", "vgg"])
    assert missing["codeformer"] == [env / "w" / "codeformer" / "codeformer.pth"]
    assert len(missing["sd-x4-upscaler"]) == sum(f.required for f in models.get("sd-x4-upscaler").files)
    assert set(missing) == {"codeformer", "sd-x4-upscaler", "lpips-alex", "lpips-vgg"}
