"""CodeFormer (Zhou et al., NeurIPS 2022), re-implemented so the released checkpoint loads strictly.

The module tree, parameter names, shapes and state-dict order match the official
``CodeFormer(dim_embd=512, codebook_size=1024, n_head=8, n_layers=9, connect_list=['32','64','128','256'])``
(515 tensors, 94,112,707 parameters, no buffers; see ``tests/reference/codeformer_state_dict.json``), so
``codeformer.pth['params_ema']`` loads with ``strict=True``. What the official class hard-codes (the VQGAN
constructor, the 16x16 latent, the fuse block indices) is derived here from a typed ``CodeFormerConfig``,
which is what lets a ``tiny`` preset exist at all.

Data flow of ``forward(x)`` for x in [-1, 1], (B, 3, S, S) with S = ``config.img_size``:
  encoder (VQGAN, keeps skip features per resolution) -> lq_feat (B, emb_dim, s, s), s = S / 2**(levels-1)
  -> transformer predicts a codebook index per latent token -> codebook lookup (optionally AdaIN'd to
  lq_feat's statistics) -> generator (VQGAN decoder), into which the encoder skip features are fused with
  fidelity weight ``w`` (Fuse_sft_block, "controllable feature transformation"; skipped when w == 0).

Licence of the released weights: NTU S-Lab License 1.0, non-commercial use only (see the registry entry).
"""

from __future__ import annotations

import dataclasses
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
    "CODEFORMER_SHA256",
    "CODEFORMER_URL",
    "CodeFormer",
    "CodeFormerConfig",
    "PRESETS",
    "SPEC",
    "adaptive_instance_normalization",
    "build_codeformer",
    "codeformer_config",
    "codeformer_layout",
    "codeformer_layouts",
    "codeformer_weight_path",
    "load_codeformer",
    "load_codeformer_dir",
]

NAME = "codeformer"
CODEFORMER_URL = "https://github.com/sczhou/CodeFormer/releases/download/v0.1.0/codeformer.pth"
CODEFORMER_FILENAME = "codeformer.pth"
CODEFORMER_SHA256 = "1009e537e0c2a07d4cabce6355f53cb66767cd4b4297ec7a4a64ca4b8a5684b7"  # provenance: see SPEC
SEED = 20220622  # CodeFormer's arXiv date; any fixed value works, it only has to never change


# --------------------------------------------------------------------------------------------------
# Config and presets
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CodeFormerConfig:
    """Every size the official code hard-codes, made explicit.

    ``full()`` reproduces the official constructor exactly. The latent grid side is
    ``img_size / 2**(len(ch_mult) - 1)`` and the learned position embedding has one row per latent
    token, so ``img_size`` is fixed per model (the official model only accepts 512x512).
    """

    # Transformer code predictor.
    dim_embd: int = 512
    n_head: int = 8
    n_layers: int = 9
    codebook_size: int = 1024
    # Resolutions (as strings, like the official keys ``fuse_convs_dict.32``) where encoder skip
    # features are fused into the generator when w > 0.
    connect_list: tuple[str, ...] = ("32", "64", "128", "256")
    # VQGAN autoencoder (encoder + codebook + generator).
    img_size: int = 512
    nf: int = 64
    ch_mult: tuple[int, ...] = (1, 2, 2, 4, 4, 8)
    res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    emb_dim: int = 256
    # GroupNorm groups in the VQGAN blocks (32 upstream); every VQGAN channel count must divide by it.
    norm_groups: int = 32

    def __post_init__(self) -> None:
        # Frozen dataclass: normalise lists (e.g. from YAML) to tuples so configs stay hashable.
        object.__setattr__(self, "connect_list", tuple(str(c) for c in self.connect_list))
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        down = 2 ** (len(self.ch_mult) - 1)
        if self.img_size % down:
            raise ValueError(f"img_size={self.img_size} is not divisible by 2**(len(ch_mult)-1)={down}")
        if self.dim_embd % self.n_head:
            raise ValueError(f"dim_embd={self.dim_embd} is not divisible by n_head={self.n_head}")
        for ch in {self.nf * m for m in self.ch_mult}:
            if ch % self.norm_groups:
                raise ValueError(f"VQGAN channel count {ch} is not divisible by norm_groups={self.norm_groups}")
        bad = [c for c in self.connect_list if int(c) not in self.resolutions]
        if bad:
            raise ValueError(f"connect_list {bad} not among the VQGAN resolutions {self.resolutions}")

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Feature-map side per VQGAN level, encoder order: (512, 256, ..., 16) for ``full``."""
        return tuple(self.img_size // 2**i for i in range(len(self.ch_mult)))

    @property
    def latent_side(self) -> int:
        return self.resolutions[-1]

    @property
    def latent_size(self) -> int:
        """Number of latent tokens (rows of ``position_emb``); 256 for ``full``."""
        return self.latent_side**2

    def channels(self, resolution: int) -> int:
        """VQGAN channel count at a resolution (the official ``self.channels`` table)."""
        return self.nf * self.ch_mult[self.resolutions.index(int(resolution))]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def full(cls) -> "CodeFormerConfig":
        """The official architecture (the released ``codeformer.pth``)."""
        return cls()

    @classmethod
    def tiny(cls) -> "CodeFormerConfig":
        """Random-weight model for tests and demos: same interface (RGB in [-1, 1], 512x512), same
        six VQGAN levels, 16x16 latent grid and fuse resolutions as ``full``, only thin.

        We keep img_size=512 rather than shrinking it because the purifier's resize-to-512 path,
        the fuse resolutions named in ``connect_list`` and the 16x16 token grid are exactly what the
        tests should exercise; thin channels (and 8 GroupNorm groups, since 32 groups would force
        >= 32 channels at 512x512) are what make it fast on CPU: 0.36 M parameters and ~2.3 GMAC of
        convolutions per image, against 94 M and ~400 GMAC for ``full``.
        """
        return cls(
            dim_embd=32,
            n_head=2,
            n_layers=1,
            codebook_size=64,
            connect_list=("32", "64", "128", "256"),
            img_size=512,
            nf=8,
            ch_mult=(1, 1, 2, 2, 4, 4),
            res_blocks=1,
            attn_resolutions=(16,),
            emb_dim=16,
            norm_groups=8,
        )


PRESETS: dict[str, Callable[[], CodeFormerConfig]] = {
    "tiny": CodeFormerConfig.tiny,
    "full": CodeFormerConfig.full,
}


def codeformer_config(preset: str = "full", **overrides) -> CodeFormerConfig:
    """A preset's config, optionally with fields replaced (``codeformer_config("tiny", n_layers=2)``)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown CodeFormer preset {preset!r}; choose from {sorted(PRESETS)}")
    cfg = PRESETS[preset]()
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


# --------------------------------------------------------------------------------------------------
# VQGAN building blocks (names match upstream ``vqgan_arch.py`` so state-dict keys line up)
# --------------------------------------------------------------------------------------------------
def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    """GN -> swish -> conv3 -> GN -> swish -> conv3, plus a 1x1 ``conv_out`` shortcut when channels change."""

    def __init__(self, in_ch: int, out_ch: int, groups: int = 32):
        super().__init__()
        self.norm1 = _group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _group_norm(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # Only created when needed: the checkpoint has ``conv_out`` keys exactly for those blocks.
        self.conv_out = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # silu == upstream's swish x*sigmoid(x)
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_out is None else self.conv_out(x)
        return h + skip


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv q/k/v/proj_out, scaled by c**-0.5."""

    def __init__(self, ch: int, groups: int = 32):
        super().__init__()
        self.norm = _group_norm(ch, groups)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # (B, C, H, W) -> (B, 1 head, HW, C); SDPA's default scale is c**-0.5, as upstream.
        q, k, v = (proj(y).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    """3x3 stride-2 conv after an asymmetric (right/bottom) zero pad, as in taming-transformers."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2 then a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """VQGAN encoder. ``blocks`` is one flat ModuleList (the checkpoint's ``encoder.blocks.N`` names);
    ``fuse_index[res]`` is the block after which the skip feature at resolution ``res`` is taken."""

    def __init__(self, cfg: CodeFormerConfig):
        super().__init__()
        g = cfg.norm_groups
        blocks: list[nn.Module] = [nn.Conv2d(3, cfg.nf, 3, padding=1)]
        self.fuse_index = {}
        in_ch = cfg.nf
        for level, res in enumerate(cfg.resolutions):
            out_ch = cfg.nf * cfg.ch_mult[level]
            for _ in range(cfg.res_blocks):
                blocks.append(ResBlock(in_ch, out_ch, g))
                in_ch = out_ch
                # Skip feature = output of the level's last ResBlock (before its attention, if any):
                # reproduces upstream's {'512':2, '256':5, '128':8, '64':11, '32':14, '16':18}.
                self.fuse_index[str(res)] = len(blocks) - 1
                if res in cfg.attn_resolutions:
                    blocks.append(AttnBlock(in_ch, g))
            if level != len(cfg.resolutions) - 1:
                blocks.append(Downsample(in_ch))
        # Bottleneck ("non-local") then project to the codebook dimension.
        blocks += [ResBlock(in_ch, in_ch, g), AttnBlock(in_ch, g), ResBlock(in_ch, in_ch, g)]
        blocks += [_group_norm(in_ch, g), nn.Conv2d(in_ch, cfg.emb_dim, 3, padding=1)]
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor, keep: frozenset[int] = frozenset()) -> tuple[Tensor, dict[str, Tensor]]:
        """Returns the latent and the skip features (keyed by resolution) after the block indices in ``keep``."""
        feats: dict[str, Tensor] = {}
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in keep:
                feats[str(x.shape[-1])] = x
        return x, feats


class Generator(nn.Module):
    """VQGAN decoder; ``fuse_index[res]`` is the block after which the skip feature at ``res`` is fused.
    Its forward lives in ``CodeFormer.forward`` because fusion interleaves with the blocks."""

    def __init__(self, cfg: CodeFormerConfig):
        super().__init__()
        g = cfg.norm_groups
        in_ch = cfg.nf * cfg.ch_mult[-1]
        blocks: list[nn.Module] = [nn.Conv2d(cfg.emb_dim, in_ch, 3, padding=1)]
        blocks += [ResBlock(in_ch, in_ch, g), AttnBlock(in_ch, g), ResBlock(in_ch, in_ch, g)]
        self.fuse_index = {}
        n_levels = len(cfg.ch_mult)
        for level in reversed(range(n_levels)):
            res = cfg.resolutions[level]
            out_ch = cfg.nf * cfg.ch_mult[level]
            has_attn = res in cfg.attn_resolutions
            for j in range(cfg.res_blocks):
                blocks.append(ResBlock(in_ch, out_ch, g))
                in_ch = out_ch
                # Fuse after the level's first ResBlock, or, at attention levels, after its last
                # ResBlock (before the attention): upstream's {'16':6, '32':9, ..., '512':21}.
                if (j == 0 and not has_attn) or (j == cfg.res_blocks - 1 and has_attn):
                    self.fuse_index[str(res)] = len(blocks) - 1
                if has_attn:
                    blocks.append(AttnBlock(in_ch, g))
            if level != 0:
                blocks.append(Upsample(in_ch))
        # No tanh: the official output is unbounded and clamped by the caller.
        blocks += [_group_norm(in_ch, g), nn.Conv2d(in_ch, 3, 3, padding=1)]
        self.blocks = nn.ModuleList(blocks)


class VectorQuantizer(nn.Module):
    """The VQGAN codebook (``quantize.embedding.weight``), with nearest-neighbour quantisation."""

    def __init__(self, codebook_size: int, emb_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, emb_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def lookup(self, indices: Tensor, side: int) -> Tensor:
        """(B, side*side) code indices -> (B, emb_dim, side, side) features (upstream get_codebook_feat)."""
        feat = F.embedding(indices, self.embedding.weight)  # (B, HW, C)
        return feat.transpose(1, 2).reshape(indices.shape[0], -1, side, side)

    def nearest_indices(self, z: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, HW) index of the closest code in L2 (the VQGAN "nearest" quantizer)."""
        flat = z.flatten(2).transpose(1, 2)  # (B, HW, C)
        codes = self.embedding.weight.to(flat.dtype)
        dist = flat.pow(2).sum(-1, keepdim=True) + codes.pow(2).sum(-1) - 2 * flat @ codes.t()
        return dist.argmin(-1)

    def forward(self, z: Tensor) -> Tensor:
        """Nearest-code quantisation (inference only; CodeFormer itself predicts codes instead)."""
        return self.lookup(self.nearest_indices(z), z.shape[-1])


# --------------------------------------------------------------------------------------------------
# Transformer code predictor and controllable feature transformation
# --------------------------------------------------------------------------------------------------
class TransformerSALayer(nn.Module):
    """Pre-norm self-attention layer, sequence-first (L, B, C); position embedding on q and k only."""

    def __init__(self, dim: int, n_head: int, dim_mlp: int):
        super().__init__()
        # nn.MultiheadAttention keeps the packed ``in_proj_weight``/``in_proj_bias`` the checkpoint has.
        self.self_attn = nn.MultiheadAttention(dim, n_head, dropout=0.0)
        self.linear1 = nn.Linear(dim, dim_mlp)
        self.linear2 = nn.Linear(dim_mlp, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        h = self.norm1(x)
        qk = h + pos
        x = x + self.self_attn(qk, qk, value=h, need_weights=False)[0]
        return x + self.linear2(F.gelu(self.linear1(self.norm2(x))))


class FuseSFTBlock(nn.Module):
    """Upstream ``Fuse_sft_block``: dec + w * (dec * scale(enc') + shift(enc')), enc' = ResBlock([enc, dec])."""

    def __init__(self, ch: int, groups: int = 32):
        super().__init__()
        self.encode_enc = ResBlock(2 * ch, ch, groups)
        self.scale = nn.Sequential(
            nn.Conv2d(ch, ch, 3, padding=1), nn.LeakyReLU(0.2, inplace=True), nn.Conv2d(ch, ch, 3, padding=1)
        )
        self.shift = nn.Sequential(
            nn.Conv2d(ch, ch, 3, padding=1), nn.LeakyReLU(0.2, inplace=True), nn.Conv2d(ch, ch, 3, padding=1)
        )

    def forward(self, enc_feat: Tensor, dec_feat: Tensor, w: float = 1.0) -> Tensor:
        h = self.encode_enc(torch.cat([enc_feat, dec_feat], dim=1))
        return dec_feat + w * (dec_feat * self.scale(h) + self.shift(h))


def adaptive_instance_normalization(content: Tensor, style: Tensor, eps: float = 1e-5) -> Tensor:
    """Give ``content`` the per-sample, per-channel mean and std of ``style`` (upstream's AdaIN:
    unbiased variance, eps added to the variance before the square root)."""

    def mean_std(t: Tensor) -> tuple[Tensor, Tensor]:
        flat = t.flatten(2)
        return flat.mean(-1)[..., None, None], (flat.var(-1) + eps).sqrt()[..., None, None]

    # Statistics in fp32: in fp16 the variance of a 16x16 map can overflow or lose eps entirely.
    c32, s32 = content.float(), style.float()
    c_mean, c_std = mean_std(c32)
    s_mean, s_std = mean_std(s32)
    return ((c32 - c_mean) / c_std * s_std + s_mean).to(content.dtype)


# --------------------------------------------------------------------------------------------------
# CodeFormer
# --------------------------------------------------------------------------------------------------
class CodeFormer(nn.Module):
    """CodeFormer face restoration network; ``CodeFormer()`` is the official architecture."""

    def __init__(self, config: CodeFormerConfig | None = None):
        super().__init__()
        cfg = config or CodeFormerConfig.full()
        self.config = cfg
        # Attribute order fixes the state-dict order: the official class's own parameter comes first,
        # then the VQGAN parent's submodules, then CodeFormer's.
        self.position_emb = nn.Parameter(torch.zeros(cfg.latent_size, cfg.dim_embd))
        self.encoder = Encoder(cfg)
        self.quantize = VectorQuantizer(cfg.codebook_size, cfg.emb_dim)
        self.generator = Generator(cfg)
        self.feat_emb = nn.Linear(cfg.emb_dim, cfg.dim_embd)
        self.ft_layers = nn.Sequential(
            *[TransformerSALayer(cfg.dim_embd, cfg.n_head, 2 * cfg.dim_embd) for _ in range(cfg.n_layers)]
        )
        self.idx_pred_layer = nn.Sequential(
            nn.LayerNorm(cfg.dim_embd), nn.Linear(cfg.dim_embd, cfg.codebook_size, bias=False)
        )
        self.fuse_convs_dict = nn.ModuleDict(
            {res: FuseSFTBlock(cfg.channels(int(res)), cfg.norm_groups) for res in cfg.connect_list}
        )

    def predict_codes(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Encode and predict code logits: returns (logits (B, HW, K), lq_feat, encoder skip features)."""
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-2:] != (cfg.img_size, cfg.img_size):
            raise ValueError(
                f"CodeFormer expects (B, 3, {cfg.img_size}, {cfg.img_size}) RGB in [-1, 1], got {tuple(x.shape)}:"
                " the position embedding fixes the latent grid, so resize first"
            )
        keep = frozenset(self.encoder.fuse_index[r] for r in cfg.connect_list)
        lq_feat, enc_feats = self.encoder(x, keep)
        tokens = self.feat_emb(lq_feat.flatten(2).permute(2, 0, 1))  # (B, C, H, W) -> (HW, B, C)
        pos = self.position_emb.unsqueeze(1).to(tokens.dtype)  # (HW, 1, C), broadcasts over batch
        for layer in self.ft_layers:
            tokens = layer(tokens, pos)
        logits = self.idx_pred_layer(tokens).permute(1, 0, 2)  # (HW, B, K) -> (B, HW, K)
        return logits, lq_feat, enc_feats

    def forward(
        self,
        x: Tensor,
        w: float = 0.0,
        adain: bool = False,
        code_only: bool = False,
        *,
        detach_16: bool = True,
    ) -> tuple[Tensor, Tensor, Tensor] | tuple[Tensor, Tensor]:
        """x: (B, 3, S, S) RGB in [-1, 1]. Returns ``(out, logits, lq_feat)`` like upstream, with ``out``
        unclamped; ``code_only=True`` returns ``(logits, lq_feat)``.

        ``w`` is the fidelity weight (0: codebook prior only, the fuse blocks are not even run;
        1: most faithful to the input). ``adain`` renormalises the looked-up codes to lq_feat's statistics,
        which the official inference script always does. ``detach_16`` (training stage III) only stops
        gradients through the looked-up codes.
        """
        logits, lq_feat, enc_feats = self.predict_codes(x)
        if code_only:
            return logits, lq_feat
        # Upstream takes top-1 of softmax(logits); softmax is monotonic, so argmax of logits is the same code.
        quant_feat = self.quantize.lookup(logits.argmax(dim=-1), self.config.latent_side).to(lq_feat.dtype)
        if detach_16:
            quant_feat = quant_feat.detach()
        if adain:
            quant_feat = adaptive_instance_normalization(quant_feat, lq_feat)

        fuse_at = {self.generator.fuse_index[r]: r for r in self.config.connect_list} if w > 0 else {}
        h = quant_feat
        for i, block in enumerate(self.generator.blocks):
            h = block(h)
            if i in fuse_at:
                res = fuse_at[i]
                h = self.fuse_convs_dict[res](enc_feats[res].detach(), h, w)
        return h, logits, lq_feat


# --------------------------------------------------------------------------------------------------
# Building, layouts, loading and the registry entry
# --------------------------------------------------------------------------------------------------
def build_codeformer(
    preset: str | CodeFormerConfig = "tiny",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.float32,
    seed: int | None = SEED,
) -> CodeFormer:
    """A randomly initialised CodeFormer in eval mode; ``device="meta"`` allocates nothing.

    Random init always runs on the CPU under a fixed seed, so a preset has the same weights on every
    machine and device (tiny-preset outputs are reproducible across processes and Ray workers).
    """
    cfg = preset if isinstance(preset, CodeFormerConfig) else codeformer_config(preset)
    device = torch.device(device)
    dtype = dtype or torch.float32
    if device.type == "meta":
        with init_on(device):
            return CodeFormer(cfg).to(dtype=dtype).eval()
    if seed is None:
        model = CodeFormer(cfg)
    else:
        with seeded(seed):
            model = CodeFormer(cfg)
    return model.to(device=device, dtype=dtype).eval()


def codeformer_layout(preset: str | CodeFormerConfig = "full") -> dict[str, tuple[int, ...]]:
    """Expected state-dict key -> shape, in state-dict order, computed on the meta device."""
    return module_layout(build_codeformer(preset, device="meta"))


def _fetch_command(path: Path) -> str:
    return f"mkdir -p {shlex.quote(str(path.parent))} && curl -L -o {shlex.quote(str(path))} {CODEFORMER_URL}"


def load_codeformer(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.float32,
) -> CodeFormer:
    """The official CodeFormer with released weights (``codeformer.pth`` or a .safetensors), in eval mode.

    A .pth is read with ``torch.load(weights_only=True)`` and its ``params_ema`` entry is used, as the
    official script does; loading is strict, so a wrong or truncated file fails with the offending keys.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(NAME, [path.absolute()], _fetch_command(path.absolute()))
    state = read_state_dict(path)  # unwraps {"params_ema": ...}
    model = build_codeformer("full", device="meta")
    # assign=True adopts the loaded tensors instead of copying them into (non-existent) meta storage.
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype or torch.float32).eval()


def codeformer_weight_path(model_dir: str | os.PathLike) -> Path:
    """``<model_dir>/codeformer.pth``, or a converted ``codeformer.safetensors`` next to it."""
    pth = Path(model_dir) / CODEFORMER_FILENAME
    converted = pth.with_suffix(".safetensors")
    return converted if not pth.exists() and converted.exists() else pth


def load_codeformer_dir(
    model_dir: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32
) -> CodeFormer:
    """Registry loader: real weights from ``<weights_dir>/codeformer/``."""
    return load_codeformer(codeformer_weight_path(model_dir), device, dtype)


@lru_cache(maxsize=1)
def codeformer_layouts() -> Layouts:
    return {NAME: codeformer_layout("full")}


SPEC = register(
    ModelSpec(
        name=NAME,
        description="CodeFormer blind face restoration (VQGAN codebook + transformer code prediction), 512 px",
        licence="NTU S-Lab License 1.0 — NON-COMMERCIAL use only",
        restricted=True,
        licence_note=(
            "NON-COMMERCIAL use only: the S-Lab License 1.0 allows use and redistribution for "
            "non-commercial purposes only, keeping the copyright notice and disclaimer; commercial use "
            "needs the authors' permission. The released weights carry no separate terms, so the same "
            "limit applies to them. Weights are not redistributed here."
        ),
        hub_repo=None,
        hub_revision=None,
        files=(
            WeightFile(
                CODEFORMER_FILENAME,
                # Not published by the authors. Observed by independent third parties for this exact
                # release URL (e.g. arktronic/sd-multi resource-manager.py pins it next to the URL;
                # other download-and-verify scripts give the same hash with a size of 376,637,898 bytes).
                sha256=CODEFORMER_SHA256,
                url=CODEFORMER_URL,
                layout=NAME,
            ),
        ),
        builder=build_codeformer,
        loader=load_codeformer_dir,
        layouts=codeformer_layouts,
    )
)
