"""The SD x4 super-resolution purifier ("sr") and the CodeSR chain, on tiny random-weight models (CPU).

Every real run uses 2 steps and a 32 px bottleneck (128 px out of the upscaler): each call is ~0.1 s.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from raypdm.purify import ChainPurifier, build_purifier
from raypdm.purify.sr import SROptions, SRPurifier

FAST = {"steps": 2, "low_res": 32}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _resized(image: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.array(Image.fromarray(image).resize((width, height), Image.BICUBIC))  # writable


@pytest.fixture(scope="module")
def astro() -> np.ndarray:
    return _resized(data.astronaut(), 64, 64)


@pytest.fixture(scope="module")
def cat() -> np.ndarray:
    return _resized(data.chelsea(), 72, 48)  # not square, not a multiple of the bottleneck


@pytest.fixture(scope="module")
def sr() -> SRPurifier:
    return build_purifier("sr", device="cpu", preset="tiny", options={"sr": FAST})


def _sr(**options) -> SRPurifier:
    return build_purifier("sr", device="cpu", preset="tiny", options={"sr": {**FAST, **options}})


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


# ------------------------------------------------------------------------------------------- outputs


def test_output_keeps_shape_dtype_and_is_a_real_image(sr, astro, cat):
    out = sr([astro, cat])
    assert len(out) == 2
    for o, x in zip(out, [astro, cat]):
        assert o.shape == x.shape and o.dtype == np.uint8
        assert 5 < o.mean() < 250 and o.std() > 1, "black, white or flat output"
        assert _max_diff(o, x) > 0, "the purifier returned its input"
    # Inputs are never modified in place.
    assert np.array_equal(astro, _resized(data.astronaut(), 64, 64))


def test_keep_input_size_false_returns_four_times_low_res(astro, cat):
    assert 4 * SROptions().low_res == 512  # the paper's 128 -> 512
    p = _sr(keep_input_size=False)
    out = p([astro, cat])
    assert [o.shape for o in out] == [(128, 128, 3), (128, 128, 3)]
    assert all(o.dtype == np.uint8 for o in out)
    # The 128 px output resized back is what keep_input_size=True returns (same noise, same upscale).
    kept = _sr()([astro])[0]
    back = torch.nn.functional.interpolate(
        torch.from_numpy(out[0]).permute(2, 0, 1)[None].float(), size=(64, 64), mode="bicubic",
        align_corners=False, antialias=True,
    )
    # Not bit-exact: the kept image is resized before clamping to [0, 1], this one after (saturated pixels).
    diff = np.abs(back[0].permute(1, 2, 0).numpy() - kept.astype(np.float32))
    assert diff.mean() < 0.5 and np.percentile(diff, 99) < 1.5, (diff.mean(), np.percentile(diff, 99))


def test_mixed_size_batch_keeps_each_size_and_order(sr, astro, cat):
    small = _resized(data.astronaut(), 20, 24)  # below the 32 px bottleneck: upsampled, then back
    flipped = astro[:, ::-1].copy()
    square_cat = _resized(data.chelsea(), 64, 64)
    batch = [cat, astro, small, flipped, astro, square_cat]  # sizes: A, B, C, B, B, B
    out = sr(batch)
    assert [o.shape for o in out] == [x.shape for x in batch]
    # Order: every output is the one its input gets alone (up to batched float rounding, 1 level).
    for o, x in zip(out, batch):
        alone = sr([x])[0]
        assert _max_diff(o, alone) <= 1
        assert np.mean(o != alone) < 0.01
    # Two copies of one image in a batch get the same (content-seeded) noise: identical pixels.
    assert np.array_equal(out[1], out[4])
    assert _max_diff(out[1], out[3]) > 10  # the mirror image is a different image


def test_deterministic_for_the_same_input(sr, astro, cat):
    first = sr([astro, cat])
    again = sr([astro, cat])
    rebuilt = _sr()([astro, cat])  # a fresh purifier (another actor) has the same tiny weights
    for a, b, c in zip(first, again, rebuilt):
        assert np.array_equal(a, b) and np.array_equal(a, c)
    other_seed = _sr(seed=1)([astro])[0]
    assert _max_diff(first[0], other_seed) > 10
    # Every image gets its own generator seeded with the options' seed: its noise does not depend on
    # what else is in the batch.
    alone = sr([cat])[0]
    assert _max_diff(alone, first[1]) <= 1


# -------------------------------------------------------------------------------------------- prompt


def test_prompt_uses_the_class_noun():
    assert SROptions().prompt() == "a photo of a person"
    assert SROptions(class_noun="cat").prompt() == "a photo of a cat"
    assert SROptions(class_noun="dog", prompt_template="a {class_noun}, high quality").prompt() == "a dog, high quality"


def test_the_class_noun_reaches_the_pipeline(astro, monkeypatch):
    p = _sr(class_noun="cat", negative_prompt="blurry")
    seen = []
    pipe = p.pipe

    class Spy:
        def __getattr__(self, name):
            return getattr(pipe, name)

        def __call__(self, **kwargs):
            seen.append(kwargs)
            return pipe(**kwargs)

    monkeypatch.setattr(p, "pipe", Spy())
    cat_out = p([astro, astro[::-1].copy()])
    assert len(seen) == 1, "one upscaler call per batch"
    kw = seen[0]
    assert kw["prompt"] == ["a photo of a cat"] * 2
    assert kw["negative_prompt"] == ["blurry"] * 2
    assert (kw["num_inference_steps"], kw["noise_level"], kw["guidance_scale"]) == (2, 20, 9.0)
    # The noun changes the conditioning, hence the pixels.
    person_out = _sr(negative_prompt="blurry")([astro])[0]
    assert _max_diff(cat_out[0], person_out) > 0


@pytest.mark.parametrize("template", ["a photo", "a photo of a {{class_noun}}", "a {x} of a {class_noun}", "{class_noun"])
def test_a_template_without_class_noun_is_rejected_at_build_time(template):
    with pytest.raises(ValueError, match="prompt_template") as err:
        build_purifier("sr", device="cpu", preset="tiny", options={"sr": {"prompt_template": template}})
    assert "class_noun" in str(err.value) or "not a valid template" in str(err.value)
    with pytest.raises(ValueError, match=r"\{class_noun\}|not a valid template"):
        SROptions(prompt_template=template)


# ------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "options, field",
    [
        ({"noise_level": 351}, "noise_level"),
        ({"noise_level": -1}, "noise_level"),
        ({"steps": 0}, "steps"),
        ({"low_res": 4}, "low_res"),
        ({"dtype": "float64"}, "dtype"),
        ({"class_noun": ""}, "class_noun"),
        ({"nosie_level": 20}, "nosie_level"),  # a typo is an error, never silently the default
    ],
)
def test_bad_options_are_rejected_naming_the_field(options, field):
    with pytest.raises(ValueError, match=field) as err:
        build_purifier("sr", device="cpu", preset="tiny", options={"sr": options})
    assert "'sr'" in str(err.value)


def test_noise_level_limit_is_350():
    assert SROptions(noise_level=350).noise_level == 350
    with pytest.raises(ValueError, match="350"):
        SROptions(noise_level=351)


def test_config_dict_has_options_and_preset_but_not_the_device(sr):
    cfg = sr.config_dict()
    assert cfg["name"] == "sr"
    assert cfg["preset"] == "tiny"
    assert cfg["weights"] == "random"
    for key, value in SROptions(**FAST).model_dump(mode="json").items():
        assert cfg[key] == value, key
    assert cfg["steps"] == 2 and cfg["low_res"] == 32 and cfg["class_noun"] == "person"
    assert "device" not in cfg
    assert "cpu" not in json.dumps(cfg)
    # Every option that changes pixels changes the config.
    assert _sr(class_noun="cat").config_dict() != cfg
    assert _sr(seed=3).config_dict() != cfg
    json.dumps(cfg)  # hashable into a stage key


# ---------------------------------------------------------------------------------------- NaN guard


@pytest.mark.parametrize("failure", ["nan", "black"])
def test_half_precision_nan_or_black_images_are_rerun_in_float32(astro, cat, monkeypatch, caplog, failure):
    p = _sr()
    reference = p([astro, cat])  # float32
    reference_cat = p([cat])[0]  # float32, alone, as the re-run runs it
    p.dtype = torch.bfloat16  # as on a GPU with dtype="bfloat16"; bf16 runs (slowly) on the CPU too
    real_run = p._run
    calls = []

    def run(low, seeds, dtype):
        out = real_run(low, seeds, dtype)
        calls.append((dtype, list(seeds), p.pipe.unet.dtype))
        if dtype != torch.float32:
            out[1] = float("nan") if failure == "nan" else 0.0  # the cat overflows in half precision
        return out

    monkeypatch.setattr(p, "_run", run)
    with caplog.at_level("WARNING", logger="raypdm.purify.sr"):
        out = p([astro, cat])

    seeds = [0, 0]
    assert [(c[0], c[1]) for c in calls] == [(torch.bfloat16, seeds), (torch.float32, [seeds[1]])]
    assert calls[1][2] == torch.float32, "the re-run must really run the pipeline in float32"
    assert p.pipe.unet.dtype == torch.bfloat16, "the pipeline goes back to its half precision afterwards"
    assert "re-running in float32" in caplog.text
    assert out[1].shape == cat.shape
    # The re-run image is a float32 result, not NaN/black garbage: exactly what float32 gives alone with
    # these (half-rounded) weights, and within rounding of the never-halved model's.
    monkeypatch.setattr(p, "_run", real_run)
    p.dtype = torch.float32
    assert np.array_equal(out[1], p([cat])[0])
    assert _max_diff(out[1], reference_cat) <= 3 and np.abs(out[1].astype(np.float32) - reference_cat).mean() < 0.5
    assert out[1].std() > 1
    # The healthy image keeps its bf16 result (not re-run): close to, but not exactly, float32's.
    assert out[0].shape == astro.shape and out[0].std() > 1
    diff = np.abs(out[0].astype(np.float32) - reference[0])
    assert 0 < diff.max() and diff.mean() < 8, diff.mean()


def test_guard_never_writes_nan(astro, cat, monkeypatch):
    p = _sr()
    p.dtype = torch.bfloat16

    def run(low, seeds, dtype):  # NaN whatever the precision
        return torch.full((low.shape[0], 3, 128, 128), float("nan"))

    monkeypatch.setattr(p, "_run", run)
    with pytest.raises(RuntimeError, match="NaN"):
        p([astro, cat])
    p.dtype = torch.float32  # the CPU path has no re-run, but must not write NaN either
    with pytest.raises(RuntimeError, match="NaN"):
        p([astro])


# -------------------------------------------------------------------------------------------- codesr


def test_codesr_equals_codeformer_then_sr(astro):
    chain = build_purifier("codesr", device="cpu", preset="tiny", options={"sr": FAST})
    assert isinstance(chain, ChainPurifier)
    assert [p.name for p in chain.parts] == ["codeformer", "sr"]
    assert chain.uses_gpu
    out = chain([astro])
    assert out[0].shape == astro.shape and out[0].dtype == np.uint8

    codeformer = build_purifier("codeformer", device="cpu", preset="tiny")
    sr = build_purifier("sr", device="cpu", preset="tiny", options={"sr": FAST})
    by_hand = sr(codeformer([astro]))
    assert np.array_equal(out[0], by_hand[0])
    cfg = chain.config_dict()
    assert cfg["parts"] == [codeformer.config_dict(), sr.config_dict()]
    assert "cpu" not in json.dumps(cfg)
