"""The purifier interface, registry, spec parsing, chains and options validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from skimage import data

from raypdm.purify import (
    ChainPurifier,
    GaussianPurifier,
    JpegPurifier,
    Purifier,
    PurifierOptions,
    build_purifier,
    default_device,
    group_indices_by_size,
    list_aliases,
    list_purifiers,
    parse_spec,
    purifier_options_model,
    register_purifier,
)
from raypdm.purify import base


class _InvertOptions(PurifierOptions):
    pass


class _FakeGpuPurifier(Purifier):
    """Stands in for a model purifier: inverts the image, claims a GPU, records its build context."""

    uses_gpu = True

    def __init__(self, options, context):
        self.options, self.context = options, context

    def purify(self, images):
        return [255 - im for im in images]


@pytest.fixture
def fake_model_purifiers(monkeypatch):
    """Registers stand-ins for codeformer and sr (the real modules may not exist yet); restored after."""
    for name in ("codeformer", "sr"):
        cls = type(f"Fake_{name}", (_FakeGpuPurifier,), {"name": name})
        monkeypatch.setitem(base._REGISTRY, name, base._Entry(cls, _InvertOptions))


@pytest.fixture(scope="module")
def photo():
    return data.astronaut()[::4, ::4].copy()  # 128 x 128: the interface does not need big images


def test_classic_purifiers_are_registered():
    assert {"jpeg", "gaussian", "tvm"} <= set(list_purifiers())
    assert list_aliases()["codesr"] == "codeformer+sr"
    assert purifier_options_model("jpeg")().quality == 75


def test_default_device_matches_torch():
    assert default_device() == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize(
    ("spec", "names"),
    [("jpeg", ["jpeg"]), (" Gaussian +  jpeg ", ["gaussian", "jpeg"]), ("tvm+jpeg+tvm", ["tvm", "jpeg", "tvm"])],
)
def test_parse_spec_is_whitespace_and_case_tolerant(spec, names):
    assert parse_spec(spec) == names


def test_codesr_alias_expands_to_codeformer_then_sr(fake_model_purifiers, photo):
    assert parse_spec("codesr") == ["codeformer", "sr"]
    assert parse_spec("jpeg + codesr") == ["jpeg", "codeformer", "sr"]
    chain = build_purifier("codesr", device="cpu", preset="full", weights_dir="/w")
    explicit = build_purifier("codeformer+sr", device="cpu", preset="full", weights_dir="/w")
    assert isinstance(chain, ChainPurifier) and chain.name == "codeformer+sr"
    assert chain.config_dict() == explicit.config_dict()  # an alias never changes the stage hash
    assert chain.uses_gpu
    ctx = chain.parts[0].context
    assert (ctx.device, ctx.preset, ctx.weights_dir) == ("cpu", "full", "/w")
    np.testing.assert_array_equal(chain([photo])[0], photo)  # inverted twice


def test_chain_uses_gpu_if_any_part_does(fake_model_purifiers):
    assert not build_purifier("gaussian+jpeg").uses_gpu
    assert build_purifier("jpeg+sr", device="cpu").uses_gpu


def test_single_spec_returns_the_bare_purifier():
    assert isinstance(build_purifier("jpeg"), JpegPurifier)
    assert isinstance(build_purifier(" gaussian "), GaussianPurifier)


def test_chain_applies_parts_in_order(photo):
    opts = {"jpeg": {"quality": 20}, "gaussian": {"mode": "pil_radius", "radius": 2}}
    chain = build_purifier("gaussian+jpeg", options=opts)
    blur, jpeg = build_purifier("gaussian", options={"gaussian": opts["gaussian"]}), build_purifier(
        "jpeg", options={"jpeg": opts["jpeg"]}
    )
    np.testing.assert_array_equal(chain([photo])[0], jpeg(blur([photo]))[0])
    reversed_chain = build_purifier("jpeg+gaussian", options=opts)
    assert not np.array_equal(reversed_chain([photo])[0], chain([photo])[0])
    assert [p["name"] for p in chain.config_dict()["parts"]] == ["gaussian", "jpeg"]
    assert chain.config_dict()["parts"][1]["quality"] == 20


def test_config_dict_is_json_and_tracks_options():
    a = build_purifier("jpeg", options={"jpeg": {"quality": 50}}).config_dict()
    b = build_purifier("jpeg", options={"jpeg": {"quality": 50}}).config_dict()
    c = build_purifier("jpeg", options={"jpeg": {"quality": 51}}).config_dict()
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True) != json.dumps(c, sort_keys=True)
    json.dumps(build_purifier("tvm+gaussian+jpeg").config_dict())


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match="unknown purifier 'jpg'") as err:
        build_purifier("gaussian+jpg")
    assert "jpeg" in str(err.value) and "tvm" in str(err.value) and "codesr" in str(err.value)
    with pytest.raises(ValueError, match="empty purifier name"):
        parse_spec("jpeg++tvm")


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"jpeg": {"qualty": 50}}, "qualty"),
        ({"jpeg": {"quality": 0}}, "quality"),
        ({"jpeg": {"subsampling": "4:1:1"}}, "subsampling"),
        ({"gaussian": {"kernel_size": 4}}, "kernel_size"),
        ({"gaussian": {"mode": "box"}}, "mode"),
        ({"tvm": {"drop": 1.5}}, "drop"),
    ],
)
def test_bad_options_name_the_field(options, field):
    with pytest.raises(ValueError, match=field) as err:
        build_purifier("gaussian+jpeg+tvm", options=options)
    assert next(iter(options)) in str(err.value)  # and the purifier


def test_options_for_a_purifier_outside_the_chain_are_an_error():
    with pytest.raises(ValueError, match="tvm"):
        build_purifier("jpeg", options={"tvm": {"weight": 0.1}})


def test_call_checks_inputs(photo):
    jpeg = build_purifier("jpeg")
    assert jpeg([]) == []
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        jpeg([photo.astype(np.float32)])
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        jpeg([photo[..., 0]])
    with pytest.raises(TypeError, match="numpy"):
        jpeg([photo.tolist()])


def test_call_checks_outputs(photo):
    class Broken(Purifier):
        name = "broken"

        def purify(self, images):
            return images[:-1]

    with pytest.raises(RuntimeError, match="returned 1 images for 2"):
        Broken()([photo, photo])


def test_batches_may_mix_sizes_and_keep_order(photo):
    small = photo[:64, :80].copy()
    out = build_purifier("jpeg")([photo, small, photo])
    assert [o.shape for o in out] == [photo.shape, small.shape, photo.shape]
    assert group_indices_by_size([photo, small, photo]) == {(128, 128): [0, 2], (64, 80): [1]}


def test_register_rejects_a_clashing_name():
    with pytest.raises(ValueError, match="already registered"):

        @register_purifier("jpeg", _InvertOptions)
        class OtherJpeg(_FakeGpuPurifier):
            pass

    with pytest.raises(ValueError, match="must match"):
        register_purifier("a+b", _InvertOptions)
