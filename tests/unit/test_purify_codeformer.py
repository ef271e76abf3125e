"""CodeFormer purifier on the tiny preset: interface, batching, determinism, modes, weights handling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data

from raypdm.models.codeformer import CODEFORMER_URL, build_codeformer
from raypdm.models.weights import MissingWeightsError
from raypdm.purify import BuildContext, build_purifier, list_purifiers, purifier_options_model
from raypdm.purify.codeformer import CodeFormerOptions, CodeFormerPurifier


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return data.astronaut()  # 512 x 512 x 3 uint8


@pytest.fixture(scope="module")
def purifier() -> CodeFormerPurifier:
    return build_purifier("codeformer", device="cpu", preset="tiny")


@pytest.fixture(scope="module")
def restored(purifier, astronaut) -> np.ndarray:
    return purifier([astronaut])[0]


def test_registered_with_the_paper_defaults():
    assert "codeformer" in list_purifiers()
    opts = purifier_options_model("codeformer")()
    assert opts.fidelity_weight == 0.5 and opts.mode == "whole" and opts.adain
    with pytest.raises(ValueError):
        CodeFormerOptions(fidelity_weight=1.5)
    with pytest.raises(ValueError):
        CodeFormerOptions(mode="detect")


def test_shape_dtype_and_range_are_preserved(astronaut, restored):
    assert restored.shape == astronaut.shape and restored.dtype == np.uint8
    assert 0 <= restored.min() and restored.max() <= 255
    assert not np.array_equal(restored, astronaut)  # it did something (random tiny weights)


def test_deterministic_across_calls_and_fresh_instances(purifier, astronaut, restored):
    np.testing.assert_array_equal(purifier([astronaut])[0], restored)
    again = CodeFormerPurifier(CodeFormerOptions(), BuildContext(device="cpu", preset="tiny"))
    np.testing.assert_array_equal(again([astronaut])[0], restored)


def test_batch_of_different_sizes(purifier, astronaut, restored):
    images = [
        astronaut,
        np.ascontiguousarray(astronaut[:300, 100:300]),  # portrait, smaller than 512
        np.ascontiguousarray(astronaut[::2, ::2]),  # 256 x 256
        np.ascontiguousarray(np.tile(astronaut, (2, 1, 1))[:700]),  # larger than 512
    ]
    out = purifier(images)
    assert [o.shape for o in out] == [im.shape for im in images]
    assert all(o.dtype == np.uint8 for o in out)
    # Batching must not mix images: the first equals the single-image result up to float noise.
    assert np.abs(out[0].astype(int) - restored.astype(int)).max() <= 1
    # Sub-batching (batch_size=1) gives the same pixels up to float noise too.
    one_by_one = build_purifier("codeformer", device="cpu", options={"codeformer": {"batch_size": 1}})(images)
    for a, b in zip(out, one_by_one):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_matches_a_manual_forward_pass(purifier, astronaut, restored):
    # The documented pipeline: /255 -> [-1, 1] -> net(x, w=0.5, adain=True)[0] -> clamp -> [0, 255] -> round.
    net = build_codeformer("tiny")
    x = torch.from_numpy(astronaut).permute(2, 0, 1)[None].float() / 255.0 * 2 - 1
    with torch.no_grad():
        y = net(x, w=0.5, adain=True)[0].clamp(-1, 1)
    expected = ((y + 1) / 2 * 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
    assert np.abs(expected.astype(int) - restored.astype(int)).max() <= 1


def test_fidelity_weight_changes_the_output(astronaut, restored):
    prior_only = build_purifier("codeformer", device="cpu", options={"codeformer": {"fidelity_weight": 0.0}})
    assert not np.array_equal(prior_only([astronaut])[0], restored)


def test_aligned_mode_returns_the_512_face(astronaut, restored):
    aligned = build_purifier("codeformer", device="cpu", options={"codeformer": {"mode": "aligned"}})
    small = np.ascontiguousarray(astronaut[::2, ::2])
    out = aligned([astronaut, small])
    assert [o.shape for o in out] == [(512, 512, 3), (512, 512, 3)]
    # A 512 input needs no resize in either mode (up to float noise from batching with another image).
    assert np.abs(out[0].astype(int) - restored.astype(int)).max() <= 1


def test_config_dict_names_weights_but_not_device(purifier):
    cfg = purifier.config_dict()
    assert cfg["name"] == "codeformer" and cfg["preset"] == "tiny" and cfg["weights"] == "random:tiny"
    assert cfg["fidelity_weight"] == 0.5 and cfg["mode"] == "whole"
    assert "device" not in cfg
    assert purifier.uses_gpu


def test_full_preset_with_missing_weights_names_the_file_and_url(tmp_path):
    with pytest.raises(MissingWeightsError) as err:
        build_purifier("codeformer", device="cpu", preset="full", weights_dir=str(tmp_path))
    message = str(err.value)
    assert str(tmp_path / "codeformer" / "codeformer.pth") in message and CODEFORMER_URL in message


def test_full_preset_loads_weights_from_weights_dir(tmp_path, monkeypatch):
    from raypdm.models.weights import CorruptWeightsError
    from raypdm.models.verify import NO_VERIFY_ENV

    # Random full-size weights saved the way the release file is laid out (``params_ema``).
    state = build_codeformer("full").state_dict()
    (tmp_path / "codeformer").mkdir()
    torch.save({"params_ema": state}, tmp_path / "codeformer" / "codeformer.pth")
    # The purifier loads through the one model context, which checks the release's pinned sha256 ...
    with pytest.raises(CorruptWeightsError, match="pinned sha256"):
        build_purifier("codeformer", device="cpu", preset="full", weights_dir=str(tmp_path))
    # ... unless the user vouches for the file (--no-verify), as for these random weights.
    monkeypatch.setenv(NO_VERIFY_ENV, "1")
    purifier = build_purifier("codeformer", device="cpu", preset="full", weights_dir=str(tmp_path))
    key = "fuse_convs_dict.256.scale.2.weight"
    assert torch.equal(purifier.net.state_dict()[key], state[key])
    assert purifier.config_dict()["weights"].startswith("sha256:")


@pytest.mark.gpu
def test_half_precision_on_gpu(astronaut):
    for dtype in ("float16", "bfloat16"):
        p = build_purifier("codeformer", device="cuda", options={"codeformer": {"dtype": dtype}})
        assert p.net.position_emb.dtype == getattr(torch, dtype)
        out = p([astronaut, np.ascontiguousarray(astronaut[:300, :200])])
        assert [o.shape for o in out] == [(512, 512, 3), (300, 200, 3)] and out[0].dtype == np.uint8
