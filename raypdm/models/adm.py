"""ADM (guided-diffusion) 256x256 unconditional ImageNet UNet, re-implemented so the released checkpoint loads.

Source: Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis" (2021), code openai/guided-diffusion
(MIT, commit 22e0df8), ``unet.py``/``nn.py`` with the README flags of the "256x256 model (unconditional)":
``--attention_resolutions 32,16,8 --class_cond False --image_size 256 --learn_sigma True --num_channels 256
--num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True``.
The pixel-space purifiers (DiffPure, GrIDPure, diffusion denoised smoothing) all use this checkpoint,
``256x256_diffusion_uncond.pt``: a plain state dict of 566 fp32 tensors, 552,814,086 parameters, no buffers
(layout in ``tests/reference/adm256_uncond_state_dict.json``). Module names, order and shapes here match it, so
it loads with ``strict=True``.

What a re-implementation must get right (all followed here, see shared/reference/adm_notes.md):
- timestep embedding ``[cos, sin]`` (cos first), 4x width MLP;
- ResBlock scale-shift norm: ``chunk(emb, 2)`` gives **scale first**, ``GN(h) * (1 + scale) + shift``;
  up/down ResBlocks (nearest x2 / avg-pool 2) carry no resampling convs; 1x1 skip conv only when widths differ;
- attention ``qkv``/``proj_out`` are **Conv1d** (kernel 1, weights ``[out, in, 1]``) and the 3C qkv channels
  are split per head in the **legacy order** ``(heads, [q|k|v] x head_channels)``;
- GroupNorm (32 groups, eps 1e-5) always computes in fp32;
- fp16: the checkpoint is fp32 and upstream converts the torso (Conv1d/Conv2d weights and biases inside
  ``input_blocks``, ``middle_block``, ``output_blocks``) *after* loading; ``time_embed``, ``emb_layers``,
  norms and ``out`` stay fp32. :meth:`ADMUNet.convert_torso` does exactly that.

Deliberate differences from upstream (none changes the state-dict layout):
- only the variant the checkpoint uses is implemented (scale-shift norm, ResBlock up/down, no class
  embedding, no gradient checkpointing); ``forward(x, timesteps)`` has no ``y`` argument;
- attention runs through ``torch.nn.functional.scaled_dot_product_attention`` on the legacy-ordered q, k, v;
  upstream scales q and k by ``ch**-0.25`` each and runs the softmax in fp32: the same product up to rounding;
- ``norm_groups`` is configurable (upstream hard-codes 32) so the ``tiny`` preset can be thin;
- random-weight builds (:func:`build_adm`) re-initialise upstream's zero-initialised output convs with small
  random values, so a random model predicts non-zero noise and tests exercise the whole sampler. Loaded weights
  are untouched.

Weights licence: the code is MIT; the checkpoint ships without its own licence, and the model card says
"research purposes only", trained on ILSVRC-2012 ImageNet. Treat it as research-only. Not redistributed here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raypdm.models.registry import Layouts, ModelSpec, WeightFile, register
from raypdm.models.weights import MissingWeightsError, init_on, module_layout, read_state_dict, seeded

__all__ = [
    "ADM_FILENAME",
    "ADM_URL",
    "NAME",
    "PRESETS",
    "SPEC",
    "ADMConfig",
    "ADMUNet",
    "adm_config",
    "adm_layout",
    "adm_weight_path",
    "build_adm",
    "load_adm",
    "load_adm_dir",
    "timestep_embedding",
]

NAME = "adm256-uncond"
ADM_FILENAME = "256x256_diffusion_uncond.pt"
ADM_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt"
SEED = 20210511  # arXiv date of "Diffusion Models Beat GANs"; only has to never change


# --------------------------------------------------------------------------------------------------
# Config and presets
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ADMConfig:
    """The UNet's sizes. ``full()`` is the released 256x256 unconditional model."""

    image_size: int = 256
    in_channels: int = 3
    model_channels: int = 256
    # 6 = eps (3) + the learned-range variance interpolation value v (3), "learn_sigma".
    out_channels: int = 6
    num_res_blocks: int = 2
    # Feature-map sides with self-attention, as the upstream flag ("32,16,8"): downsample factor ds = image_size // r.
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    num_head_channels: int = 64
    dropout: float = 0.0
    norm_groups: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "attention_resolutions", tuple(int(r) for r in self.attention_resolutions))
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        down = 2 ** (len(self.channel_mult) - 1)
        if self.image_size % down:
            raise ValueError(f"image_size={self.image_size} is not divisible by 2**(len(channel_mult)-1)={down}")
        for r in self.attention_resolutions:
            if r <= 0 or self.image_size % r:
                raise ValueError(f"attention_resolutions entry {r} does not divide image_size={self.image_size}")
        for ch in {self.model_channels * m for m in self.channel_mult}:
            if ch % self.norm_groups:
                raise ValueError(f"channel count {ch} is not divisible by norm_groups={self.norm_groups}")
            if ch % self.num_head_channels:
                raise ValueError(f"channel count {ch} is not divisible by num_head_channels={self.num_head_channels}")

    @property
    def attention_ds(self) -> frozenset[int]:
        return frozenset(self.image_size // r for r in self.attention_resolutions)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def full(cls) -> ADMConfig:
        return cls()

    @classmethod
    def tiny(cls) -> ADMConfig:
        """Random-weight model for tests and demos: every block type of ``full`` (1x1 skip convs, up/down
        ResBlocks, two-head legacy attention, learned-sigma output) at 32x32 with 16-32 channels (0.35 M
        parameters, ~10 ms per image on one CPU thread; 64x64 costs 2-6x more for no extra coverage)."""
        return cls(
            image_size=32,
            model_channels=16,
            num_res_blocks=1,
            attention_resolutions=(8,),
            channel_mult=(1, 2, 2),
            num_head_channels=16,
            norm_groups=8,
        )


PRESETS: dict[str, Callable[[], ADMConfig]] = {"tiny": ADMConfig.tiny, "full": ADMConfig.full}


def adm_config(preset: str = "full", **overrides) -> ADMConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown ADM preset {preset!r}; choose from {sorted(PRESETS)}")
    cfg = PRESETS[preset]()
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


# --------------------------------------------------------------------------------------------------
# Building blocks (names match guided-diffusion's unet.py so state-dict keys line up)
# --------------------------------------------------------------------------------------------------
def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``[cos(t f), sin(t f)]`` (cos first, as upstream), f_i = max_period**(-i/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 and cast back (upstream ``GroupNorm32``): fp16 statistics overflow."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).type(x.dtype)


class Upsample(nn.Module):
    """Nearest-neighbour x2, no conv (ResBlock ``up`` path)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=2, mode="nearest")


class Downsample(nn.Module):
    """2x2 average pooling, no conv (ResBlock ``down`` path)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that hands the timestep embedding to the children that take one."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int, dropout: float = 0.0,
                 up: bool = False, down: bool = False):
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        resample: type[nn.Module] = Upsample if up else Downsample if down else nn.Identity
        self.h_upd, self.x_upd = resample(), resample()
        # Scale-shift norm: the embedding gives a scale and a shift per output channel.
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, out_channels), nn.SiLU(), nn.Dropout(p=dropout),
            _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.updown:
            # Resample between the activation and the conv (upstream order), and resample the skip path too.
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        scale, shift = torch.chunk(emb_out, 2, dim=1)  # scale first: the checkpoint was trained this way
        h = self.out_layers[0](h) * (1 + scale) + shift
        h = self.out_layers[1:](h)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over all positions with Conv1d projections and the legacy per-head q|k|v channel order."""

    def __init__(self, channels: int, num_head_channels: int, groups: int):
        super().__init__()
        self.num_heads = channels // num_head_channels
        self.norm = GroupNorm32(groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))  # (b, 3c, L)
        length = qkv.shape[-1]
        ch = c // self.num_heads
        # Legacy order (QKVAttentionLegacy): per head, a block of 3*ch channels [q | k | v].
        q, k, v = qkv.reshape(b * self.num_heads, 3 * ch, length).split(ch, dim=1)
        # SDPA's default scale 1/sqrt(ch) equals upstream's ch**-0.25 on q and on k.
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        h = self.proj_out(a.transpose(1, 2).reshape(b, c, length))
        return (x + h).reshape(b, c, *spatial)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    module._adm_zero_init = True  # marks the layers build_adm re-initialises for random models
    return module


# --------------------------------------------------------------------------------------------------
# The UNet
# --------------------------------------------------------------------------------------------------
class ADMUNet(nn.Module):
    """``forward(x, timesteps) -> (N, out_channels, H, W)``: x in [-1, 1], timesteps in original-schedule
    steps (0..999, int or float). For the released model, channels ``[:3]`` are eps and ``[3:]`` the
    learned-range variance value v in [-1, 1]. H and W must be divisible by 2**(levels-1)."""

    def __init__(self, config: ADMConfig | None = None):
        super().__init__()
        cfg = self.config = config or ADMConfig.full()
        mc, g, temb = cfg.model_channels, cfg.norm_groups, cfg.time_embed_dim
        # The torso dtype: convert_torso() changes it; inputs are cast to it and the result cast back.
        self.torso_dtype = torch.float32
        self.time_embed = nn.Sequential(nn.Linear(mc, temb), nn.SiLU(), nn.Linear(temb, temb))

        ch = int(cfg.channel_mult[0] * mc)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skip_chans = [ch]
        ds = 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, temb, int(mult * mc), g, cfg.dropout)]
                ch = int(mult * mc)
                if ds in cfg.attention_ds:
                    layers.append(AttentionBlock(ch, cfg.num_head_channels, g))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(ResBlock(ch, temb, ch, g, cfg.dropout, down=True)))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, temb, ch, g, cfg.dropout),
            AttentionBlock(ch, cfg.num_head_channels, g),
            ResBlock(ch, temb, ch, g, cfg.dropout),
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chans.pop(), temb, int(mc * mult), g, cfg.dropout)]
                ch = int(mc * mult)
                if ds in cfg.attention_ds:
                    layers.append(AttentionBlock(ch, cfg.num_head_channels, g))
                if level and i == cfg.num_res_blocks:
                    layers.append(ResBlock(ch, temb, ch, g, cfg.dropout, up=True))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            GroupNorm32(g, ch), nn.SiLU(), _zero(nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        )

    def torso_modules(self) -> list[nn.Module]:
        """The Conv1d/Conv2d layers upstream's ``convert_to_fp16`` halves (everything else stays fp32)."""
        return [m for part in (self.input_blocks, self.middle_block, self.output_blocks)
                for m in part.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]

    def convert_torso(self, dtype: torch.dtype) -> ADMUNet:
        """Upstream ``convert_to_fp16`` (any dtype): call *after* loading weights, as DiffPure/GrIDPure do."""
        for m in self.torso_modules():
            m.to(dtype=dtype)
        self.torso_dtype = dtype
        return self

    def forward(self, x: Tensor, timesteps: Tensor) -> Tensor:
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels))
        skips = []
        h = x.type(self.torso_dtype)
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)  # h first, then the skip
        return self.out(h.type(x.dtype))


# --------------------------------------------------------------------------------------------------
# Build, load, register
# --------------------------------------------------------------------------------------------------
def _set_torso_dtype(model: ADMUNet, device: torch.device, dtype: torch.dtype | None) -> ADMUNet:
    model = model.to(device=device)
    dtype = dtype or torch.float32
    if dtype != torch.float32:
        model.convert_torso(dtype)
    return model.eval()


def build_adm(
    preset: str | ADMConfig = "tiny",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.float32,
    seed: int | None = SEED,
) -> ADMUNet:
    """A randomly initialised ADM UNet in eval mode; ``device="meta"`` allocates nothing.

    ``dtype`` is the torso dtype (fp16/bf16 convert the torso convs only, as upstream). Init runs on the CPU
    under a fixed seed, so a preset has the same weights everywhere. The zero-initialised output convs get
    small random weights (std 0.02), otherwise a random model predicts eps = 0 and v = 0 exactly.
    """
    cfg = preset if isinstance(preset, ADMConfig) else adm_config(preset)
    device = torch.device(device)
    if device.type == "meta":
        with init_on(device):
            return ADMUNet(cfg).eval()
    with seeded(seed) if seed is not None else contextlib.nullcontext():
        model = ADMUNet(cfg)
        for m in model.modules():
            if getattr(m, "_adm_zero_init", False):
                for p in m.parameters():
                    nn.init.normal_(p, std=0.02)
    return _set_torso_dtype(model, device, dtype)


def adm_layout(preset: str | ADMConfig = "full") -> dict[str, tuple[int, ...]]:
    """Expected state-dict key -> shape, in state-dict order, computed on the meta device."""
    return module_layout(build_adm(preset, device="meta"))


def _fetch_command(path: Path) -> str:
    return f"mkdir -p {shlex.quote(str(path.parent))} && curl -L -o {shlex.quote(str(path))} {ADM_URL}"


def load_adm(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.float32,
    config: ADMConfig | None = None,
) -> ADMUNet:
    """The UNet with weights from ``path`` (the released .pt, or a .safetensors conversion), strictly.

    The .pt is a plain state dict, read with ``torch.load(weights_only=True)``. Tensors are taken as fp32
    (upstream copies them into fp32 parameters, whatever the file's dtype); the torso is converted to
    ``dtype`` afterwards. ``config`` defaults to ``full`` (tests load tiny files through the same path).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(NAME, [path.absolute()], _fetch_command(path.absolute()))
    state = {k: v.float() for k, v in read_state_dict(path).items()}
    model = build_adm(config or ADMConfig.full(), device="meta")
    try:
        # assign=True adopts the loaded tensors instead of copying into (non-existent) meta storage.
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: does not match the ADM UNet layout: {err}") from None
    return _set_torso_dtype(model, torch.device(device), dtype)


def adm_weight_path(model_dir: str | os.PathLike) -> Path:
    """``<model_dir>/256x256_diffusion_uncond.pt``, or a converted ``.safetensors`` next to it."""
    pt = Path(model_dir) / ADM_FILENAME
    converted = pt.with_suffix(".safetensors")
    return converted if not pt.exists() and converted.exists() else pt


def load_adm_dir(model_dir: str | os.PathLike, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = torch.float32) -> ADMUNet:
    """Registry loader: real weights from ``<weights_dir>/adm256-uncond/``."""
    return load_adm(adm_weight_path(model_dir), device, dtype)


@lru_cache(maxsize=1)
def adm_layouts() -> Layouts:
    return {NAME: adm_layout("full")}


SPEC = register(
    ModelSpec(
        name=NAME,
        description="guided-diffusion (ADM) 256x256 unconditional ImageNet UNet, learned sigma, linear schedule",
        licence="code MIT (openai/guided-diffusion); weights: research use only (model card), no licence file",
        restricted=True,
        licence_note=(
            "The guided-diffusion code is MIT. The checkpoint ships without a licence of its own; the model card "
            "says the models are intended for research purposes only and not for commercial deployment "
            "(trained on ILSVRC-2012 ImageNet). Weights are not redistributed here."
        ),
        hub_repo=None,
        hub_revision=None,
        files=(
            # sha256 not pinned: no published hash, and the file could not be fetched to take one.
            WeightFile(ADM_FILENAME, sha256=None, url=ADM_URL, layout=NAME),
        ),
        builder=build_adm,
        loader=load_adm_dir,
        layouts=adm_layouts,
    )
)
