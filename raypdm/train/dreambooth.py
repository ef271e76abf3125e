"""DreamBooth with prior preservation (paper Eq. 2), single process, any device.

    L = E‖ε_θ(z_t(x), t, τ(c_inst)) − y‖² + λ·E‖ε_θ(z_t'(x_pr), t', τ(c_cls)) − y'‖²

where y is the noise (epsilon prediction) or the velocity (v prediction), as the base model's scheduler
says. UNet and (by default) text encoder are fine-tuned, the VAE is frozen, and the fixed images are
encoded once: the posterior's mean and standard deviation are cached, and each step draws
z = mean + std·ε from them (`latents="sample"`, what the paper's code does with `latent_dist.sample()`,
without a VAE pass per step), or uses the mean (`latents="mean"`, deterministic and a little cheaper). Distributed wrappers (Ray Train, DeepSpeed) drive `DreamBoothTrainer.train_step`
and checkpoint through `state_dict()` / `save_checkpoint()`; nothing here knows about them.

    parts = ModelContext(preset="tiny").model("sd21-base", fresh=True)   # raypdm.models.context
    trainer = DreamBoothTrainer(parts, TrainConfig(steps=4, resolution=32), cdl_prompts())
    trainer.fit(instance_images, class_images)
    trainer.export("out/identity-0")   # StableDiffusionPipeline.from_pretrained("out/identity-0")
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field, field_validator

from raypdm.config import StrictModel
from raypdm.train.prompts import CDLPrompts

__all__ = [
    "TrainConfig",
    "DreamBoothTrainer",
    "StepLosses",
    "encode_latents",
    "encode_latent_posteriors",
    "encode_prompts",
    "dreambooth_loss",
    "training_target",
]

StepCallback = Callable[[int, "StepLosses"], None]
WEIGHT_FILES = {"unet": "unet.safetensors", "text_encoder": "text_encoder.safetensors"}
STATE_FILE = "trainer_state.pt"
_RANK_NOISE_OFFSET = 0x9E3779B97F  # per-rank shift of the noise generator's seed (rank 0: none)
_LATENT_STREAM = 3  # seeds the posterior samples apart from the noise and timesteps (streams 0-2)


class TrainConfig(StrictModel):
    """DreamBooth+CDL hyper-parameters; defaults are the paper's (DESIGN.md)."""

    steps: int = Field(1000, ge=1, description="total optimisation steps")
    lr: float = Field(5e-7, gt=0, description="constant learning rate")
    instance_batch_size: int = Field(1, ge=1)
    class_batch_size: int = Field(1, ge=1)
    prior_weight: float = Field(1.0, ge=0, description="λ of Eq. 2")
    train_text_encoder: bool = True
    gradient_checkpointing: bool = True
    mixed_precision: Literal["auto", "no", "bf16"] = Field("auto", description="auto: bf16 on CUDA, no on CPU")
    optimizer: Literal["auto", "adamw", "adamw8bit"] = Field(
        "auto", description="auto: bitsandbytes AdamW8bit when it imports and CUDA is present, else torch AdamW"
    )
    latents: Literal["sample", "mean"] = Field(
        "sample",
        description="sample: a fresh posterior sample of each image's VAE latent every step (the paper's code); "
        "mean: the posterior mean (deterministic, a little cheaper)",
    )
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    weight_decay: float = Field(1e-2, ge=0)
    adam_eps: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; None disables it")
    attention: Literal["sdpa", "xformers"] = "sdpa"
    seed: int = Field(0, ge=0)
    resolution: int = Field(512, ge=8, description="square training size in pixels (a multiple of 8)")
    log_every: int = Field(10, ge=1)

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"resolution: {value} is not a multiple of 8 (the VAE downsamples by 8)")
        return value

    def resolved_mixed_precision(self, device: torch.device) -> str:
        if self.mixed_precision == "auto":
            return "bf16" if device.type == "cuda" else "no"
        return self.mixed_precision

    def resolved_optimizer(self, device: torch.device) -> str:
        if self.optimizer != "auto":
            return self.optimizer
        return "adamw8bit" if device.type == "cuda" and _bitsandbytes_available() else "adamw"


def _bitsandbytes_available() -> bool:
    try:
        import bitsandbytes

        del bitsandbytes  # only whether it imports matters here
    except Exception:  # ImportError, or a broken CUDA setup that bitsandbytes reports at import
        return False
    return True


# --------------------------------------------------------------------------- the pieces of Eq. 2


def _to_square_tensor(image: np.ndarray, size: int) -> torch.Tensor:
    """uint8 HWC RGB -> float CHW in [-1, 1], shorter side resized to `size`, centre-cropped."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 H×W×3 image, got dtype {image.dtype} shape {image.shape}")
    pil = Image.fromarray(image)
    w, h = pil.size
    scale = size / min(w, h)
    rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
    if (rw, rh) != (w, h):
        pil = pil.resize((rw, rh), Image.Resampling.BICUBIC)
    left, top = (rw - size) // 2, (rh - size) // 2
    pil = pil.crop((left, top, left + size, top + size))
    arr = torch.from_numpy(np.asarray(pil, dtype=np.float32).copy())
    return arr.permute(2, 0, 1) / 127.5 - 1.0


@torch.no_grad()
def encode_latent_posteriors(
    vae, images: Sequence[np.ndarray], size: int, batch_size: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE's latent posterior per image, both × scaling_factor, float32 on the VAE's
    device: `mean + std * randn` is distributed as `latent_dist.sample() * scaling_factor`."""
    if len(images) == 0:
        raise ValueError("encode_latents: no images")
    param = next(vae.parameters())
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        chunk = torch.stack([_to_square_tensor(np.asarray(im), size) for im in images[start : start + batch_size]])
        dist = vae.encode(chunk.to(device=param.device, dtype=param.dtype)).latent_dist
        means.append(dist.mean.float() * vae.config.scaling_factor)
        stds.append(dist.std.float() * vae.config.scaling_factor)
    return torch.cat(means), torch.cat(stds)


def encode_latents(vae, images: Sequence[np.ndarray], size: int, batch_size: int = 8) -> torch.Tensor:
    """VAE latents (mean of the latent distribution × scaling_factor), float32 on the VAE's device."""
    return encode_latent_posteriors(vae, images, size, batch_size)[0]


def encode_prompts(text_encoder, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """τ(c): the text encoder's last hidden states over prompts padded to the tokenizer's max length."""
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids.to(next(text_encoder.parameters()).device))[0]


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict: the noise, or the velocity for v-prediction models."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"scheduler prediction_type {kind!r} is not supported; expected 'epsilon' or 'v_prediction'")


def _prompt_list(prompt: str | Sequence[str], n: int, name: str) -> list[str]:
    prompts = [prompt] * n if isinstance(prompt, str) else list(prompt)
    if len(prompts) != n:
        raise ValueError(f"{name}: {len(prompts)} prompts for {n} latents")
    return prompts


def dreambooth_loss(
    unet,
    text_encoder,
    tokenizer,
    scheduler,
    instance_latents: torch.Tensor,
    class_latents: torch.Tensor,
    instance_prompt: str | Sequence[str],
    class_prompt: str | Sequence[str],
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    prior_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 2 on one batch: (total, instance MSE, prior MSE).

    `noise` and `timesteps` cover the instance latents first, then the class latents (one UNet call for
    both halves, as the reference DreamBooth script does). The MSEs are computed in float32.
    """
    n_inst, n_cls = len(instance_latents), len(class_latents)
    latents = torch.cat([instance_latents, class_latents])
    if noise.shape != latents.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != latents shape {tuple(latents.shape)}")
    if timesteps.shape != (len(latents),):
        raise ValueError(f"timesteps shape {tuple(timesteps.shape)} != ({len(latents)},)")
    prompts = _prompt_list(instance_prompt, n_inst, "instance_prompt")
    prompts += _prompt_list(class_prompt, n_cls, "class_prompt")
    hidden = encode_prompts(text_encoder, tokenizer, prompts)
    unet_dtype = next(unet.parameters()).dtype
    noisy = scheduler.add_noise(latents, noise, timesteps)
    pred = unet(noisy.to(unet_dtype), timesteps, encoder_hidden_states=hidden.to(unet_dtype)).sample
    target = training_target(scheduler, latents, noise, timesteps)
    pred, target = pred.float(), target.float()
    instance_mse = F.mse_loss(pred[:n_inst], target[:n_inst])
    prior_mse = F.mse_loss(pred[n_inst:], target[n_inst:])
    return instance_mse + prior_weight * prior_mse, instance_mse, prior_mse


# --------------------------------------------------------------------------- the trainer


class StepLosses(StrictModel):
    """Losses of one optimisation step (plain floats, ready for `ray.train.report`)."""

    step: int
    loss: float
    instance_loss: float
    prior_loss: float
    lr: float


def _fingerprint(images: Sequence[np.ndarray], size: int) -> str:
    h = hashlib.sha256(str(size).encode())
    for im in images:
        arr = np.ascontiguousarray(im)
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _cycle_indices(
    n: int, batch: int, step: int, seed: int, stream: int, rank: int = 0, world_size: int = 1
) -> list[int]:
    """Which images step `step` uses: a fresh seeded permutation per pass over the `n` images.

    A pure function of (seed, step, rank), so a resumed run sees exactly the images a straight run would.
    Data-parallel ranks take consecutive slices of the same permutation (a global batch of
    `world_size * batch`); rank 0 of a world of 1 is the single-process order.
    """
    out = []
    for k in range(batch):
        pos = (step * world_size + rank) * batch + k
        epoch, i = divmod(pos, n)
        g = torch.Generator().manual_seed(seed * 1_000_003 + stream * 7_919 + epoch)
        out.append(int(torch.randperm(n, generator=g)[i]))
    return out


class DreamBoothTrainer:
    """Fine-tunes a `StableDiffusionParts` bundle in place with DreamBooth(+CDL).

    Noise and timesteps of step s are drawn from a generator seeded by (seed, s) on the CPU, so a run
    resumed from `state_dict()` reproduces a straight run, on any device.
    """

    def __init__(
        self,
        parts,
        cfg: TrainConfig | None = None,
        prompts: CDLPrompts | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank} of {world_size}")
        self.parts = parts
        # Data-parallel position: each rank draws its own images, noise and timesteps (see `batch`).
        self.rank, self.world_size = rank, world_size
        self.cfg = cfg or TrainConfig()
        self.prompts = prompts or CDLPrompts()
        self.device = next(parts.unet.parameters()).device
        self.precision = self.cfg.resolved_mixed_precision(self.device)
        self.optimizer_name = self.cfg.resolved_optimizer(self.device)
        self.step = 0
        # (fingerprint, instance mean, instance std, class mean, class std), see `cache_latents`
        self._latents: tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

        unet, text_encoder, vae = parts.unet, parts.text_encoder, parts.vae
        vae.requires_grad_(False).eval()
        unet.requires_grad_(True).train()
        text_encoder.requires_grad_(self.cfg.train_text_encoder)
        text_encoder.train(self.cfg.train_text_encoder)
        if self.cfg.attention == "xformers":
            unet.enable_xformers_memory_efficient_attention()
        else:
            from diffusers.models.attention_processor import AttnProcessor2_0

            unet.set_attn_processor(AttnProcessor2_0())
        if self.cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            if self.cfg.train_text_encoder:
                # transformers 5 renamed it; the old name warns
                enable = getattr(text_encoder, "activation_checkpointing_enable", None)
                (enable or text_encoder.gradient_checkpointing_enable)()
        self.optimizer = self._make_optimizer()

    # -- setup

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        params = list(self.parts.unet.parameters())
        if self.cfg.train_text_encoder:
            params += list(self.parts.text_encoder.parameters())
        return params

    def _make_optimizer(self) -> torch.optim.Optimizer:
        kwargs = dict(
            lr=self.cfg.lr,
            betas=(self.cfg.adam_beta1, self.cfg.adam_beta2),
            weight_decay=self.cfg.weight_decay,
            eps=self.cfg.adam_eps,
        )
        if self.optimizer_name == "adamw8bit":
            try:
                import bitsandbytes as bnb
            except ImportError:
                raise ImportError("optimizer 'adamw8bit' needs bitsandbytes: pip install 'raypdm[gpu]'") from None
            return bnb.optim.AdamW8bit(self.trainable_parameters(), **kwargs)
        return torch.optim.AdamW(self.trainable_parameters(), **kwargs)

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    # -- data

    def cache_latents(self, instance_images: Sequence[np.ndarray], class_images: Sequence[np.ndarray]) -> None:
        """Encode the fixed images once; calling again with the same images costs only a hash."""
        if len(instance_images) == 0 or len(class_images) == 0:
            raise ValueError(
                f"DreamBooth needs instance and class-prior images (got {len(instance_images)} and {len(class_images)})"
            )
        size = self.cfg.resolution
        key = _fingerprint(instance_images, size) + _fingerprint(class_images, size)
        if self._latents is None or self._latents[0] != key:
            vae = self.parts.vae
            inst = encode_latent_posteriors(vae, instance_images, size)
            cls = encode_latent_posteriors(vae, class_images, size)
            self._latents = (key, *inst, *cls)

    def cached_latents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior means of the (instance, class) images: what a deterministic evaluation uses."""
        if self._latents is None:
            raise RuntimeError("call cache_latents(instance_images, class_images) before training")
        return self._latents[1], self._latents[3]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(instance latents, class latents, noise, timesteps) of step `step` on this trainer's rank;
        needs `cache_latents` first. Distinct ranks get distinct images (when there are enough) and noise;
        with `latents="sample"` each step's latents are fresh posterior samples, seeded like the noise."""
        if self._latents is None:
            raise RuntimeError("call cache_latents(instance_images, class_images) before training")
        _, inst_mean, inst_std, cls_mean, cls_std = self._latents
        seed = self.cfg.seed
        r, w = self.rank, self.world_size
        pick_inst = _cycle_indices(len(inst_mean), self.cfg.instance_batch_size, step, seed, 0, r, w)
        pick_cls = _cycle_indices(len(cls_mean), self.cfg.class_batch_size, step, seed, 1, r, w)
        inst, cls = inst_mean[pick_inst], cls_mean[pick_cls]
        if self.cfg.latents == "sample":
            g_lat = torch.Generator().manual_seed(seed * 1_000_003 + _LATENT_STREAM * 7_919 + step + r * _RANK_NOISE_OFFSET)
            eps = torch.randn((len(inst) + len(cls), *inst.shape[1:]), generator=g_lat).to(self.device)
            inst = inst + inst_std[pick_inst] * eps[: len(inst)]
            cls = cls + cls_std[pick_cls] * eps[len(inst) :]
        # Rank 0 keeps the single-process stream; other ranks are offset far past any step count.
        g = torch.Generator().manual_seed(seed * 1_000_003 + 2 * 7_919 + step + r * _RANK_NOISE_OFFSET)
        shape = (len(inst) + len(cls), *inst.shape[1:])
        noise = torch.randn(shape, generator=g).to(self.device)
        timesteps = torch.randint(0, self.parts.scheduler.config.num_train_timesteps, (shape[0],), generator=g)
        return inst, cls, noise, timesteps.to(self.device)

    # -- training

    def apply_gradients(self, total: torch.Tensor) -> None:
        """Backward, clip, optimizer step: shared by `train_step` and the DDP wrapper in distributed.py."""
        if not torch.isfinite(total):
            raise FloatingPointError(f"step {self.step}: loss is {total.item()} (lr {self.cfg.lr}, {self.precision})")
        total.backward()
        if self.cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def train_step(self) -> StepLosses:
        """One optimisation step at `self.step`, then `self.step += 1`."""
        inst, cls, noise, timesteps = self.batch(self.step)
        p = self.parts
        with self._autocast():
            total, inst_mse, prior_mse = dreambooth_loss(
                p.unet, p.text_encoder, p.tokenizer, p.scheduler, inst, cls,
                self.prompts.instance_prompt(), self.prompts.class_prompt(),
                noise, timesteps, self.cfg.prior_weight,
            )  # fmt: skip
        self.apply_gradients(total)
        losses = StepLosses(
            step=self.step,
            loss=total.item(),
            instance_loss=inst_mse.item(),
            prior_loss=prior_mse.item(),
            lr=self.optimizer.param_groups[0]["lr"],
        )
        self.step += 1
        return losses

    def fit(
        self,
        instance_images: Sequence[np.ndarray],
        class_images: Sequence[np.ndarray],
        steps: int | None = None,
        start_step: int | None = None,
        on_step: StepCallback | None = None,
    ) -> list[StepLosses]:
        """Train until step `steps` (total, default `cfg.steps`), from `start_step` (default: where the
        trainer is, 0 when fresh, the restored step after `load_state_dict`). `on_step(step, losses)` is
        called after every step; the returned list holds the losses of the steps this call ran."""
        total = self.cfg.steps if steps is None else steps
        if start_step is not None:
            if start_step < 0:
                raise ValueError(f"start_step must be >= 0, got {start_step}")
            self.step = start_step
        self.cache_latents(instance_images, class_images)
        history = []
        while self.step < total:
            losses = self.train_step()
            history.append(losses)
            if on_step is not None:
                on_step(losses.step, losses)
        return history

    # -- checkpoints

    def state_dict(self) -> dict:
        """Everything a resume needs. The text encoder is included only when it is trained."""
        state = {
            "unet": self.parts.unet.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "seed": self.cfg.seed,
            "rng": torch.get_rng_state(),  # only dropout would draw from it; noise uses per-step generators
        }
        if self.cfg.train_text_encoder:
            state["text_encoder"] = self.parts.text_encoder.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.cfg.seed:
            raise ValueError(f"checkpoint was trained with seed {state['seed']}, this trainer has seed {self.cfg.seed}")
        if self.cfg.train_text_encoder and "text_encoder" not in state:
            raise ValueError("checkpoint has no text_encoder weights but train_text_encoder is on")
        self.parts.unet.load_state_dict(state["unet"])
        if "text_encoder" in state:
            self.parts.text_encoder.load_state_dict(state["text_encoder"])
        # A copy: torch's load keeps same-device tensors by reference, so two trainers would share moments.
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.step = int(state["step"])
        torch.set_rng_state(state["rng"])

    def save_checkpoint(self, directory: str | Path) -> Path:
        """Weights as safetensors, optimizer/step/RNG as a tensors-only pickle (read with weights_only)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        for part, filename in WEIGHT_FILES.items():
            if part in state:
                weights = {k: v.detach().contiguous() for k, v in state.pop(part).items()}
                save_file(weights, str(directory / filename))
        torch.save(state, directory / STATE_FILE)
        return directory

    def load_checkpoint(self, directory: str | Path) -> None:
        from safetensors.torch import load_file

        directory = Path(directory)
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
        for part, filename in WEIGHT_FILES.items():
            if (directory / filename).exists():
                state[part] = load_file(str(directory / filename), device=str(self.device))
        self.load_state_dict(state)

    # -- export

    def export(self, directory: str | Path) -> Path:
        """A diffusers pipeline directory (safetensors) that `StableDiffusionPipeline.from_pretrained`
        loads, plus `cdl_prompts.json` so sampling knows the identifier and noise token."""
        directory = self.parts.save_pretrained(directory)
        info = {"prompts": self.prompts.model_dump(), "step": self.step, "train": self.cfg.model_dump()}
        (directory / "cdl_prompts.json").write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
        return directory

