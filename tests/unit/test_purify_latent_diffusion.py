"""Latent DiffPure ("latent_diffpure", "latent_diffpure_null"): SDEdit through diffusers' img2img on the
tiny random-weight SD 2.1-base, on the CPU.

Every run uses steps=10 at strength 0.3, i.e. 3 denoising steps on 64 px images: ~0.1 s a call.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from raypdm.purify import build_purifier, parse_spec
from raypdm.purify.latent_diffpure import (
    LatentDiffPureNullOptions,
    LatentDiffPureNullPurifier,
    LatentDiffPureOptions,
    LatentDiffPurePurifier,
    pad_to_multiple,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = {"steps": 10}  # int(10 * 0.3) = 3 DDPM steps


def _resized(image: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.array(Image.fromarray(image).resize((width, height), Image.BICUBIC))


@pytest.fixture(scope="module")
def astro() -> np.ndarray:
    return _resized(data.astronaut(), 64, 64)


@pytest.fixture(scope="module")
def cat() -> np.ndarray:
    return _resized(data.chelsea(), 60, 44)  # sides not multiples of 8: padded and cropped back


def _build(name: str, **options):
    return build_purifier(name, device="cpu", preset="tiny", options={name: {**FAST, **options}})


@pytest.fixture(scope="module")
def ldp() -> LatentDiffPurePurifier:
    return _build("latent_diffpure")


@pytest.fixture(scope="module")
def null() -> LatentDiffPureNullPurifier:
    return _build("latent_diffpure_null")


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


class _Spy:
    """Stands in for the pipeline: records every call's keyword arguments and forwards it."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return self.pipe(**kwargs)


# ------------------------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("name", ["latent_diffpure", "latent_diffpure_null"])
def test_output_keeps_shape_and_dtype_and_changes_the_image(name, ldp, null, astro, cat):
    p = ldp if name == "latent_diffpure" else null
    assert p.uses_gpu
    out = p([astro, cat])
    assert [o.shape for o in out] == [astro.shape, cat.shape]
    for o, x in zip(out, [astro, cat]):
        assert o.dtype == np.uint8
        assert o.std() > 1, "flat output"
        assert _max_diff(o, x) > 0, "the purifier returned its input"
    assert np.array_equal(astro, _resized(data.astronaut(), 64, 64)), "input modified in place"


def test_the_registry_knows_both_names_and_the_hyphenated_spelling():
    assert parse_spec("latent-diffpure") == ["latent_diffpure"]
    assert parse_spec("latent-diffpure-null") == ["latent_diffpure_null"]
    assert isinstance(build_purifier("latent-diffpure", device="cpu", options={"latent-diffpure": FAST}),
                      LatentDiffPurePurifier)


def test_padding_to_the_vae_factor_is_cropped_back_exactly():
    x = torch.rand(2, 3, 44, 60)
    padded, size = pad_to_multiple(x)
    assert padded.shape[-2:] == (48, 64) and size == (44, 60)
    assert torch.equal(padded[..., :44, :60], x)
    assert torch.equal(padded[..., 47, :60], x[..., 43, :])  # edge replication, no resampling
    same, _ = pad_to_multiple(torch.rand(1, 3, 64, 64))
    assert same.shape[-2:] == (64, 64)


# ------------------------------------------------------------------------------------ determinism


@pytest.mark.parametrize("name", ["latent_diffpure", "latent_diffpure_null"])
def test_each_image_gets_the_same_result_whatever_the_batch(name, ldp, null, astro, cat):
    p = ldp if name == "latent_diffpure" else null
    flipped = astro[:, ::-1].copy()
    batch = [cat, astro, flipped, astro]
    out = p(batch)
    for o, x in zip(out, batch):
        alone = p([x])[0]
        # Own generator per image: the same noise alone or in a batch; batched kernels may round apart.
        assert _max_diff(o, alone) <= 1
        assert np.mean(o != alone) < 0.01
    assert np.array_equal(out[1], out[3]), "two copies of one image in a batch must match"
    assert _max_diff(out[1], out[2]) > 10, "the mirror image is another image"
    # batch_size splits the work on the device without changing any image.
    small = _build(name, batch_size=1)(batch)
    for a, b in zip(out, small):
        assert _max_diff(a, b) <= 1


def test_deterministic_across_rebuilds_and_seed_dependent(ldp, astro):
    first = ldp([astro])[0]
    assert np.array_equal(first, ldp([astro])[0])
    assert np.array_equal(first, _build("latent_diffpure")([astro])[0]), "another actor, same tiny weights"
    assert _max_diff(first, _build("latent_diffpure", seed=1)([astro])[0]) > 10


# ----------------------------------------------------------------------------------------- prompts


def test_default_options_are_the_papers_baseline():
    o = LatentDiffPureOptions()
    assert (o.strength, o.steps, o.guidance_scale, o.seed) == (0.3, 1000, 7.5, 0)
    assert o.prompt() == "a photo of person, high quality, highres"
    assert LatentDiffPureOptions(class_noun="dog").prompt() == "a photo of dog, high quality, highres"
    n = LatentDiffPureNullOptions()
    assert (n.strength, n.steps) == (0.3, 1000)
    assert not {"class_noun", "prompt_template", "guidance_scale"} & set(LatentDiffPureNullOptions.model_fields)


def test_the_specified_prompt_strength_and_guidance_reach_the_pipeline(astro, monkeypatch):
    p = _build("latent_diffpure", class_noun="cat")
    spy = _Spy(p.pipe)
    monkeypatch.setattr(p, "pipe", spy)
    p([astro, astro[::-1].copy()])
    assert len(spy.calls) == 1, "one pipeline call per batch"
    kw = spy.calls[0]
    assert kw["prompt"] == ["a photo of cat, high quality, highres"] * 2
    assert (kw["strength"], kw["num_inference_steps"], kw["guidance_scale"]) == (0.3, 10, 7.5)
    assert len(kw["generator"]) == 2


def test_the_null_variant_prompts_nothing_and_skips_guidance(astro, monkeypatch):
    p = _build("latent_diffpure_null")
    spy = _Spy(p.pipe)
    monkeypatch.setattr(p, "pipe", spy)
    p([astro, astro[::-1].copy()])
    kw = spy.calls[0]
    assert kw["prompt"] == ["", ""]
    assert kw["guidance_scale"] <= 1.0  # diffusers runs no CFG


def test_denoising_steps_and_cfg_batches_follow_strength_and_variant(ldp, null, astro):
    seen: list[tuple[int, int]] = []

    def count(p, images):
        seen.clear()
        hook = p.pipe.unet.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
        try:
            p(images)
        finally:
            hook.remove()
        return list(seen)

    # int(10 * 0.3) = 3 UNet calls; classifier-free guidance doubles the batch, the null variant does not.
    assert count(ldp, [astro, astro]) == [4, 4, 4]
    assert count(null, [astro, astro]) == [2, 2, 2]
    assert count(_build("latent_diffpure", strength=0.5), [astro]) == [2] * 5


def test_null_variant_equals_guidance_with_the_empty_prompt_in_both_slots(null, astro, cat, monkeypatch):
    out = null([astro, cat])
    monkeypatch.setattr(null, "guidance_scale", lambda: 7.5)  # the public code's CFG with "" twice
    with_cfg = null([astro, cat])
    for a, b in zip(out, with_cfg):
        assert _max_diff(a, b) <= 1


def test_the_prompt_changes_the_pixels(ldp, astro):
    assert _max_diff(ldp([astro])[0], _build("latent_diffpure", class_noun="cat")([astro])[0]) > 0


# ----------------------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "name, options, field",
    [
        ("latent_diffpure", {"strength": 0.0}, "strength"),
        ("latent_diffpure", {"strength": 1.0}, "strength"),
        ("latent_diffpure", {"strength": 1.5}, "strength"),
        ("latent_diffpure_null", {"strength": -0.1}, "strength"),
        ("latent_diffpure", {"strength": 0.05, "steps": 10}, "strength"),  # int(0.5) = 0 steps
        ("latent_diffpure_null", {"steps": 0}, "steps"),
        ("latent_diffpure", {"steps": 1001}, "steps"),
        ("latent_diffpure", {"guidance_scale": -1}, "guidance_scale"),
        ("latent_diffpure", {"dtype": "float64"}, "dtype"),
        ("latent_diffpure", {"batch_size": 0}, "batch_size"),
        ("latent_diffpure", {"class_noun": ""}, "class_noun"),
        ("latent_diffpure_null", {"guidance_scale": 7.5}, "guidance_scale"),  # no such option: not silently ignored
        ("latent_diffpure_null", {"class_noun": "cat"}, "class_noun"),
        ("latent_diffpure", {"strenght": 0.3}, "strenght"),
    ],
)
def test_bad_options_are_rejected_naming_the_field(name, options, field):
    with pytest.raises(ValueError, match=field) as err:
        build_purifier(name, device="cpu", preset="tiny", options={name: options})
    assert repr(name) in str(err.value)


@pytest.mark.parametrize("template", ["a photo", "a photo of {{class_noun}}", "a {x} of {class_noun}", "{class_noun"])
def test_a_bad_prompt_template_is_rejected_when_parsed(template):
    with pytest.raises(ValueError, match="prompt_template"):
        LatentDiffPureOptions(prompt_template=template)


def test_config_dict_lists_what_changes_pixels_but_not_the_device(ldp, null):
    cfg = ldp.config_dict()
    assert cfg["name"] == "latent_diffpure" and cfg["preset"] == "tiny" and cfg["weights"] == "random"
    assert cfg["strength"] == 0.3 and cfg["steps"] == 10 and cfg["class_noun"] == "person"
    assert "cpu" not in json.dumps(cfg)
    assert null.config_dict()["name"] == "latent_diffpure_null"
    assert _build("latent_diffpure", strength=0.4).config_dict() != cfg


# -------------------------------------------------------------------------------------- NaN guard


def test_half_precision_nan_images_are_rerun_in_float32(astro, cat, monkeypatch, caplog):
    p = _build("latent_diffpure")
    p.dtype = torch.bfloat16  # as on a GPU; bf16 runs on the CPU too
    real_run = p._run
    calls = []

    def run(x, seeds, dtype):
        out = real_run(x, seeds, dtype)
        calls.append((dtype, len(seeds), p.pipe.unet.dtype))
        if dtype != torch.float32:
            out[1] = float("nan")
        return out

    monkeypatch.setattr(p, "_run", run)
    with caplog.at_level("WARNING", logger="raypdm.purify.latent_diffpure"):
        out = p([astro, astro.copy()])
    assert [(c[0], c[1]) for c in calls] == [(torch.bfloat16, 2), (torch.float32, 1)]
    assert calls[1][2] == torch.float32 and p.pipe.unet.dtype == torch.bfloat16
    assert "re-running in float32" in caplog.text
    assert out[1].std() > 1
    monkeypatch.setattr(p, "_run", lambda x, seeds, dtype: torch.full_like(x, float("nan")))
    with pytest.raises(RuntimeError, match="NaN"):
        p([cat])
