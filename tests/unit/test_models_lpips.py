"""LPIPS trunks: found under <weights_dir>/lpips-<net>/ or torchvision's cache, sha256-checked, never downloaded."""

from __future__ import annotations

import dataclasses
import socket

import pytest
import torch
from click.testing import CliRunner

from raypdm import models
from raypdm.metrics.faithfulness import alexnet_weights_path, load_lpips
from raypdm.models import registry
from raypdm.models.cli import models_cli
from raypdm.models.weights import CorruptWeightsError, MissingWeightsError, sha256_file
from raypdm.purify.impress import load_lpips_vgg, vgg16_weights_path

ALEX = "alexnet-owt-7be5be79.pth"
VGG = "vgg16-397923af.pth"


@pytest.fixture
def env(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("RAYPDM_CACHE_DIR", str(tmp_path / "raypdm-cache"))
    models.list_models()  # built-ins register lazily: into the real registry, before it is swapped for a copy
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    def refuse(*args, **kwargs):
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return tmp_path


def _torchvision_file(path, arch: str, seed: int):
    """A random trunk in torchvision's format (`features.<i>.weight`...); the classifier is left out to keep
    the file small, as LPIPS never reads it."""
    import torchvision

    torch.manual_seed(seed)
    net = torchvision.models.alexnet() if arch == "alex" else torchvision.models.vgg16()
    state = {k: v for k, v in net.state_dict().items() if k.startswith("features.")}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def _pin(name: str, path) -> None:
    spec = models.get(name)
    (wf,) = spec.files
    models.register(dataclasses.replace(spec, files=(dataclasses.replace(wf, sha256=sha256_file(path)),)))


def _trunk_equals(model, state) -> bool:
    got = {f"features.{k.split('.', 1)[1]}": v for k, v in model.net.state_dict().items()}
    return got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)


def test_alexnet_trunk_is_read_from_the_weights_dir(env):
    path = env / "w" / "lpips-alex" / ALEX
    state = _torchvision_file(path, "alex", seed=1)
    _pin("lpips-alex", path)
    model = load_lpips(pretrained_backbone=True, weights_dir=env / "w")
    assert _trunk_equals(model, state) and not model.training
    assert alexnet_weights_path(env / "w") == str(path)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    assert model(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert models.check_weights(env / "w", ["lpips-alex"])[0].status == "present"


def test_torchvision_cache_still_works_and_the_weights_dir_wins(env):
    cache = env / "torch-home" / "hub" / "checkpoints" / ALEX
    cached = _torchvision_file(cache, "alex", seed=2)
    _pin("lpips-alex", cache)
    assert _trunk_equals(load_lpips(pretrained_backbone=True), cached)  # no weights dir at all
    assert _trunk_equals(load_lpips(pretrained_backbone=True, weights_dir=env / "empty"), cached)
    own = _torchvision_file(env / "w" / "lpips-alex" / ALEX, "alex", seed=3)
    _pin("lpips-alex", env / "w" / "lpips-alex" / ALEX)
    assert _trunk_equals(load_lpips(pretrained_backbone=True, weights_dir=env / "w"), own)


def test_missing_trunk_names_both_places_the_fetch_command_and_the_offline_flag(env):
    with pytest.raises(MissingWeightsError) as err:
        load_lpips(pretrained_backbone=True, weights_dir=env / "w")
    msg = str(err.value)
    assert str(env / "w" / "lpips-alex" / ALEX) in msg and str(env / "torch-home" / "hub" / "checkpoints" / ALEX) in msg
    assert f"raypdm models fetch --weights-dir {env / 'w'} --model lpips-alex" in msg and "--lpips random" in msg
    assert isinstance(err.value, FileNotFoundError)
    with pytest.raises(MissingWeightsError, match="lpips_backbone=random"):
        load_lpips_vgg(pretrained_backbone=True)


def test_a_file_that_is_not_the_pinned_trunk_is_refused(env):
    path = env / "w" / "lpips-alex" / ALEX
    _torchvision_file(path, "alex", seed=4)  # the real pin (torchvision's file) cannot match a random trunk
    with pytest.raises(CorruptWeightsError) as err:
        load_lpips(pretrained_backbone=True, weights_dir=env / "w")
    msg = str(err.value)
    assert str(path) in msg and "7be5be791159472b" in msg and sha256_file(path) in msg
    cache = env / "torch-home" / "hub" / "checkpoints" / ALEX
    _torchvision_file(cache, "alex", seed=4)
    with pytest.raises(CorruptWeightsError, match="expected 7be5be79"):
        load_lpips(pretrained_backbone=True)


def test_a_file_of_another_architecture_is_a_clear_error(env):
    path = env / "w" / "lpips-alex" / ALEX
    path.parent.mkdir(parents=True)
    torch.save({"conv.weight": torch.zeros(1)}, path)
    _pin("lpips-alex", path)
    with pytest.raises(ValueError, match="not a torchvision AlexNet state dict"):
        load_lpips(pretrained_backbone=True, weights_dir=env / "w")


def test_vgg_trunk_for_impress(env):
    path = env / "w" / "lpips-vgg" / VGG
    state = _torchvision_file(path, "vgg", seed=5)
    _pin("lpips-vgg", path)
    assert vgg16_weights_path(str(env / "w")) == str(path)
    assert _trunk_equals(load_lpips_vgg(pretrained_backbone=True, weights_dir=str(env / "w")), state)


def test_random_trunk_is_seeded_and_leaves_the_callers_rng_alone(env):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, b = load_lpips(), load_lpips()
    assert torch.equal(torch.rand(3), expected_next)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_models_check_lists_the_lpips_trunks(env):
    result = CliRunner().invoke(models_cli, ["check", "-w", str(env / "w"), "-m", "lpips-alex", "-m", "lpips-vgg"])
    assert result.exit_code == 1
    assert ALEX in result.output and VGG in result.output
    assert "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth" in result.output  # curl equivalent
