"""ADM 256x256 unconditional UNet: checkpoint layout, strict loading, fp16 split, and the details that go wrong."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from raypdm import models
from raypdm.models.adm import (
    ADM_FILENAME,
    ADM_URL,
    NAME,
    ADMConfig,
    AttentionBlock,
    ResBlock,
    adm_layout,
    build_adm,
    load_adm,
    timestep_embedding,
)
from raypdm.models.weights import MissingWeightsError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REFERENCE = Path(__file__).resolve().parents[1] / "reference"
MANIFEST = json.loads((REFERENCE / "adm256_uncond_state_dict.json").read_text())
SUMMARY = json.loads((REFERENCE / "adm256_uncond_summary.json").read_text())


@pytest.fixture(scope="module")
def full_meta():
    return build_adm("full", device="meta")


@pytest.fixture(scope="module")
def tiny():
    return build_adm("tiny")


# ------------------------------------------------------------------------------------------ layout


def test_full_preset_matches_the_checkpoint_manifest(full_meta):
    state = full_meta.state_dict()
    got = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in state.items()]
    assert got == MANIFEST  # every key, shape and dtype, in state-dict order
    assert len(state) == SUMMARY["num_state_dict_entries"] == 566
    assert sum(p.numel() for p in full_meta.parameters()) == SUMMARY["total_params"] == 552_814_086
    assert list(full_meta.buffers()) == []
    lines = "\n".join(f"{k}:{'x'.join(str(d) for d in v.shape)}" for k, v in state.items())
    assert hashlib.sha256(lines.encode()).hexdigest() == SUMMARY["layout_sha256_state_dict_order"]


def test_parameter_counts_per_block(full_meta):
    counts: dict[str, int] = {}
    for key, p in full_meta.named_parameters():
        parts = key.split(".")
        group = ".".join(parts[:2]) if parts[0] in ("input_blocks", "output_blocks") else parts[0]
        counts[group] = counts.get(group, 0) + p.numel()
    assert counts == SUMMARY["param_count_by_group"]


def test_strict_load_of_a_state_dict_built_from_the_manifest(full_meta):
    state = {k: torch.empty(s, device="meta") for k, s, _ in MANIFEST}
    result = full_meta.load_state_dict(state, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    with pytest.raises(RuntimeError, match="Missing key"):
        build_adm("full", device="meta").load_state_dict(dict(list(state.items())[1:]), strict=True, assign=True)


def test_registry_layout_and_spec():
    spec = models.get(NAME)
    assert spec.layouts()[NAME] == {k: tuple(s) for k, s, _ in MANIFEST}
    assert [f.path for f in spec.files] == [ADM_FILENAME] and spec.files[0].url == ADM_URL
    fetch = spec.fetch_command("/w")
    assert ADM_URL in fetch and "/w/adm256-uncond/256x256_diffusion_uncond.pt" in fetch
    assert "research" in spec.licence_note
    assert adm_layout("tiny") == {k: tuple(v.shape) for k, v in build_adm("tiny").state_dict().items()}


def test_fp16_conversion_splits_like_upstream(full_meta):
    converted = build_adm("full", device="meta").convert_torso(torch.float16)
    half = [p for p in converted.parameters() if p.dtype == torch.float16]
    full = [p for p in converted.parameters() if p.dtype == torch.float32]
    split = SUMMARY["after_convert_to_fp16"]
    assert (len(half), len(full)) == (split["num_fp16_tensors"], split["num_fp32_tensors"]) == (274, 292)
    assert sum(p.numel() for p in half) == split["fp16_numel"]
    assert converted.torso_dtype == torch.float16
    assert converted.time_embed[0].weight.dtype == converted.out[2].weight.dtype == torch.float32


# ------------------------------------------------------------------------------------------ numerics


def test_timestep_embedding_is_cos_then_sin():
    t = torch.tensor([0.0, 3.0])
    emb = timestep_embedding(t, 8)
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = [math.exp(-math.log(10000) * i / 4) for i in range(4)]
    want = [math.cos(3 * f) for f in freqs] + [math.sin(3 * f) for f in freqs]
    torch.testing.assert_close(emb[1], torch.tensor(want), rtol=1e-6, atol=1e-6)


def test_attention_uses_the_legacy_head_order():
    torch.manual_seed(0)
    block = AttentionBlock(32, num_head_channels=16, groups=8)
    torch.nn.init.normal_(block.proj_out.weight)
    assert block.qkv.weight.shape == (96, 32, 1) and block.proj_out.weight.shape == (32, 32, 1)
    x = torch.randn(2, 32, 4, 4)
    # upstream QKVAttentionLegacy: per head a [q|k|v] block, q and k scaled by ch**-0.25, softmax over s
    qkv = block.qkv(block.norm(x.reshape(2, 32, 16)))
    q, k, v = qkv.reshape(2 * 2, 48, 16).split(16, dim=1)
    scale = 16**-0.25
    w = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    a = torch.einsum("bts,bcs->bct", w, v).reshape(2, 32, 16)
    want = x + block.proj_out(a).reshape(2, 32, 4, 4)
    torch.testing.assert_close(block(x), want, rtol=1e-5, atol=1e-5)


def test_resblock_scale_comes_before_shift():
    torch.manual_seed(0)
    block = ResBlock(8, 12, 16, groups=4)
    torch.nn.init.normal_(block.out_layers[3].weight)
    x, emb = torch.randn(1, 8, 4, 4), torch.randn(1, 12)
    h = block.in_layers(x)
    e = block.emb_layers(emb)[..., None, None]
    scale, shift = e[:, :16], e[:, 16:]
    want = block.skip_connection(x) + block.out_layers[1:](block.out_layers[0](h) * (1 + scale) + shift)
    torch.testing.assert_close(block(x, emb), want)
    assert isinstance(block.skip_connection, torch.nn.Conv2d) and block.skip_connection.kernel_size == (1, 1)


def test_tiny_forward_is_seeded_and_learned_sigma(tiny):
    cfg = tiny.config
    assert cfg.image_size == 32 and cfg.out_channels == 6
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.inference_mode():
        y = tiny(x, torch.tensor([10, 900]))
        y_again = build_adm("tiny")(x, torch.tensor([10, 900]))
    assert y.shape == (2, 6, 32, 32) and y.dtype == torch.float32
    assert y.abs().mean() > 1e-3  # random builds re-initialise the zero-init output convs
    torch.testing.assert_close(y, y_again, rtol=0, atol=0)
    assert not torch.allclose(y[0], y[1])  # the timestep matters


def test_half_torso_runs_and_returns_fp32():
    model = build_adm("tiny", dtype=torch.bfloat16)
    assert model.torso_dtype == torch.bfloat16 and model.out[2].weight.dtype == torch.float32
    with torch.inference_mode():
        y = model(torch.zeros(1, 3, 32, 32), torch.tensor([5]))
    assert y.dtype == torch.float32 and torch.isfinite(y).all()


def test_rejects_configs_that_cannot_build():
    with pytest.raises(ValueError, match="image_size"):
        ADMConfig(image_size=100)
    with pytest.raises(ValueError, match="norm_groups"):
        dataclasses.replace(ADMConfig.tiny(), norm_groups=5)


# ------------------------------------------------------------------------------------------ loading


def test_load_is_strict_and_converts_after_loading(tmp_path, tiny):
    path = tmp_path / "tiny.pt"
    torch.save({k: v.half() for k, v in tiny.state_dict().items()}, path)  # an fp16 file still loads as fp32
    loaded = load_adm(path, config=ADMConfig.tiny(), dtype=torch.bfloat16)
    assert loaded.torso_dtype == torch.bfloat16 and loaded.time_embed[0].weight.dtype == torch.float32
    ref = load_adm(path, config=ADMConfig.tiny())
    assert all(p.dtype == torch.float32 for p in ref.parameters())
    torch.testing.assert_close(ref.input_blocks[0][0].weight, tiny.input_blocks[0][0].weight.half().float())
    bad = tmp_path / "bad.pt"
    torch.save({**tiny.state_dict(), "extra.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="bad.pt"):
        load_adm(bad, config=ADMConfig.tiny())


def test_missing_weights_name_the_file_and_the_fetch_command(tmp_path):
    with pytest.raises(MissingWeightsError) as err:
        models.load(NAME, tmp_path)
    assert ADM_FILENAME in str(err.value) and ADM_URL in str(err.value)
