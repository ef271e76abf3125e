"""Stable Diffusion x4 upscaler (the "SR" of CodeSR): presets, builder, loader, registry entry.

The UNet sees 7 channels (4 latent + the noised 3-channel low-res image), takes the noise level as a
class label (1000 embeddings) and has self-attention only at its deepest level (`only_cross_attention`);
the VAE has 3 blocks (f=4), 4 latent channels and scaling factor 0.08333. See sd_configs.md sections 4-5.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from raypdm.models.registry import Layouts, ModelSpec, WeightFile, register
from raypdm.models.stable_diffusion import (
    DIFFUSERS_WEIGHTS,
    LICENCE_NOTE,
    Device,
    PipelineParts,
    build_random_stack,
    check_preset,
    hub_files,
    layouts_from_configs,
    load_diffusers_model,
    load_scheduler,
    load_text_encoder,
    load_tokenizer,
    meta_layout,
    text_encoder_config,
)

# diffusers and transformers are imported where a model is built or loaded (see stable_diffusion.py).
if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionUpscalePipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

NAME = "sd-x4-upscaler"
SEED = 20221124  # x4 upscaler release date; fixed so tiny weights never change

X4_UNET_FULL: dict[str, Any] = dict(
    sample_size=128,  # not weight-relevant; hub value unverified (sd_configs.md §4)
    in_channels=7,
    out_channels=4,
    block_out_channels=(256, 512, 512, 1024),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=8,  # = 8 heads (diffusers naming)
    only_cross_attention=(True, True, True, False),
    num_class_embeds=1000,
    cross_attention_dim=1024,
    use_linear_projection=True,
)
# Tiny: the x4 UNet runs at the low-res size (128x128 for a 512 output), so even a small model is costly
# on a CPU. Channels are kept minimal and every attention has one head: several 4-dim heads cost as
# much as the convolutions in CPU SDPA. Measured: ~0.12 s per 512 output per step on 2 cores.
X4_UNET_TINY: dict[str, Any] = dict(
    X4_UNET_FULL,
    sample_size=16,
    block_out_channels=(16, 16, 32),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=1,
    only_cross_attention=(True, True, False),  # keeps one cross-only level and one self-attention level
    cross_attention_dim=32,
    norm_num_groups=8,
)
X4_VAE_FULL: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512),
    layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    norm_num_groups=32,
    sample_size=256,
    scaling_factor=0.08333,  # the pipeline forces this value anyway
)
# No mid-block attention in the tiny VAE: at a 128x128 latent (512 px out) it would be a 16384-token
# self-attention, seconds per image on a CPU, for a random-weight model that only has to be shaped right.
X4_VAE_TINY: dict[str, Any] = dict(
    X4_VAE_FULL, block_out_channels=(8, 8, 16), layers_per_block=1, norm_num_groups=8, sample_size=64,
    mid_block_add_attention=False,
)
# Main sampler. x4-upscaling.yaml fixes v-prediction and the ldm "linear" schedule (= diffusers
# scaled_linear) 1e-4 -> 0.02 over 1000 steps. The hub's scheduler_config.json could not be read here;
# diffusers' converter loads a DDIMScheduler from it, so DDIM with the usual SD offsets is assumed.
# `load` always uses the file's class and values.
X4_SCHEDULER: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="scaled_linear",
    prediction_type="v_prediction",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)
# Noise added to the low-res image (hard-coded in diffusers' single_file_utils; matches ldm's
# ImageConcatWithNoiseAugmentation to 1.7e-7 in alphas_cumprod).
X4_LOW_RES_SCHEDULER: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="scaled_linear",
    clip_sample=True,
    prediction_type="epsilon",
    variance_type="fixed_small",
)
MAX_NOISE_LEVEL = 350

_UNET = {"tiny": X4_UNET_TINY, "full": X4_UNET_FULL}
_VAE = {"tiny": X4_VAE_TINY, "full": X4_VAE_FULL}


@dataclass
class UpscalerParts(PipelineParts):
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: Any  # a KarrasDiffusionSchedulers member (DDIM by default)
    low_res_scheduler: DDPMScheduler

    def to_pipeline(self) -> StableDiffusionUpscalePipeline:
        from diffusers import StableDiffusionUpscalePipeline

        return StableDiffusionUpscalePipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            low_res_scheduler=self.low_res_scheduler,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            watermarker=None,
            max_noise_level=MAX_NOISE_LEVEL,
        )


def build_x4(preset: str = "tiny", device: Device = "cpu", dtype: torch.dtype | None = None) -> UpscalerParts:
    from diffusers import DDIMScheduler, DDPMScheduler

    check_preset(preset)
    stack = build_random_stack(preset, device, dtype, SEED, _UNET[preset], _VAE[preset])
    return UpscalerParts(
        **stack,
        scheduler=DDIMScheduler.from_config(X4_SCHEDULER),
        low_res_scheduler=DDPMScheduler.from_config(X4_LOW_RES_SCHEDULER),
    )


def _scheduler_class(folder: Path):
    """The class the hub config names, when diffusers has it; DDIM otherwise."""
    import diffusers
    from diffusers import DDIMScheduler

    name = DDIMScheduler.load_config(str(folder)).get("_class_name", "DDIMScheduler")
    cls = getattr(diffusers, str(name), None)
    return cls if isinstance(cls, type) and hasattr(cls, "from_config") else DDIMScheduler


def load_x4(model_dir: str | Path, device: Device = "cpu", dtype: torch.dtype | None = None) -> UpscalerParts:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    d = Path(model_dir)
    return UpscalerParts(
        unet=load_diffusers_model(UNet2DConditionModel, d / "unet", DIFFUSERS_WEIGHTS, X4_UNET_FULL, device, dtype),
        vae=load_diffusers_model(AutoencoderKL, d / "vae", DIFFUSERS_WEIGHTS, X4_VAE_FULL, device, dtype),
        text_encoder=load_text_encoder(d / "text_encoder", text_encoder_config("full"), device, dtype),
        tokenizer=load_tokenizer(d / "tokenizer"),
        scheduler=load_scheduler(_scheduler_class(d / "scheduler"), d / "scheduler", X4_SCHEDULER),
        low_res_scheduler=load_scheduler(DDPMScheduler, d / "low_res_scheduler", X4_LOW_RES_SCHEDULER),
    )


@lru_cache(maxsize=1)
def x4_layouts() -> Layouts:
    return {
        "unet": meta_layout("unet", X4_UNET_FULL),
        "vae": meta_layout("vae", X4_VAE_FULL),
        "text_encoder": meta_layout("text_encoder", text_encoder_config("full").to_dict()),
    }


def x4_config_layouts(model_dir: Path) -> Layouts:
    return layouts_from_configs(model_dir, x4_layouts(), ("unet", "vae", "text_encoder"))


SPEC = register(
    ModelSpec(
        name=NAME,
        description="Stable Diffusion x4 upscaler (v-prediction, noise-level conditioning, f=4 VAE)",
        licence="CreativeML Open RAIL++-M",
        licence_note=LICENCE_NOTE,
        hub_repo="stabilityai/stable-diffusion-x4-upscaler",
        # Commit "Update vae/config.json (#9)" (2023-04-24) on main: it sets the VAE scaling_factor and
        # comes after the safetensors files (a44206c, #3). Read from the hub's public commit list.
        hub_revision="c1d3e4830bb80da091d1d94354d8852fab670b4b",
        # No sha256 is pinned: none of the files' hashes could be read from an official page here
        # (only from third-party duplicates of the repo, which are not an authority).
        files=hub_files({}) + (WeightFile("low_res_scheduler/scheduler_config.json"),),
        builder=build_x4,
        loader=load_x4,
        layouts=x4_layouts,
        config_layouts=x4_config_layouts,
    )
)
