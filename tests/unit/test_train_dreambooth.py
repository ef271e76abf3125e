"""DreamBooth + prior preservation on the tiny SD 2.1 preset, on the CPU.

Eq. 2 against a hand computation (epsilon and v prediction), training changes what it should and
nothing else, resume equals a straight run, and the export loads in diffusers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from PIL import Image
from pydantic import ValidationError

from raypdm import models
from raypdm.train import DreamBoothTrainer, TrainConfig, cdl_prompts, dreambooth_loss, encode_latents

SIZE = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_parts():
    return models.build("sd21-base", preset="tiny")


def images(n: int, seed: int, size: int = 40) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size + 8 * (i % 2), 3), dtype=np.uint8) for i in range(n)]


def small_cfg(**kw) -> TrainConfig:
    # A large lr so a few steps move tiny weights visibly; clipping off so the update is plain AdamW.
    return TrainConfig(**{"steps": 2, "lr": 1e-3, "resolution": SIZE, "seed": 3, "max_grad_norm": None, **kw})


def flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


def hand_eq2(parts, inst, cls, inst_prompt, cls_prompt, noise, t, lam):
    """Eq. 2 written out: q(z_t|z_0) by hand, one UNet call per half, target from the scheduler's type."""
    ac = parts.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    z0 = torch.cat([inst, cls])
    zt = ac.sqrt() * z0 + (1 - ac).sqrt() * noise
    if parts.scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = ac.sqrt() * noise - (1 - ac).sqrt() * z0

    def embed(prompt):
        tok = parts.tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        return parts.text_encoder(tok.input_ids)[0]

    n = len(inst)
    with torch.no_grad():
        e_inst = parts.unet(zt[:n], t[:n], encoder_hidden_states=embed([inst_prompt] * n)).sample
        e_cls = parts.unet(zt[n:], t[n:], encoder_hidden_states=embed([cls_prompt] * len(cls))).sample
    l_inst = ((e_inst - target[:n]) ** 2).mean()
    l_cls = ((e_cls - target[n:]) ** 2).mean()
    return l_inst + lam * l_cls, l_inst, l_cls


@pytest.fixture(scope="module")
def parts_and_latents():
    parts = tiny_parts()
    inst = encode_latents(parts.vae, images(2, 0), SIZE)
    cls = encode_latents(parts.vae, images(2, 1), SIZE)
    return parts, inst, cls


def test_encode_latents_is_scaled_mean(parts_and_latents):
    parts, inst, _ = parts_and_latents
    assert inst.shape == (2, 4, SIZE // 8, SIZE // 8) and inst.dtype == torch.float32
    im = images(1, 0)[0]  # 40×40, so the centre crop keeps all of it and only the resize acts
    resized = np.asarray(Image.fromarray(im).resize((SIZE, SIZE), Image.Resampling.BICUBIC), dtype=np.float32)
    x = torch.from_numpy(resized).permute(2, 0, 1)[None] / 127.5 - 1
    with torch.no_grad():
        expect = parts.vae.encode(x).latent_dist.mean * parts.vae.config.scaling_factor
    torch.testing.assert_close(inst[:1], expect)
    assert not any(p.grad is not None for p in parts.vae.parameters())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_loss_equals_eq2_by_hand(parts_and_latents, prediction_type, lam):
    parts, inst, cls = parts_and_latents
    parts.scheduler = DDPMScheduler.from_config(parts.scheduler.config, prediction_type=prediction_type)
    g = torch.Generator().manual_seed(7)
    noise = torch.randn((4, *inst.shape[1:]), generator=g)
    t = torch.tensor([10, 500, 999, 250])
    prompts = cdl_prompts()
    with torch.no_grad():
        got = dreambooth_loss(
            parts.unet, parts.text_encoder, parts.tokenizer, parts.scheduler, inst, cls,
            prompts.instance_prompt(), prompts.class_prompt(), noise, t, prior_weight=lam,
        )  # fmt: skip
    want = hand_eq2(parts, inst, cls, prompts.instance_prompt(), prompts.class_prompt(), noise, t, lam)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # The two prediction types really train towards different targets.
    other = "epsilon" if prediction_type == "v_prediction" else "v_prediction"
    parts.scheduler = DDPMScheduler.from_config(parts.scheduler.config, prediction_type=other)
    with torch.no_grad():
        changed = dreambooth_loss(
            parts.unet, parts.text_encoder, parts.tokenizer, parts.scheduler, inst, cls,
            prompts.instance_prompt(), prompts.class_prompt(), noise, t, prior_weight=lam,
        )[0]  # fmt: skip
    parts.scheduler = DDPMScheduler.from_config(parts.scheduler.config, prediction_type="epsilon")
    assert not torch.allclose(changed, got[0])


def test_loss_rejects_unknown_prediction_type_and_bad_shapes(parts_and_latents):
    parts, inst, cls = parts_and_latents
    noise = torch.zeros((4, *inst.shape[1:]))
    t = torch.tensor([1, 2, 3, 4])
    args = (parts.unet, parts.text_encoder, parts.tokenizer)
    sample = DDPMScheduler.from_config(parts.scheduler.config, prediction_type="sample")
    with pytest.raises(ValueError, match="prediction_type 'sample'"):
        dreambooth_loss(*args, sample, inst, cls, "a", "b", noise, t)
    with pytest.raises(ValueError, match="noise shape"):
        dreambooth_loss(*args, parts.scheduler, inst, cls, "a", "b", noise[:3], t)
    with pytest.raises(ValueError, match="2 prompts for 1"):
        dreambooth_loss(*args, parts.scheduler, inst[:1], cls[:1], ["a", "b"], "b", noise[:2], t[:2])


def test_config_defaults_and_validation():
    cfg = TrainConfig()
    assert (cfg.steps, cfg.lr, cfg.prior_weight) == (1000, 5e-7, 1.0)
    assert (cfg.instance_batch_size, cfg.class_batch_size) == (1, 1)
    assert cfg.train_text_encoder and cfg.gradient_checkpointing and cfg.resolution == 512
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.weight_decay, cfg.adam_eps) == (0.9, 0.999, 1e-2, 1e-8)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert cfg.resolved_mixed_precision(cpu) == "no" and cfg.resolved_mixed_precision(gpu) == "bf16"
    assert cfg.resolved_optimizer(cpu) == "adamw"
    with pytest.raises(ValidationError, match="resolution"):
        TrainConfig(resolution=100)
    with pytest.raises(ValidationError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp8")
    with pytest.raises(ValidationError, match="stepz"):
        TrainConfig(stepz=3)


@pytest.mark.parametrize("train_text_encoder", [True, False])
def test_fit_trains_unet_and_text_encoder_only_when_asked(train_text_encoder):
    parts = tiny_parts()
    unet0, text0, vae0 = flat(parts.unet), flat(parts.text_encoder), flat(parts.vae)
    trainer = DreamBoothTrainer(parts, small_cfg(steps=3, train_text_encoder=train_text_encoder), cdl_prompts())
    assert isinstance(trainer.optimizer, torch.optim.AdamW) and trainer.precision == "no"
    seen = []
    history = trainer.fit(images(3, 0), images(2, 1), on_step=lambda step, losses: seen.append((step, losses.loss)))
    assert [h.step for h in history] == [0, 1, 2] == [s for s, _ in seen] and trainer.step == 3
    assert all(np.isfinite([h.loss, h.instance_loss, h.prior_loss]).all() for h in history)
    assert all(h.loss == pytest.approx(h.instance_loss + h.prior_loss) for h in history)
    assert not torch.equal(flat(parts.unet), unet0)
    assert torch.equal(flat(parts.vae), vae0)
    assert torch.equal(flat(parts.text_encoder), text0) != train_text_encoder
    assert ("text_encoder" in trainer.state_dict()) == train_text_encoder


def test_bf16_autocast_step_keeps_fp32_weights():
    parts = tiny_parts()
    trainer = DreamBoothTrainer(parts, small_cfg(steps=1, mixed_precision="bf16"), cdl_prompts())
    (losses,) = trainer.fit(images(1, 0), images(1, 1))
    assert np.isfinite(losses.loss) and trainer.precision == "bf16"
    assert all(p.dtype == torch.float32 for p in trainer.trainable_parameters())


def test_resume_equals_straight_run(tmp_path):
    inst, cls = images(3, 0), images(2, 1)
    straight = DreamBoothTrainer(tiny_parts(), small_cfg(steps=4), cdl_prompts())
    straight_losses = [h.loss for h in straight.fit(inst, cls)]

    first = DreamBoothTrainer(tiny_parts(), small_cfg(steps=4), cdl_prompts())
    losses = [h.loss for h in first.fit(inst, cls, steps=2)]
    state = first.state_dict()
    resumed = DreamBoothTrainer(tiny_parts(), small_cfg(steps=4), cdl_prompts())
    resumed.load_state_dict(state)
    assert resumed.step == 2
    losses += [h.loss for h in resumed.fit(inst, cls)]
    np.testing.assert_allclose(losses, straight_losses, rtol=1e-5)
    for name in ("unet", "text_encoder"):
        mine, ref = getattr(resumed.parts, name), getattr(straight.parts, name)
        torch.testing.assert_close(flat(mine), flat(ref), rtol=1e-5, atol=1e-6)

    # The same through files: weights as safetensors, the rest read back with weights_only=True.
    first.save_checkpoint(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "text_encoder.safetensors", "trainer_state.pt", "unet.safetensors"
    ]  # fmt: skip
    from_files = DreamBoothTrainer(tiny_parts(), small_cfg(steps=4), cdl_prompts())
    from_files.load_checkpoint(tmp_path / "ckpt")
    from_files.fit(inst, cls)
    torch.testing.assert_close(flat(from_files.parts.unet), flat(straight.parts.unet), rtol=1e-5, atol=1e-6)

    with pytest.raises(ValueError, match="seed"):
        DreamBoothTrainer(tiny_parts(), small_cfg(seed=4), cdl_prompts()).load_state_dict(state)


def test_image_order_is_deterministic_and_cycles():
    # Posterior means, so the picked latents can be matched against the cache exactly.
    trainer = DreamBoothTrainer(tiny_parts(), small_cfg(gradient_checkpointing=False, latents="mean"), cdl_prompts())
    trainer.cache_latents(images(3, 0), images(2, 1))
    inst_lat = trainer._latents[1]
    picked = []
    for step in range(6):
        inst, _, noise, t = trainer.batch(step)
        picked.append(int(torch.nonzero((inst_lat == inst[0]).flatten(1).all(1))[0]))
        again = trainer.batch(step)
        assert torch.equal(noise, again[2]) and torch.equal(t, again[3])
    assert sorted(picked[:3]) == [0, 1, 2] and sorted(picked[3:]) == [0, 1, 2]
    with pytest.raises(ValueError, match="class-prior"):
        trainer.cache_latents(images(1, 0), [])


def test_sampled_latents_are_fresh_each_step_and_reproducible():
    """latents="sample" (the paper's code): mean + std·ε, a new ε each step, the same ε for the same step."""
    trainer = DreamBoothTrainer(tiny_parts(), small_cfg(gradient_checkpointing=False), cdl_prompts())
    assert trainer.cfg.latents == "sample"
    trainer.cache_latents(images(1, 0), images(1, 1))
    mean, _ = trainer.cached_latents()
    first, second, again = trainer.batch(0)[0], trainer.batch(1)[0], trainer.batch(0)[0]
    assert torch.equal(first, again)
    assert not torch.equal(first, second)
    assert not torch.equal(first, mean[:1])
    std = trainer._latents[2]
    assert float(std.min()) > 0  # a real posterior, not a point mass
    assert float((first - mean[:1]).abs().max()) < 10 * float(std.max())


def test_export_loads_in_diffusers_and_generates(tmp_path):
    trainer = DreamBoothTrainer(tiny_parts(), small_cfg(steps=1), cdl_prompts(token="zq"))
    trainer.fit(images(2, 0), images(2, 1))
    out = trainer.export(tmp_path / "identity-0")
    assert list(out.rglob("*.safetensors")) and not list(out.rglob("*.bin"))
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    torch.testing.assert_close(flat(pipe.unet), flat(trainer.parts.unet))
    torch.testing.assert_close(flat(pipe.text_encoder), flat(trainer.parts.text_encoder))
    prompts = trainer.prompts
    image = pipe(
        prompts.sampling_prompt(), negative_prompt=prompts.negative(), height=SIZE, width=SIZE,
        num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np",
    ).images  # fmt: skip
    assert image.shape == (1, SIZE, SIZE, 3) and np.isfinite(image).all()
    assert "zq" in (out / "cdl_prompts.json").read_text()

