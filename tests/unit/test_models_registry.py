"""The registry itself: lookup, listing, fetch commands."""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
import sys

import pytest

from raypdm import models
from raypdm.models import registry
from raypdm.models.registry import ModelSpec, WeightFile


def _spec(**kw) -> ModelSpec:
    base = dict(
        name="dummy",
        description="test model",
        licence="MIT",
        licence_note="",
        hub_repo=None,
        hub_revision=None,
        files=(WeightFile("net.pth", url="https://example.org/net.pth"), WeightFile("extra/cfg.json", url=None)),
        builder=lambda preset, device, dtype: ("built", preset),
        loader=lambda model_dir, device, dtype: ("loaded", model_dir),
    )
    base.update(kw)
    return ModelSpec(**base)


def test_builtin_models_are_registered():
    names = models.list_models()
    assert {"sd21-base", "sd-x4-upscaler"} <= set(names)
    assert names == sorted(names)
    for name in ("sd21-base", "sd-x4-upscaler"):
        spec = models.get(name)
        assert spec.presets == ("tiny", "full")
        assert spec.hub_repo and spec.hub_revision and len(spec.hub_revision) == 40
        assert spec.licence and spec.layouts is not None
        assert any(f.layout == "unet" for f in spec.files)


def test_unknown_model_lists_known_names():
    with pytest.raises(KeyError) as err:
        models.get("sd15")
    assert "sd21-base" in str(err.value) and "sd-x4-upscaler" in str(err.value)
    with pytest.raises(KeyError):
        models.build("sd15")


def test_register_get_and_replace(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    spec = models.register(_spec())
    assert models.get("dummy") is spec and "dummy" in models.list_models()
    assert models.build("dummy", preset="full") == ("built", "full")
    replaced = models.register(_spec(description="v2"))
    assert models.get("dummy") is replaced
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "other"  # type: ignore[misc]


def test_fetch_command_is_raypdm_models_fetch_with_manual_equivalents(tmp_path):
    spec = models.get("sd21-base")
    first, *rest = spec.fetch_command(tmp_path / "w s").splitlines()
    assert shlex.split(first) == ["raypdm", "models", "fetch", "--weights-dir", str(tmp_path / "w s"),
                                  "--model", "sd21-base"]  # fmt: skip
    assert rest[0] == "# without raypdm:" and rest[1] == "# " + spec.manual_fetch_command(tmp_path / "w s")
    assert registry.fetch_command(["a", "b", "a"], "/w") == "raypdm models fetch --weights-dir /w --model a --model b"


def test_manual_fetch_command_for_hub_models(tmp_path):
    spec = models.get("sd21-base")
    cmd = spec.manual_fetch_command(tmp_path)
    assert cmd.startswith(
        f"hf download stabilityai/stable-diffusion-2-1-base --revision {spec.hub_revision} "
        f"--local-dir {tmp_path / 'sd21-base'}"
    )
    args = shlex.split(cmd)
    for f in spec.files:
        assert f.path in args  # only the files `load` reads, not the repo's multi-GB extras


def test_manual_fetch_command_for_direct_urls(tmp_path):
    cmd = _spec().manual_fetch_command(tmp_path / "w s")  # a space: the command must stay copy-pasteable
    lines = cmd.splitlines()
    dest = tmp_path / "w s" / "dummy" / "net.pth"
    assert shlex.split(lines[0]) == ["mkdir", "-p", str(dest.parent), "&&", "curl", "-L", "-o", str(dest),
                                     "https://example.org/net.pth"]
    assert "no public URL" in lines[1] and "extra/cfg.json" in lines[1]


def test_bring_your_own_models_keep_their_copy_instructions(tmp_path):
    spec = models.get("antelopev2")
    assert not spec.downloadable
    assert spec.fetch_command(tmp_path) == spec.manual_fetch_command(tmp_path)
    assert "raypdm models fetch" not in spec.fetch_command(tmp_path) and "no working public download" in spec.fetch_command(tmp_path)


def test_lpips_trunks_are_registered_with_torchvisions_files():
    from torchvision.models import AlexNet_Weights, VGG16_Weights

    for name, weights in (("lpips-alex", AlexNet_Weights.IMAGENET1K_V1), ("lpips-vgg", VGG16_Weights.IMAGENET1K_V1)):
        (wf,) = models.get(name).files
        assert wf.url == weights.url and wf.path == weights.url.rsplit("/", 1)[1]
        # torchvision names its files after the sha256's first 8 hex digits: the pin must agree.
        assert len(wf.sha256) == 64 and wf.path.removesuffix(".pth").endswith("-" + wf.sha256[:8])


def test_every_pin_is_a_sha256_hex_digest():
    for name in models.list_models():
        for f in models.get(name).files:
            assert f.sha256 is None or (len(f.sha256) == 64 and int(f.sha256, 16) >= 0), (name, f.path)


def test_cli_list_says_which_files_are_not_pinned():
    from click.testing import CliRunner

    from raypdm.models.cli import models_cli

    result = CliRunner().invoke(models_cli, ["list"])
    assert result.exit_code == 0 and "sha256 pinned" in result.output
    line = next(line for line in result.output.splitlines() if line.startswith("│ adm256-uncond"))
    assert "0/1" in line and "not known for" in line
    assert "lpips-alex" in result.output and "(bring your own)" in result.output


def test_listing_the_models_imports_no_model_library():
    """`raypdm models list` and every driver's preflight read the specs only: importing diffusers (~4 s, its
    quantizer hooks go through torch.compile) or transformers' CLIP (~2 s) there was most of a command's
    start-up. A fresh interpreter, since this test process may have imported them already."""
    code = (
        "import sys\n"
        "from raypdm.models.registry import get, list_models\n"
        "names = list_models()\n"
        "specs = [get(n) for n in names]\n"
        "import raypdm.metrics.quality, raypdm.pipelines.train, raypdm.pipelines.sample, raypdm.pipelines.redteam\n"
        "heavy = [m for m in ('diffusers', 'transformers.models.clip.modeling_clip', 'deepspeed') if m in sys.modules]\n"
        "print(len(names), heavy)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    count, heavy = res.stdout.strip().split(" ", 1)
    assert int(count) >= 10 and heavy == "[]", res.stdout
