"""Stable Diffusion 2.1-base: configs for the `full` and `tiny` presets, builder, loader, registry entry.

The `full` configs are the hub architecture as derived in shared/reference/sd_configs.md; the unit
tests hold them to the reference key/shape manifests exactly. The `tiny` preset keeps every structural
feature the method relies on (cross-attention with linear projections, an f=8 VAE with 4 latent
channels, a CLIP text tower that pads to 77 tokens) at ~1 M parameters, so the whole pipeline runs in
tests on a CPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from raypdm.models.registry import Layouts, ModelSpec, WeightFile, register
from raypdm.models.tokenizer import save_tokenizer, tiny_clip_tokenizer
from raypdm.models.weights import init_on, load_weights_into, module_layout, resolve_weight_file, seeded

# diffusers costs ~4 s to import (its quantizer hooks compile through torch.compile) and transformers' CLIP
# ~2 s: the registry imports this module for `raypdm models list` and every driver's preflight, which need
# only the specs. The libraries are imported where a model is built or loaded.
if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

NAME = "sd21-base"
SEED = 20221207  # SD 2.1 release date; any fixed value works, it only has to never change
TEXT_PREFIX = "text_model."  # on-disk prefix of CLIPTextModel keys (transformers 5 drops it in memory)
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
Device = str | torch.device

SD21_UNET_FULL: dict[str, Any] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(5, 10, 20, 20),  # diffusers' name; it is the number of heads (64 channels each)
    cross_attention_dim=1024,
    use_linear_projection=True,
    upcast_attention=False,
)
SD21_UNET_TINY: dict[str, Any] = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(2, 4),
    cross_attention_dim=32,
    use_linear_projection=True,
    norm_num_groups=16,
)
SD2_VAE_FULL: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
# Four blocks like the real VAE, so the tiny preset keeps the f=8 latent geometry code relies on.
SD2_VAE_TINY: dict[str, Any] = dict(
    SD2_VAE_FULL, block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=64
)
# OpenCLIP ViT-H/14 text tower as a CLIPTextModel, stopped after 23 of 24 layers (SD2's "penultimate").
SD2_TEXT_FULL: dict[str, Any] = dict(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_attention_heads=16,
    num_hidden_layers=23,
    max_position_embeddings=77,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    projection_dim=512,
)
SD2_TEXT_TINY: dict[str, Any] = dict(
    SD2_TEXT_FULL, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, projection_dim=32
)
# The training schedule (v2-inference.yaml). DDPM ignores set_alpha_to_one but from_config keeps it in
# the config, so a DDIM/PNDM sampler made with `Scheduler.from_config(bundle.scheduler.config)` gets it.
SD21_SCHEDULER: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)

_UNET = {"tiny": SD21_UNET_TINY, "full": SD21_UNET_FULL}
_VAE = {"tiny": SD2_VAE_TINY, "full": SD2_VAE_FULL}
_TEXT = {"tiny": SD2_TEXT_TINY, "full": SD2_TEXT_FULL}


def check_preset(preset: str) -> None:
    if preset not in ("tiny", "full"):
        raise ValueError(f"unknown preset {preset!r}; choose 'tiny' or 'full'")


def text_encoder_config(preset: str, tokenizer: CLIPTokenizer | None = None) -> CLIPTextConfig:
    """The tiny tower's vocabulary is the tiny tokenizer's; special ids follow the bundled tokenizer."""
    from transformers import CLIPTextConfig

    check_preset(preset)
    cfg = dict(_TEXT[preset])
    if tokenizer is not None:
        if preset == "tiny":
            cfg["vocab_size"] = len(tokenizer)
        cfg.update(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    else:  # hub ids of the real 49,408-token CLIP vocabulary
        cfg.update(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return CLIPTextConfig(**cfg)


def finish(module: torch.nn.Module, device: torch.device, dtype: torch.dtype | None) -> torch.nn.Module:
    """Move/cast and switch to eval mode. Gradients stay enabled, as from diffusers' `from_pretrained`:
    fine-tuning wants them and attacks freeze what they do not optimise."""
    if device.type != "meta":
        module = module.to(device=device, dtype=dtype) if dtype is not None else module.to(device)
    elif dtype is not None:
        module = module.to(dtype=dtype)
    return module.eval()


def sd_text_stack(preset: str, device: torch.device) -> tuple[CLIPTextModel, CLIPTokenizer]:
    """The SD2 text encoder and tokenizer (shared with the x4 upscaler). Call inside `seeded`.

    No real tokenizer can be built offline, so every preset bundles the tiny byte-level tokenizer;
    its ids are valid for the full 49,408-row embedding, which is all random-weight benchmarks need.
    Real weights come with the real tokenizer through `load`.
    """
    from transformers import CLIPTextModel

    tokenizer = tiny_clip_tokenizer()
    with init_on(device):
        text_encoder = CLIPTextModel(text_encoder_config(preset, tokenizer))
    return text_encoder, tokenizer


def init_device(preset: str, device: torch.device) -> torch.device:
    """Where to run the random init: tiny on CPU (same weights on every device), full on the target."""
    return torch.device("cpu") if preset == "tiny" and device.type != "meta" else device


class PipelineParts:
    """What every model bundle shares: move its modules, save it in the hub's diffusers layout.
    Subclasses are dataclasses of modules/schedulers with a `to_pipeline()`."""

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        for f in fields(self):
            part = getattr(self, f.name)
            if isinstance(part, torch.nn.Module):
                part.to(device=device, dtype=dtype)
        return self

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the hub's diffusers layout (safetensors), loadable with `raypdm.models.load`."""
        path = Path(path)
        self.to_pipeline().save_pretrained(path, safe_serialization=True)
        save_tokenizer(self.tokenizer, path / "tokenizer")
        return path


@dataclass
class StableDiffusionParts(PipelineParts):
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDPMScheduler

    def to_pipeline(self) -> StableDiffusionPipeline:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


def build_random_stack(
    preset: str, device: Device, dtype: torch.dtype | None, seed: int, unet_config: dict, vae_config: dict
) -> dict[str, Any]:
    """UNet, VAE, text encoder and tokenizer with seeded random weights (shared by every SD-family bundle):
    the same preset and seed always give the same weights; `device="meta"` allocates nothing."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    check_preset(preset)
    device = torch.device(device)
    where = init_device(preset, device)
    with seeded(seed, where):
        with init_on(where):
            unet = UNet2DConditionModel(**unet_config)
            vae = AutoencoderKL(**vae_config)
        text_encoder, tokenizer = sd_text_stack(preset, where)
    return {
        "unet": finish(unet, device, dtype),
        "vae": finish(vae, device, dtype),
        "text_encoder": finish(text_encoder, device, dtype),
        "tokenizer": tokenizer,
    }


def build_sd21(preset: str = "tiny", device: Device = "cpu", dtype: torch.dtype | None = None) -> StableDiffusionParts:
    """Random weights, seeded: the same preset always gives the same weights."""
    from diffusers import DDPMScheduler

    check_preset(preset)
    stack = build_random_stack(preset, device, dtype, SEED, _UNET[preset], _VAE[preset])
    return StableDiffusionParts(**stack, scheduler=DDPMScheduler.from_config(SD21_SCHEDULER))


# --------------------------------------------------------------------------- loading real weights


def read_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def load_diffusers_model(cls, path: Path, weights_name: str, default_config: dict[str, Any], device: Device, dtype):
    """A diffusers model from a hub folder (`config.json` + weights) or from a single weight file.

    A single file (e.g. a fine-tuned UNet saved as `unet.safetensors`) is read with the preset's
    config. The skeleton is built without memory and the tensors are assigned strictly.
    """
    import accelerate

    path = Path(path)
    if path.is_file():
        config, weights = default_config, path
    else:
        config = read_config(path)
        weights = resolve_weight_file(path / weights_name)
        if weights is None:
            raise FileNotFoundError(f"no {weights_name} (or pickle fallback) in {path}")
    with accelerate.init_empty_weights():
        model = cls.from_config(config)
    load_weights_into(model, weights)
    return finish(model, torch.device(device), dtype)


def load_text_encoder(path: Path, default_config: CLIPTextConfig, device: Device, dtype) -> CLIPTextModel:
    import accelerate
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    if path.is_file():
        config, weights = default_config, path
    else:
        # from_pretrained (local only) rather than CLIPTextConfig(**json): it upgrades legacy keys.
        config = CLIPTextConfig.from_pretrained(str(path), local_files_only=True)
        weights = resolve_weight_file(path / "model.safetensors")
        if weights is None:
            raise FileNotFoundError(f"no model.safetensors (or pickle fallback) in {path}")
    # Buffers stay real (include_buffers=False): position_ids is non-persistent and never in a file.
    with accelerate.init_empty_weights(include_buffers=False):
        model = CLIPTextModel(config)
    load_weights_into(model, weights)
    return finish(model, torch.device(device), dtype)


def load_tokenizer(folder: Path) -> CLIPTokenizer:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def load_scheduler(cls, folder: Path, defaults: dict[str, Any]):
    """The file's values over the known defaults: the hub's PNDM config may omit keys DDPM needs."""
    return cls.from_config({**defaults, **cls.load_config(str(folder))})


def load_sd21(model_dir: str | Path, device: Device = "cpu", dtype: torch.dtype | None = None) -> StableDiffusionParts:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    d = Path(model_dir)
    return StableDiffusionParts(
        unet=load_diffusers_model(UNet2DConditionModel, d / "unet", DIFFUSERS_WEIGHTS, SD21_UNET_FULL, device, dtype),
        vae=load_diffusers_model(AutoencoderKL, d / "vae", DIFFUSERS_WEIGHTS, SD2_VAE_FULL, device, dtype),
        text_encoder=load_text_encoder(d / "text_encoder", text_encoder_config("full"), device, dtype),
        tokenizer=load_tokenizer(d / "tokenizer"),
        scheduler=load_scheduler(DDPMScheduler, d / "scheduler", SD21_SCHEDULER),
    )


# --------------------------------------------------------------------------- layouts for checks


def meta_layout(kind: str, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """key -> shape of one component built from `config` on the meta device (on-disk key names)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_on(torch.device("meta")):
        if kind == "unet":
            return module_layout(UNet2DConditionModel.from_config(config))
        if kind == "vae":
            return module_layout(AutoencoderKL.from_config(config))
        if kind == "text_encoder":
            return module_layout(CLIPTextModel(CLIPTextConfig.from_dict(config)), prefix=TEXT_PREFIX)
    raise ValueError(f"unknown component {kind!r}")


def layouts_from_configs(model_dir: Path, full: Layouts, kinds: tuple[str, ...]) -> Layouts:
    """Per component: the layout its own config.json implies, else the full preset's."""
    out = dict(full)
    for kind in kinds:
        cfg_path = Path(model_dir) / kind / "config.json"
        if cfg_path.exists():
            try:
                out[kind] = meta_layout(kind, json.loads(cfg_path.read_text(encoding="utf-8")))
            except (ValueError, TypeError, KeyError):
                pass  # the file check reports the broken JSON; keep the full-preset reference
    return out


@lru_cache(maxsize=1)
def sd21_layouts() -> Layouts:
    return {
        "unet": meta_layout("unet", SD21_UNET_FULL),
        "vae": meta_layout("vae", SD2_VAE_FULL),
        "text_encoder": meta_layout("text_encoder", text_encoder_config("full").to_dict()),
    }


def sd21_config_layouts(model_dir: Path) -> Layouts:
    return layouts_from_configs(model_dir, sd21_layouts(), ("unet", "vae", "text_encoder"))


LICENCE_NOTE = "use-based restrictions (the licence's Attachment A) apply; weights are not redistributed here"


def hub_files(weights_sha256: dict[str, str]) -> tuple[WeightFile, ...]:
    """The files of a diffusers SD2-family hub repo that `load` reads (plus model_index.json)."""
    files = [WeightFile("model_index.json", required=False)]
    weight_names = {"unet": DIFFUSERS_WEIGHTS, "vae": DIFFUSERS_WEIGHTS, "text_encoder": "model.safetensors"}
    for kind, weights in weight_names.items():
        files.append(WeightFile(f"{kind}/config.json"))
        files.append(WeightFile(f"{kind}/{weights}", sha256=weights_sha256.get(kind), layout=kind))
    files += [
        WeightFile("tokenizer/vocab.json"),
        WeightFile("tokenizer/merges.txt"),
        WeightFile("tokenizer/tokenizer_config.json"),
        WeightFile("scheduler/scheduler_config.json"),
    ]
    return tuple(files)


SPEC = register(
    ModelSpec(
        name=NAME,
        description="Stable Diffusion 2.1-base (512 px, epsilon): UNet, f=8 VAE, OpenCLIP-H text encoder",
        licence="CreativeML Open RAIL++-M",
        licence_note=LICENCE_NOTE,
        hub_repo="stabilityai/stable-diffusion-2-1-base",
        # Commit "Update model_index.json" (2022-12-20) on main, after the safetensors files were added
        # (e7cda18, #4). Read from the hub's public commit history; a later main head was not checked.
        hub_revision="88bb1a46821197d1ac0cb54d1d09fb6e70b171bc",
        # The UNet hash is the hub file page's LFS pointer (unet/diffusion_pytorch_model.safetensors, last
        # changed in e7cda18). The VAE and text encoder hashes come from independent public download
        # manifests of this repo's diffusers files (three agree, and each lists the UNet hash above too);
        # they are not on an official page, so a mismatch report should be read with that in mind.
        files=hub_files({
            "unet": "6dfae3e5f7d459b50f4b0850ead945972c75bb0e1897628933e169eb43974214",
            "vae": "a1d993488569e928462932c8c38a0760b874d166399b14414135bd9c42df5815",
            "text_encoder": "cce6febb0b6d876ee5eb24af35e27e764eb4f9b1d0b7c026c8c3333d4cfc916c",
        }),
        builder=build_sd21,
        loader=load_sd21,
        layouts=sd21_layouts,
        config_layouts=sd21_config_layouts,
    )
)
