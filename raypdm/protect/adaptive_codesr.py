"""Adaptive attack against CodeSR (the paper's §5.3): AdvDM through the purifier.

The defender purifies every published photo with CodeSR = CodeFormer → SD x4 super-resolution before
fine-tuning, so a protection that knows this maximises the denoising loss of the *purified* image:

    max_{‖δ‖∞ ≤ r}  E_{t, ε, ξ} ‖ε_θ(z_t(E(P_ξ(x + δ))), t, τ(c)) − y‖²,    P = SR ∘ CodeFormer

with the AdvDM objective of ``advdm.py`` (frozen SD 2.1-base) and P the two purifiers of
``raypdm.purify.codeformer`` / ``raypdm.purify.sr`` re-implemented as differentiable functions with
the same recipe: CodeFormer on the whole image resized to 512 (bilinear), fidelity w = 0.5, AdaIN,
resized back; then a resize to ``sr_low_res``² (bicubic, antialiased), the x4 upscaler's
classifier-free-guided sampling trajectory (prompt "a photo of a person", guidance 9, noise level
20), and a resize back to the input size. Default radius 16/255 (the paper's adaptive setting).
ξ, the upscaler's starting latents and low-res noise, is drawn fresh every PGD step from the image's
generator (expectation over transformation); ``loss_before``/``loss_after`` use one fixed draw.

What is exact and what is approximated (BPDA, Athalye et al. 2018):
- Exact gradients: every resize, CodeFormer's encoder, transformer, AdaIN and generator including the
  fuse (skip) blocks (the model's own forward detaches the skip features, a training-time choice that
  does not change the forward value; here they are not detached), the clamp, the SR text/low-res
  conditioning, every UNet call of the SR sampler, the DDIM updates and the SR VAE decoder, and the
  AdvDM loss.
- Straight-through (the only non-differentiable step): CodeFormer's code choice ``argmax`` + codebook
  lookup. The forward pass uses the hard codes, exactly as the purifier; the backward pass uses the
  gradient of the softmax(logits / ``st_temperature``)-weighted average of the codebook entries.
- Not modelled: the purifier rounds to 8 bits between CodeFormer and SR and at the end (identity in
  both passes here); the SR sampler runs ``sr_steps`` DDIM steps (default 4) instead of the purifier's
  75 (the paper's skip-step speed-up); the attack always samples with DDIM (η = 0) from the upscaler's
  scheduler config, whatever sampler class the weights folder names.
- Memory: each SR step and CodeFormer are gradient-checkpointed (``gradient_checkpointing``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch.utils.checkpoint import checkpoint

from raypdm.protect.advdm import AdvDMOptions, DenoisingObjective
from raypdm.protect.base import ProtectContext, register_protection
from raypdm.protect.diffusion import load_model, prompt_embeddings, randn_per_sample, resize
from raypdm.protect.pgd import PGDImageProtection, generators_for

__all__ = ["AdaptiveCodeSR", "AdaptiveCodeSROptions", "codeformer_straight_through"]


class AdaptiveCodeSROptions(AdvDMOptions, frozen=True):
    radius: float = Field(16 / 255, gt=0, le=1, description="ℓ∞ radius (the paper's adaptive attack: 16/255)")
    fidelity_weight: float = Field(0.5, ge=0.0, le=1.0, description="CodeFormer w (as the codeformer purifier)")
    adain: bool = Field(True, description="CodeFormer AdaIN (as the codeformer purifier)")
    st_temperature: float = Field(1.0, gt=0.0, description="softmax temperature of the straight-through codes")
    sr_prompt: str = Field("a photo of a person", description="the x4 upscaler's prompt (as the sr purifier)")
    sr_guidance_scale: float = Field(9.0, ge=1.0, description="the upscaler's CFG scale (as the sr purifier)")
    sr_noise_level: int = Field(20, ge=0, le=350, description="low-res noise level (as the sr purifier)")
    sr_steps: int = Field(4, ge=1, le=1000, description="DDIM steps of the differentiated upscaler trajectory")
    sr_low_res: int = Field(128, ge=8, le=1024, description="side of the low-resolution bottleneck")
    keep_input_size: bool = Field(True, description="resize the x4 output back to the input size (as the purifier)")
    gradient_checkpointing: bool = Field(True, description="recompute CodeFormer and each SR step in the backward")


class _StraightThrough(torch.autograd.Function):
    """Forward: the hard codes, bit for bit (same memory layout, so the convolutions after it round
    exactly as in the purifier); backward: the incoming gradient goes to the soft codes."""

    @staticmethod
    def forward(ctx, hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        return hard.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, grad


def codeformer_straight_through(net, x: torch.Tensor, w: float, adain: bool, temperature: float = 1.0) -> torch.Tensor:
    """CodeFormer's forward (``CodeFormer.forward``, unclamped output) with a straight-through code
    lookup and undetached skip features. x: (B, 3, S, S) in [−1, 1]."""
    from raypdm.models.codeformer import adaptive_instance_normalization

    cfg = net.config
    logits, lq_feat, enc_feats = net.predict_codes(x)
    hard = net.quantize.lookup(logits.argmax(dim=-1), cfg.latent_side).to(lq_feat.dtype)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, HW, K)
    soft = (probs @ net.quantize.embedding.weight.float()).transpose(1, 2)
    soft = soft.reshape(len(x), -1, cfg.latent_side, cfg.latent_side).to(lq_feat.dtype)
    quant = _StraightThrough.apply(hard, soft)
    if adain:
        quant = adaptive_instance_normalization(quant, lq_feat)
    fuse_at = {net.generator.fuse_index[r]: r for r in cfg.connect_list} if w > 0 else {}
    h = quant
    for i, block in enumerate(net.generator.blocks):
        h = block(h)
        if i in fuse_at:
            res = fuse_at[i]
            h = net.fuse_convs_dict[res](enc_feats[res], h, w)
    return h


@register_protection("adaptive_codesr", AdaptiveCodeSROptions)
class AdaptiveCodeSR(PGDImageProtection):
    name = "adaptive_codesr"
    weight_models = ("sd21-base", "codeformer", "sd-x4-upscaler")

    def __init__(self, options: AdaptiveCodeSROptions | None = None, context: ProtectContext | None = None):
        self.options = options or AdaptiveCodeSROptions()
        self.context = context or ProtectContext()
        self.device = torch.device(self.context.device)
        self.sd = load_model("sd21-base", self.context, self.device)
        self.loss = DenoisingObjective(self.sd, self.options)
        self.codeformer = self._load_codeformer().requires_grad_(False).eval()
        self.x4 = load_model("sd-x4-upscaler", self.context, self.device)
        self.sr_cond = prompt_embeddings(self.x4, self.options.sr_prompt)
        self.sr_uncond = prompt_embeddings(self.x4, "") if self.options.sr_guidance_scale != 1.0 else None

    def _load_codeformer(self):
        return self.context.model("codeformer", device=self.device, dtype=torch.float32)

    # ------------------------------------------------------------------------------ the purifier

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        """CodeFormer "whole" mode, differentiable: (B, 3, H, W) in [0, 1] -> same size, [0, 1]."""
        o = self.options
        size = self.codeformer.config.img_size
        inp = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False) * 2.0 - 1.0

        def run(t: torch.Tensor) -> torch.Tensor:
            return codeformer_straight_through(self.codeformer, t, o.fidelity_weight, o.adain, o.st_temperature)

        if o.gradient_checkpointing and torch.is_grad_enabled():
            out = checkpoint(run, inp, use_reentrant=False)
        else:
            out = run(inp)
        out = (out.float().clamp(-1.0, 1.0) + 1.0) / 2.0
        return F.interpolate(out, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)

    def upscale(self, x: torch.Tensor, generators) -> torch.Tensor:
        """The x4 upscaler's CFG sampling trajectory, differentiable: (B, 3, H, W) in [0, 1] ->
        (B, 3, 4·low_res, 4·low_res), or the input size with ``keep_input_size``."""
        from diffusers import DDIMScheduler

        o, parts = self.options, self.x4
        low = resize(x, (o.sr_low_res, o.sr_low_res), mode="bicubic").clamp(0.0, 1.0) * 2.0 - 1.0
        b = len(x)
        level = torch.full((b,), o.sr_noise_level, dtype=torch.long, device=x.device)
        low = parts.low_res_scheduler.add_noise(low, randn_per_sample(generators, low.shape[1:], x.device), level)
        sched = DDIMScheduler.from_config(parts.scheduler.config)
        sched.set_timesteps(o.sr_steps, device=x.device)
        shape = (parts.vae.config.latent_channels, o.sr_low_res, o.sr_low_res)
        latents = randn_per_sample(generators, shape, x.device) * sched.init_noise_sigma
        guided = self.sr_uncond is not None
        cond = self.sr_cond.expand(b, -1, -1)
        hidden = torch.cat([self.sr_uncond.expand(b, -1, -1), cond]) if guided else cond
        cond_image = torch.cat([low, low]) if guided else low
        labels = torch.cat([level, level]) if guided else level

        def one_step(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            inp = torch.cat([z, z]) if guided else z
            inp = torch.cat([sched.scale_model_input(inp, t), cond_image], dim=1)
            eps = parts.unet(inp, t, encoder_hidden_states=hidden, class_labels=labels).sample.float()
            if guided:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + o.sr_guidance_scale * (eps_c - eps_u)
            return sched.step(eps, t, z, eta=0.0).prev_sample

        for t in sched.timesteps:
            if o.gradient_checkpointing and torch.is_grad_enabled():
                latents = checkpoint(one_step, latents, t, use_reentrant=False)
            else:
                latents = one_step(latents, t)
        up = parts.vae.decode(latents / parts.vae.config.scaling_factor).sample.float()
        up = (up.clamp(-1.0, 1.0) + 1.0) / 2.0
        if o.keep_input_size:
            up = resize(up, tuple(x.shape[-2:]), mode="bicubic").clamp(0.0, 1.0)
        return up

    def purify(self, x: torch.Tensor, generators) -> torch.Tensor:
        """P_ξ(x) = SR(CodeFormer(x)) with the upscaler's noise ξ from ``generators``."""
        return self.upscale(self.restore(x), generators)

    # ------------------------------------------------------------------------------ the objective

    def objectives(self, x, seeds):
        o = self.options
        ascent_gens = generators_for(seeds, self.ASCENT_STREAM)

        def loss(x_adv, gens, samples):
            # One generator list per image feeds, in order, the upscaler's noise and the AdvDM draws.
            return self.loss(self.purify(x_adv, gens), gens, samples)

        def evaluate(x_adv):
            return loss(x_adv, generators_for(seeds, self.EVAL_STREAM), o.eval_timesteps)

        def ascent(x_adv):
            return loss(x_adv, ascent_gens, o.timesteps_per_step) if o.resample else evaluate(x_adv)

        return ascent, evaluate
