"""Decoupled negative guidance (paper Eq. 6) on the tiny random-weight SD 2.1-base, on the CPU.

Every run is 64x64 px (8x8 latents) with 1-3 steps: a pipeline call takes well under a second.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from raypdm import models
from raypdm.config import ConfigError, resolve_config
from raypdm.sample import (
    DecoupledSampler,
    SamplingConfig,
    cfg_scale_for,
    decoupled_noise_pred,
    positive_prompt,
    seeds_for,
    w_for_cfg_scale,
)
from raypdm.train.prompts import cdl_prompts

PROMPT = "a photo of sks person"
C_POS = "a photo of sks person without t@j noisy pattern"
C_NEG = "noisy, abstract, pattern, low quality"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def parts():
    return models.build("sd21-base", preset="tiny")


@pytest.fixture(scope="module")
def pipe(parts):
    pipeline = parts.to_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def small(**overrides) -> SamplingConfig:
    return SamplingConfig(**{"height": 64, "width": 64, "steps": 2, "num_images": 2, **overrides})


def encode(parts, prompt: str) -> torch.Tensor:
    """The SD2 text conditioning of one prompt, written out (padded to 77 tokens, last hidden state)."""
    tok = parts.tokenizer
    ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return parts.text_encoder(ids.input_ids)[0]


# ------------------------------------------------------------------------------------- the formula


def test_formula_and_cfg_mapping():
    g = torch.Generator().manual_seed(0)
    eps_pos, eps_neg = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    w = 7.5
    guided = decoupled_noise_pred(eps_pos, eps_neg, w)
    torch.testing.assert_close(guided, 8.5 * eps_pos - 7.5 * eps_neg)
    # diffusers' CFG, ε_u + s(ε_c − ε_u), with s = 1 + w and c_neg in the unconditional slot, is Eq. 6
    s = cfg_scale_for(w)
    assert s == 8.5 and w_for_cfg_scale(s) == w
    torch.testing.assert_close(eps_neg + s * (eps_pos - eps_neg), guided)
    # ... and s = w (the tempting mistake) is not
    assert not torch.allclose(eps_neg + w * (eps_pos - eps_neg), guided)
    assert torch.equal(decoupled_noise_pred(eps_pos, eps_neg, 0.0), eps_pos)
    assert cfg_scale_for(0) == 1.0  # diffusers' "guidance off"
    with pytest.raises(ValueError, match="w must be"):
        cfg_scale_for(-0.5)
    with pytest.raises(ValueError, match="guidance scale"):
        w_for_cfg_scale(0.5)
    with pytest.raises(ValueError, match="shape"):
        decoupled_noise_pred(eps_pos, eps_neg[:1], w)


def test_prompts():
    assert positive_prompt(PROMPT) == C_POS
    assert positive_prompt(PROMPT, token="xyz") == "a photo of sks person without xyz noisy pattern"
    assert positive_prompt(PROMPT, cdl=False) == PROMPT
    official = cdl_prompts("official-code")
    expected = "a photo of sks person, without bhj noisy pattern"
    assert positive_prompt(PROMPT, token="bhj", templates=official) == expected
    cfg = SamplingConfig()
    assert cfg.prompts == [PROMPT, "a smiling photo of sks person"]
    # the paper's evaluation: 16 × 100 steps of SD 2.1-base's PNDM at CFG 7.5 (w = 6.5, raypdm/protocols.py)
    assert (cfg.num_images, cfg.steps, cfg.w, cfg.cfg_scale, cfg.height, cfg.scheduler) == (
        16, 100, 6.5, 7.5, 512, "pndm")
    assert cfg.positive(PROMPT) == C_POS and cfg.negative() == C_NEG
    assert SamplingConfig(w=0).negative() is None  # unused at w = 0
    assert SamplingConfig(cdl_prompts=official).negative() == "noisy, lowres, artifact, pattern"


def test_seeds_for():
    a = seeds_for(0, "id1", 0, 5)
    assert a == seeds_for(0, "id1", 0, 5)  # deterministic
    assert a[:3] == seeds_for(0, "id1", 0, 3)  # image i's seed does not depend on n
    others = seeds_for(0, "id2", 0, 5) + seeds_for(0, "id1", 1, 5) + seeds_for(1, "id1", 0, 5)
    assert len(set(a + others)) == 20
    assert all(0 <= s < 2**63 for s in a + others)
    assert seeds_for(0, "id1", 0, 0) == []


def test_config_validation_names_the_field():
    cases = {
        "w": {"w": -1},
        "height": {"height": 60},
        "steps": {"steps": 0},
        "prompts": {"prompts": []},
        "scheduler": {"scheduler": "heun"},
        "cdl_prompts.token": {"cdl_prompts": {"token": " "}},
        "negative": {"negative": "x"},  # unknown key: negative prompts live in cdl_prompts
    }
    for field, data in cases.items():
        with pytest.raises(ValidationError) as info:
            SamplingConfig(**data)
        locs = [".".join(map(str, e["loc"])) for e in info.value.errors()]
        assert field in locs, (field, locs)
    with pytest.raises(ValidationError, match="w"):
        SamplingConfig(w=float("nan"))
    with pytest.raises(ConfigError, match=r"w: Input should be greater than or equal to 0"):
        resolve_config(SamplingConfig, overrides=["w=-2"])
    assert resolve_config(SamplingConfig, overrides=["w=3", "cdl_prompts.token=xyz"]).positive("p") == (
        "p without xyz noisy pattern"
    )


# -------------------------------------------------------------------------------------- sampling


def test_w0_is_plain_conditional_sampling(pipe):
    seeds = [5, 6]
    sampler = DecoupledSampler(pipe, small(w=0.0, scheduler="model"))  # the pipeline's own scheduler, as below
    got = sampler.sample(PROMPT, seeds)
    plain = pipe(
        prompt=[C_POS] * 2,
        guidance_scale=1.0,
        num_inference_steps=2,
        height=64,
        width=64,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="np",
    ).images
    plain = [np.clip(np.rint(x * 255), 0, 255).astype(np.uint8) for x in plain]
    assert all(g.shape == (64, 64, 3) and g.dtype == np.uint8 for g in got)
    for g, p in zip(got, plain, strict=True):
        np.testing.assert_array_equal(g, p)
    # the negative prompt has no effect at w = 0
    other_neg = small(w=0.0, scheduler="model", cdl_prompts={"negative_prompt": "something else entirely"})
    np.testing.assert_array_equal(DecoupledSampler(pipe, other_neg).sample(PROMPT, seeds)[0], got[0])
    # ... and guidance does change the image
    assert not np.array_equal(DecoupledSampler(pipe, small(w=7.5, scheduler="model")).sample(PROMPT, seeds)[0], got[0])


def test_one_guided_step_is_eq6(pipe, parts, monkeypatch):
    """Record the UNet's inputs/outputs and the noise handed to the scheduler for one step."""
    w, n = 7.5, 2
    sampler = DecoupledSampler(pipe, small(w=w, steps=1))
    calls, guided = [], []

    def record_unet(module, args, kwargs, output):
        ctx = kwargs["encoder_hidden_states"].clone()
        calls.append({"sample": args[0].clone(), "t": args[1], "ctx": ctx, "eps": output[0].clone()})

    handle = sampler.pipeline.unet.register_forward_hook(record_unet, with_kwargs=True)
    step = sampler.pipeline.scheduler.step

    def record_step(model_output, *args, **kwargs):
        guided.append(model_output.clone())
        return step(model_output, *args, **kwargs)

    monkeypatch.setattr(sampler.pipeline.scheduler, "step", record_step)
    try:
        sampler.sample(PROMPT, [1, 2])
    finally:
        handle.remove()

    assert len(calls) == 1 and len(guided) == 1
    call = calls[0]
    # one batch: [c_neg × n, c_pos × n] on the same latents
    assert call["sample"].shape[0] == 2 * n
    z = call["sample"][:n]
    torch.testing.assert_close(call["sample"][n:], z, rtol=0, atol=0)
    emb_pos, emb_neg = encode(parts, C_POS), encode(parts, C_NEG)
    torch.testing.assert_close(call["ctx"][:n], emb_neg.expand(n, -1, -1))
    torch.testing.assert_close(call["ctx"][n:], emb_pos.expand(n, -1, -1))
    # the guided noise is Eq. 6 of the recorded per-prompt predictions
    eps_neg, eps_pos = call["eps"].chunk(2)
    torch.testing.assert_close(guided[0], decoupled_noise_pred(eps_pos, eps_neg, w), rtol=1e-5, atol=1e-5)
    # ... and of separate, hand-made UNet calls per prompt (no batching shared with the pipeline)
    with torch.no_grad():
        pos = parts.unet(z, call["t"], encoder_hidden_states=emb_pos.expand(n, -1, -1)).sample
        neg = parts.unet(z, call["t"], encoder_hidden_states=emb_neg.expand(n, -1, -1)).sample
    torch.testing.assert_close(guided[0], (1 + w) * pos - w * neg, rtol=1e-4, atol=1e-4)
    assert (guided[0] - pos).abs().max() > 1e-3  # guidance did something


def test_hand_written_loop_matches_sampler(pipe, parts):
    """A home-made Eq. 6 loop (DDIM, 3 steps) gives the sampler's image, up to float rounding."""
    w, steps, seed = 2.0, 3, 17
    sampler = DecoupledSampler(pipe, small(w=w, steps=steps, scheduler="ddim"))
    got = sampler.sample(PROMPT, [seed])[0]

    sched = type(sampler.pipeline.scheduler).from_config(sampler.pipeline.scheduler.config)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn((1, 4, 8, 8), generator=g) * sched.init_noise_sigma
    emb_pos, emb_neg = encode(parts, C_POS), encode(parts, C_NEG)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.scale_model_input(latents, t)
            eps = decoupled_noise_pred(
                parts.unet(x, t, encoder_hidden_states=emb_pos).sample,
                parts.unet(x, t, encoder_hidden_states=emb_neg).sample,
                w,
            )
            latents = sched.step(eps, t, latents).prev_sample
        image = parts.vae.decode(latents / parts.vae.config.scaling_factor).sample
    mine = np.clip(np.rint(((image[0] / 2 + 0.5).clamp(0, 1)).permute(1, 2, 0).numpy() * 255), 0, 255)
    assert np.abs(mine.astype(int) - got.astype(int)).max() <= 1


def test_seed_reproducible_alone_or_in_a_batch(pipe):
    """A seed's image alone equals the same seed in a batch of 3, bit for bit or within one grey level.

    The noise is per image (its own generator), so only batched float kernels can differ: they may round
    differently by ~1e-6, which can move a rare pixel across a rounding boundary.
    """
    sampler = DecoupledSampler(pipe, small(w=7.5))
    batch = sampler.sample(PROMPT, [11, 22, 33])
    alone = sampler.sample(PROMPT, [22])[0]
    diff = np.abs(alone.astype(int) - batch[1].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    np.testing.assert_array_equal(sampler.sample(PROMPT, [11, 22, 33])[2], batch[2])  # same batch: exact
    reordered = sampler.sample(PROMPT, [33, 22, 11])
    assert np.abs(reordered[2].astype(int) - batch[0].astype(int)).max() <= 1
    # different seeds give different images
    assert np.abs(batch[0].astype(int) - batch[2].astype(int)).mean() > 5


def test_batch_size_chunks_and_schedulers(pipe):
    seeds = [1, 2, 3]
    whole = DecoupledSampler(pipe, small(batch_size=8)).sample(PROMPT, seeds)
    chunked = DecoupledSampler(pipe, small(batch_size=2)).sample(PROMPT, seeds)
    assert len(chunked) == 3
    for a, b in zip(whole, chunked, strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    scheduler_before = pipe.scheduler
    for name in ("ddim", "dpm", "euler", "pndm"):
        sampler = DecoupledSampler(pipe, small(scheduler=name))
        assert sampler.sample(PROMPT, [1])[0].shape == (64, 64, 3)
        expected = {"ddim": "DDIM", "dpm": "DPMSolverMultistep", "euler": "EulerDiscrete", "pndm": "PNDM"}[name]
        assert sampler.records(PROMPT, [1])[0]["scheduler"] == expected + "Scheduler"
    assert pipe.scheduler is scheduler_before  # the caller's pipeline is left alone


def test_records_and_sample_identity_regenerate(pipe):
    cfg = small(prompts=[PROMPT, "a smiling photo of sks person"], num_images=2, steps=1, w=3.0)
    sampler = DecoupledSampler(pipe, cfg)
    rows = sampler.sample_identity("id7")
    assert len(rows) == 4
    recs = [r for _, r in rows]
    assert [r["prompt_index"] for r in recs] == [0, 0, 1, 1]
    assert len({r["seed"] for r in recs}) == 4
    first = recs[0]
    assert {k: first[k] for k in ("identity", "prompt", "positive_prompt", "negative_prompt", "w", "cfg_scale",
                                  "steps", "token", "height", "width")} == {
        "identity": "id7", "prompt": PROMPT, "positive_prompt": C_POS, "negative_prompt": C_NEG, "w": 3.0,
        "cfg_scale": 4.0, "steps": 1, "token": "t@j", "height": 64, "width": 64,
    }
    assert first["seed"] == seeds_for(cfg.seed, "id7", 0, 2)[0]
    # a manifest row alone regenerates its image
    last_image, last = rows[-1]
    again = sampler.sample(last["prompt"], [last["seed"]])[0]
    assert np.abs(again.astype(int) - last_image.astype(int)).max() <= 1
    assert DecoupledSampler(pipe, small(cdl_prompts={"cdl": False})).records(PROMPT, [1])[0]["token"] is None
