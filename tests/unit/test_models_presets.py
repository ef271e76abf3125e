"""Presets: the `full` architectures match the reference manifests; `tiny` is fast, seeded and runs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from raypdm import models
from raypdm.models.stable_diffusion import SD21_SCHEDULER, TEXT_PREFIX
from raypdm.models.tokenizer import MODEL_MAX_LENGTH, tiny_clip_tokenizer

REFERENCE = Path(__file__).resolve().parent.parent / "reference" / "sd"

# (model, component, reference manifest)
MANIFESTS = [
    ("sd21-base", "unet", "sd21base_unet_diffusers.json"),
    ("sd21-base", "vae", "sd21base_vae_diffusers.json"),
    ("sd21-base", "text_encoder", "sd2_text_encoder_clip_diffusers.json"),
    ("sd-x4-upscaler", "unet", "x4upscaler_unet_diffusers.json"),
    ("sd-x4-upscaler", "vae", "x4upscaler_vae_diffusers.json"),
]


def _manifest(module: torch.nn.Module, prefix: str = "") -> set[tuple[str, tuple[int, ...], str]]:
    return {(prefix + k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def full_on_meta():
    return {name: models.build(name, preset="full", device="meta") for name in ("sd21-base", "sd-x4-upscaler")}


@pytest.mark.parametrize("name,component,manifest", MANIFESTS)
def test_full_preset_matches_reference_manifest(full_on_meta, name, component, manifest):
    module = getattr(full_on_meta[name], component)
    assert all(p.device.type == "meta" for p in module.parameters())
    # transformers 5 leaves `text_model.` out of CLIPTextModel keys; files on disk keep it.
    got = _manifest(module, TEXT_PREFIX if component == "text_encoder" else "")
    want = {(k, tuple(s), d) for k, s, d in json.loads((REFERENCE / manifest).read_text())}
    assert not (want - got), f"missing or different: {sorted(want - got)[:5]}"
    assert not (got - want), f"unexpected or different: {sorted(got - want)[:5]}"


@pytest.mark.parametrize("name", ["sd21-base", "sd-x4-upscaler"])
def test_registry_layouts_match_reference(name):
    layouts = models.get(name).layouts()
    for model, component, manifest in MANIFESTS:
        if model == name:
            want = {k: tuple(s) for k, s, _ in json.loads((REFERENCE / manifest).read_text())}
            assert layouts[component] == want


def test_full_configs_carry_the_documented_values(full_on_meta):
    sd, x4 = full_on_meta["sd21-base"], full_on_meta["sd-x4-upscaler"]
    assert sd.vae.config.scaling_factor == 0.18215
    assert x4.vae.config.scaling_factor == 0.08333 and x4.vae.config.latent_channels == 4
    assert x4.unet.config.in_channels == 7 and x4.unet.config.num_class_embeds == 1000
    assert list(x4.unet.config.only_cross_attention) == [True, True, True, False]
    te = sd.text_encoder.config
    assert (te.num_hidden_layers, te.hidden_size, te.num_attention_heads, te.intermediate_size) == (23, 1024, 16, 4096)
    assert (te.hidden_act, te.vocab_size, te.max_position_embeddings) == ("gelu", 49408, 77)


def test_schedulers():
    sd = models.build("sd21-base")
    cfg = sd.scheduler.config
    assert type(sd.scheduler).__name__ == "DDPMScheduler"
    for key, value in SD21_SCHEDULER.items():
        assert cfg[key] == value, key
    x4 = models.build("sd-x4-upscaler")
    assert x4.scheduler.config.prediction_type == "v_prediction"
    assert (x4.scheduler.config.beta_start, x4.scheduler.config.beta_end) == (0.0001, 0.02)
    low = x4.low_res_scheduler.config
    assert (low.beta_schedule, low.clip_sample, low.prediction_type, low.variance_type) == (
        "scaled_linear", True, "epsilon", "fixed_small")


@pytest.mark.parametrize("name", ["sd21-base", "sd-x4-upscaler"])
def test_tiny_is_small_fast_and_deterministic(name):
    models.build(name)  # warm-up: first call pays for lazy imports
    start = time.perf_counter()
    a = models.build(name)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"tiny build took {elapsed:.2f}s"
    unet_params = sum(p.numel() for p in a.unet.parameters())
    assert 100_000 < unet_params < 1_500_000
    torch.manual_seed(123)
    outside = torch.rand(3)
    b = models.build(name)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), outside), "building must not consume the caller's RNG"
    for part in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), part


def test_build_dtype_and_unknown_preset():
    sd = models.build("sd21-base", dtype=torch.float16)
    assert next(sd.unet.parameters()).dtype == torch.float16
    with pytest.raises(ValueError, match="preset"):
        models.build("sd21-base", preset="huge")


def test_tiny_tokenizer_round_trips_prompts():
    tok = tiny_clip_tokenizer()
    ids = tok("a photo of sks person").input_ids
    assert len(ids) > 3 and max(ids) < len(tok)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True).strip() == "a photo of sks person"
    padded = tok("a photo of sks person", padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=True)
    assert len(padded.input_ids) == MODEL_MAX_LENGTH == tok.model_max_length
    long = tok("word " * 200, padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=True)
    assert len(long.input_ids) == MODEL_MAX_LENGTH


def test_tiny_sd_pipeline_runs_end_to_end():
    pipe = models.build("sd21-base").to_pipeline()
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a photo of sks person", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 64, 64, 3)
    assert np.isfinite(out.images).all()


def test_tiny_upscale_pipeline_upscales_x4():
    pipe = models.build("sd-x4-upscaler").to_pipeline()
    pipe.set_progress_bar_config(disable=True)
    low = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))  # [0, 1], as diffusers expects
    out = pipe("a photo of a person", image=low, num_inference_steps=2, noise_level=20, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 64, 64, 3)
    assert np.isfinite(out.images).all()
