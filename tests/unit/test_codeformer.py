"""CodeFormer architecture: checkpoint layout, strict loading, forward interface, fusion and AdaIN."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from raypdm import models
from raypdm.models.codeformer import (
    CODEFORMER_URL,
    CodeFormer,
    CodeFormerConfig,
    adaptive_instance_normalization,
    build_codeformer,
    codeformer_config,
    codeformer_layout,
    load_codeformer,
)
from raypdm.models.weights import MissingWeightsError

REFERENCE = Path(__file__).resolve().parents[1] / "reference"
MANIFEST = json.loads((REFERENCE / "codeformer_state_dict.json").read_text())
META = json.loads((REFERENCE / "codeformer_meta.json").read_text())


@pytest.fixture(scope="module")
def tiny() -> CodeFormer:
    return build_codeformer("tiny")


@pytest.fixture(scope="module")
def face() -> torch.Tensor:
    from skimage import data

    x = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    return x  # (1, 3, 512, 512) in [-1, 1]


@pytest.fixture(scope="module")
def manifest_state_dict() -> dict[str, torch.Tensor]:
    """Random tensors with exactly the checkpoint's keys, shapes and dtypes (~376 MB)."""
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(shape, generator=gen, dtype=getattr(torch, dt)) * 0.02 for k, shape, dt in MANIFEST}


# ------------------------------------------------------------------------------------------- layout


def test_full_preset_matches_the_official_checkpoint_layout_exactly():
    model = build_codeformer("full", device="meta")
    state = model.state_dict()
    ours = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in state.items()]
    assert ours == MANIFEST  # keys, shapes, dtypes and state-dict order
    assert len(state) == META["num_state_dict_entries"] == 515
    assert sum(v.numel() for v in state.values()) == META["num_parameters_total"] == 94_112_707
    assert list(model.buffers()) == []  # every entry is a Parameter, as upstream


def test_full_preset_parameter_counts_per_top_level_module():
    model = build_codeformer("full", device="meta")
    counts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    counts["position_emb"] = model.position_emb.numel()
    assert counts == META["params_by_top_level_module"]


def test_derived_fuse_indices_and_channels_match_upstream_tables():
    model = build_codeformer("full", device="meta")
    assert model.encoder.fuse_index == {k: v for k, v in META["fuse_encoder_block"].items()}
    assert model.generator.fuse_index == {k: v for k, v in META["fuse_generator_block"].items()}
    cfg = model.config
    assert {str(r): cfg.channels(r) for r in cfg.resolutions} == META["channels"]
    assert cfg.latent_size == 256 and cfg.latent_side == 16
    blocks = [[i, type(b).__name__] for i, b in enumerate(model.encoder.blocks)]
    assert blocks == META["encoder_blocks"]
    assert [[i, type(b).__name__] for i, b in enumerate(model.generator.blocks)] == META["generator_blocks"]


def test_full_forward_shapes_on_meta():
    model = build_codeformer("full", device="meta")
    x = torch.zeros(1, 3, 512, 512, device="meta")
    expected = META["forward_outputs_for_input_1x3x512x512"]
    with torch.no_grad():
        out, logits, lq_feat = model(x, w=0.5, adain=True)
        assert [list(t.shape) for t in (out, logits, lq_feat)] == list(expected["default (code_only=False)"].values())
        logits, lq_feat = model(x, code_only=True)
        assert [list(t.shape) for t in (logits, lq_feat)] == list(expected["code_only=True"].values())


def test_codeformer_layout_is_the_manifest():
    assert codeformer_layout("full") == {k: tuple(s) for k, s, _ in MANIFEST}


# ------------------------------------------------------------------------------------------ loading


def test_state_dict_from_the_manifest_loads_strictly(manifest_state_dict):
    model = build_codeformer("full")  # real CPU tensors, ~376 MB
    result = model.load_state_dict(manifest_state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(model.quantize.embedding.weight, manifest_state_dict["quantize.embedding.weight"])


def test_load_codeformer_reads_params_ema_from_a_pth(tmp_path, manifest_state_dict):
    path = tmp_path / "codeformer.pth"
    # The release file nests the weights under "params_ema"; anything else in it is ignored.
    torch.save({"params_ema": manifest_state_dict}, path)
    model = load_codeformer(path)
    assert not model.training
    key = "ft_layers.3.self_attn.in_proj_weight"
    assert torch.equal(model.state_dict()[key], manifest_state_dict[key])
    assert next(model.parameters()).device.type == "cpu"


def test_load_codeformer_is_strict(tmp_path, manifest_state_dict):
    broken = dict(manifest_state_dict)
    broken.pop("idx_pred_layer.1.weight")
    path = tmp_path / "codeformer.pth"
    torch.save({"params_ema": broken}, path)
    with pytest.raises(RuntimeError, match="idx_pred_layer.1.weight"):
        load_codeformer(path)


def test_missing_weights_name_the_file_and_the_fetch_command(tmp_path):
    path = tmp_path / "nowhere" / "codeformer.pth"
    with pytest.raises(MissingWeightsError) as err:
        load_codeformer(path)
    message = str(err.value)
    assert str(path) in message and CODEFORMER_URL in message and "curl" in message


# --------------------------------------------------------------------------------------- registry


def test_registry_entry():
    spec = models.get("codeformer")
    assert "NON-COMMERCIAL" in spec.licence and "non-commercial" in spec.licence_note.lower()
    assert "S-Lab" in spec.licence
    (weight,) = spec.files
    assert weight.path == "codeformer.pth" and weight.url == CODEFORMER_URL and weight.layout == "codeformer"
    assert weight.sha256 is None or len(weight.sha256) == 64
    assert spec.model_dir("/w") == Path("/w/codeformer")
    assert CODEFORMER_URL in spec.fetch_command("/w") and "/w/codeformer/codeformer.pth" in spec.fetch_command("/w")
    assert spec.layouts()["codeformer"] == codeformer_layout("full")
    assert isinstance(models.build("codeformer", preset="full", device="meta"), CodeFormer)
    tiny = models.build("codeformer", preset="tiny")
    assert tiny.config == CodeFormerConfig.tiny() and not tiny.training


def test_models_load_reports_missing_weights(tmp_path):
    with pytest.raises(MissingWeightsError, match="codeformer.pth"):
        models.load("codeformer", tmp_path)


# ---------------------------------------------------------------------------------------- forward


def test_tiny_forward_shapes(tiny, face):
    cfg = tiny.config
    x = face.repeat(2, 1, 1, 1)
    with torch.no_grad():
        out, logits, lq_feat = tiny(x, w=0.5, adain=True)
        assert out.shape == (2, 3, 512, 512)
        assert logits.shape == (2, cfg.latent_size, cfg.codebook_size) == (2, 256, cfg.codebook_size)
        assert lq_feat.shape == (2, cfg.emb_dim, 16, 16)
        code_only = tiny(x, code_only=True)
    assert len(code_only) == 2
    torch.testing.assert_close(code_only[0], logits)


def test_tiny_is_seeded_and_samples_are_independent(tiny, face):
    other = build_codeformer("tiny")
    for a, b in zip(tiny.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    with torch.no_grad():
        batch = tiny(torch.cat([face, face.flip(-1)]), w=0.5)[0]
        single = tiny(face, w=0.5)[0]
    torch.testing.assert_close(batch[:1], single, atol=1e-3, rtol=1e-3)


def test_wrong_input_size_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="512"):
        tiny(torch.zeros(1, 3, 256, 256))


def test_w_zero_skips_fusion_and_w_positive_uses_it(face):
    model = build_codeformer("tiny")
    with torch.no_grad():
        base = model(face, w=0.0)[0]
        fused = model(face, w=0.5)[0]
        assert not torch.allclose(base, fused)
        # Poison every fuse parameter: at w=0 the blocks must not even run.
        for p in model.fuse_convs_dict.parameters():
            p.fill_(float("nan"))
        torch.testing.assert_close(model(face, w=0.0)[0], base, rtol=0, atol=0)
        assert torch.isnan(model(face, w=0.5)[0]).any()


def test_fuse_block_is_linear_in_the_fidelity_weight(tiny):
    torch.manual_seed(0)
    block = tiny.fuse_convs_dict["64"]
    ch = tiny.config.channels(64)
    enc, dec = torch.randn(1, ch, 64, 64), torch.randn(1, ch, 64, 64)
    with torch.no_grad():
        residual = block(enc, dec, 1.0) - dec  # dec * scale + shift
        torch.testing.assert_close(block(enc, dec, 0.3) - dec, 0.3 * residual, atol=1e-5, rtol=1e-4)


def test_adain_renormalises_to_the_encoder_statistics():
    torch.manual_seed(0)
    content, style = torch.randn(2, 8, 16, 16) * 3 + 1, torch.randn(2, 8, 16, 16) * 0.5 - 2
    out = adaptive_instance_normalization(content, style)
    # Upstream: per sample and channel, unbiased variance, eps 1e-5 added to the variance.
    s_mean, s_std = style.flatten(2).mean(-1), (style.flatten(2).var(-1) + 1e-5).sqrt()
    c_std = (content.flatten(2).var(-1) + 1e-5).sqrt()
    torch.testing.assert_close(out.flatten(2).mean(-1), s_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.flatten(2).std(-1), s_std * content.flatten(2).std(-1) / c_std, atol=1e-5, rtol=1e-5)
    assert adaptive_instance_normalization(content.half(), style.half()).dtype == torch.float16


def test_adain_flag_feeds_the_generator_renormalised_codes(tiny, face):
    seen = []
    handle = tiny.generator.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    with torch.no_grad():
        _, logits, lq_feat = tiny(face, adain=True)
        tiny(face, adain=False)
    handle.remove()
    with_adain, without = seen
    codes = tiny.quantize.lookup(logits.argmax(-1), 16)
    torch.testing.assert_close(without, codes)
    torch.testing.assert_close(with_adain, adaptive_instance_normalization(codes, lq_feat))
    torch.testing.assert_close(with_adain.flatten(2).mean(-1), lq_feat.flatten(2).mean(-1), atol=1e-5, rtol=1e-4)


def test_nearest_quantizer_picks_the_closest_code(tiny):
    codes = tiny.quantize.embedding.weight
    z = codes[[3, 7, 11, 7]].T.reshape(1, -1, 2, 2) + 1e-6
    assert tiny.quantize.nearest_indices(z).tolist() == [[3, 7, 11, 7]]
    torch.testing.assert_close(tiny.quantize(z), codes[[3, 7, 11, 7]].T.reshape(1, -1, 2, 2))


# ----------------------------------------------------------------------------------------- config


def test_config_validation_and_overrides():
    assert codeformer_config("full") == CodeFormerConfig()
    assert codeformer_config("tiny", n_layers=2).n_layers == 2
    cfg = CodeFormerConfig(connect_list=["32", "64"], ch_mult=[1, 2, 2, 4, 4, 8])  # lists from YAML
    assert cfg.connect_list == ("32", "64") and hash(cfg)
    with pytest.raises(ValueError, match="preset"):
        codeformer_config("huge")
    with pytest.raises(ValueError, match="connect_list"):
        CodeFormerConfig(connect_list=("48",))
    with pytest.raises(ValueError, match="norm_groups"):
        CodeFormerConfig(nf=8)
    with pytest.raises(ValueError, match="n_head"):
        CodeFormerConfig(dim_embd=100, n_head=8)


def test_smaller_img_size_is_supported_by_the_architecture():
    # The latent grid (and position embedding) follows img_size; the tiny preset keeps 512 on purpose.
    cfg = codeformer_config("tiny", img_size=128, connect_list=("16", "32"))
    model = build_codeformer(cfg)
    assert model.position_emb.shape == (16, cfg.dim_embd)
    with torch.no_grad():
        out, logits, lq_feat = model(torch.zeros(1, 3, 128, 128), w=1.0, adain=True)
    assert out.shape == (1, 3, 128, 128) and logits.shape == (1, 16, cfg.codebook_size) and lq_feat.shape[-1] == 4


@pytest.mark.gpu
def test_tiny_runs_in_half_precision_on_gpu(face):
    for dtype in (torch.float16, torch.bfloat16):
        model = build_codeformer("tiny", device="cuda", dtype=dtype)
        with torch.no_grad():
            out, logits, lq_feat = model(face.cuda().to(dtype), w=0.5, adain=True)
        assert out.dtype == dtype and torch.isfinite(out).all() and out.shape == (1, 3, 512, 512)
