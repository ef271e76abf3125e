"""CLIP ViT-B/32 for the scorers: one loader, torch preprocessing, and the LIQE checkpoint.

Two registry entries live here, because both are the same network with different weights:

- ``clip-vit-b32``: OpenAI's CLIP ViT-B/32 as the Hugging Face hub ships it (``openai/clip-vit-base-patch32``,
  transformers ``CLIPModel`` + ``CLIPTokenizer``). CLIP-IQAC and the latent-mismatch probe run on it.
- ``liqe``: LIQE's released checkpoint (Zhang et al., CVPR 2023, https://github.com/zwx8981/LIQE), the
  file pyiqa 0.1.16 downloads for its ``liqe`` metric (``liqe_koniq.pt`` from the hub repo
  ``chaofengc/IQA-PyTorch-Weights``, URL from ``pyiqa/archs/liqe_arch.py``). LIQE fine-tunes the whole of
  CLIP ViT-B/32, and pyiqa loads the file strictly over every ``clip_model.*`` weight, so the file alone
  holds the network; it is stored in OpenAI's original CLIP layout (packed ``in_proj_weight``, ``visual.proj``
  as a matrix ...), which :func:`convert_openai_clip_state_dict` maps onto ``CLIPModel`` keys. The
  architecture (``config.json``) and tokenizer come from the ``clip-vit-b32`` folder next to it.

Both scorers call :func:`load_clip`, which returns a :class:`ClipBundle` (model, tokenizer, preprocess).
Presets follow the rest of the registry: ``tiny`` is a seeded random ``CLIPModel`` (2 layers, 32 wide,
32 px images, the byte-level tokenizer of :func:`raypdm.models.tokenizer.tiny_clip_tokenizer`); ``full``
is the real architecture, with real weights when a ``weights_dir`` is given and seeded random weights
otherwise (benchmarks). LIQE's tiny/random weights use a different seed than CLIP's, as the real LIQE
weights differ from OpenAI's.

Preprocessing is CLIP's (``CLIPImageProcessor``: shortest side resized to the model's image size with
bicubic filtering, centre crop, scale to [0, 1], normalise with OpenAI's mean/std), done with torch ops on
the model's device so batches never leave it. Deliberate difference: torch's antialiased bicubic, not
PIL's, so pixels differ by a few 1/255 steps from ``CLIPProcessor`` output (the unit test bounds it).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from raypdm.models.registry import Layouts, ModelSpec, WeightFile, get, register
from raypdm.models.tokenizer import tiny_clip_tokenizer
from raypdm.models.weights import (
    MissingWeightsError,
    init_on,
    load_weights_into,
    module_layout,
    read_state_dict,
    resolve_weight_file,
    seeded,
    sha256_file,
)

# transformers' CLIP costs ~2 s to import: the registry imports this module for `raypdm models list` and
# every driver's preflight, which need only the specs. It is imported where a model is built or loaded.
if TYPE_CHECKING:
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

__all__ = [
    "CLIP_FULL",
    "CLIP_TINY",
    "LIQE_FILENAME",
    "LIQE_NAME",
    "LIQE_URL",
    "NAME",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "ClipBundle",
    "ClipPreprocess",
    "build_clip",
    "build_liqe",
    "clip_config",
    "convert_openai_clip_state_dict",
    "load_clip",
    "load_clip_dir",
    "load_liqe_dir",
    "require_clip_weights",
    "resolve_device",
]

NAME = "clip-vit-b32"
LIQE_NAME = "liqe"
LIQE_FILENAME = "liqe_koniq.pt"
LIQE_HUB_REPO = "chaofengc/IQA-PyTorch-Weights"
# pyiqa's `get_url_from_name('liqe_koniq.pt')` (hf_hub_url of the repo above, main branch).
LIQE_URL = f"https://huggingface.co/{LIQE_HUB_REPO}/resolve/main/{LIQE_FILENAME}"
SEED = 20210226  # CLIP's arXiv date; any fixed value works, it only has to never change
LIQE_SEED = 20230325  # LIQE's arXiv month; a different seed, so tiny LIQE != tiny CLIP
WEIGHTS_FILE = "model.safetensors"
# Files `load_clip_dir` reads besides the weights; LIQE borrows them from this folder.
CONFIG_FILES = ("config.json", "vocab.json", "merges.txt", "tokenizer_config.json")
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
Device = str | torch.device

# openai/clip-vit-base-patch32's config.json, with the text tower's special ids fixed to the real
# vocabulary (the hub file still has the pre-2023 placeholder ids 0/2/1; transformers then pools at
# argmax(input_ids), which is the same end-of-text position for CLIP's tokenizer).
CLIP_FULL: dict[str, Any] = dict(
    text_config=dict(
        vocab_size=49408,
        hidden_size=512,
        intermediate_size=2048,
        num_attention_heads=8,
        num_hidden_layers=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    ),
    vision_config=dict(
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_hidden_layers=12,
        image_size=224,
        patch_size=32,
        hidden_act="quick_gelu",
    ),
    projection_dim=512,
    logit_scale_init_value=2.6592,
)
# Same structure, ~0.1 M parameters: 32 px images in 4x4 patches of 8 px, 2 layers per tower.
CLIP_TINY: dict[str, Any] = dict(
    text_config=dict(
        CLIP_FULL["text_config"], hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2
    ),
    vision_config=dict(
        CLIP_FULL["vision_config"],
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        image_size=32,
        patch_size=8,
    ),
    projection_dim=32,
    logit_scale_init_value=2.6592,
)
_PRESETS = {"tiny": CLIP_TINY, "full": CLIP_FULL}


def resolve_device(device: Device | None) -> torch.device:
    """Explicit device, or CUDA when present, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def clip_config(preset: str, tokenizer: CLIPTokenizer | None = None) -> CLIPConfig:
    """The preset's ``CLIPConfig``; the tiny text tower takes its vocabulary and special ids from ``tokenizer``."""
    from transformers import CLIPConfig

    if preset not in _PRESETS:
        raise ValueError(f"unknown CLIP preset {preset!r}; choose one of {', '.join(_PRESETS)}")
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in _PRESETS[preset].items()}
    if tokenizer is not None and preset == "tiny":
        cfg["text_config"].update(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return CLIPConfig(**cfg)


# --------------------------------------------------------------------------------------------------
# Preprocessing (torch, on the device)
# --------------------------------------------------------------------------------------------------
def group_indices_by_size(images: Sequence[np.ndarray]) -> dict[tuple[int, int], list[int]]:
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault((int(image.shape[0]), int(image.shape[1])), []).append(i)
    return groups


def check_rgb_uint8(image: Any, where: str) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"{where}: expected a uint8 HxWx3 RGB array, got {got}")


def to_unit_batches(
    images: Sequence[np.ndarray], device: torch.device, batch_size: int
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(indices, float (B, 3, H, W) in [0, 1] on ``device``) per chunk of same-size images."""
    for i, image in enumerate(images):
        check_rgb_uint8(image, f"image {i}")
    for indices in group_indices_by_size(images).values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            x = torch.from_numpy(np.stack([images[i] for i in chunk])).to(device)
            yield chunk, x.permute(0, 3, 1, 2).float().div_(255.0)


@dataclass(frozen=True)
class ClipPreprocess:
    """CLIP's image transform on (B, 3, H, W) tensors in [0, 1]: resize shortest side, centre crop, normalise."""

    image_size: int
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def resize_shortest_side(self, x: torch.Tensor, size: int) -> torch.Tensor:
        h, w = x.shape[-2:]
        if min(h, w) == size:
            return x
        # CLIPImageProcessor's rule: the short side becomes `size`, the long side int(size * long / short).
        new = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
        y = F.interpolate(x, size=new, mode="bicubic", align_corners=False, antialias=True)
        return y.clamp_(0.0, 1.0)  # PIL's bicubic saturates at 0/255; keep the same range

    def center_crop(self, x: torch.Tensor, size: int) -> torch.Tensor:
        h, w = x.shape[-2:]
        top, left = (h - size) // 2, (w - size) // 2  # CLIPImageProcessor's rounding
        return x[..., top : top + size, left : left + size]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        s = self.image_size
        return self.normalize(self.center_crop(self.resize_shortest_side(x, s), s))


# --------------------------------------------------------------------------------------------------
# The bundle both scorers use
# --------------------------------------------------------------------------------------------------
def _features(out: Any) -> torch.Tensor:
    # transformers 5 returns a BaseModelOutputWithPooling whose pooler_output is the projected feature;
    # older versions (and test doubles) return the tensor itself.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@lru_cache(maxsize=8)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


@dataclass
class ClipBundle:
    """A CLIP model with its tokenizer and image transform; features come back L2-normalised, float32.

    ``model`` is a ``CLIPModel`` (or any module with ``get_image_features``, ``get_text_features`` and a
    ``logit_scale`` parameter, which tests use to control logits). ``source`` says where the weights came
    from: ``random:<preset>:<seed>`` or the weight file's path.
    """

    model: Any
    tokenizer: CLIPTokenizer
    preprocess: ClipPreprocess
    name: str = NAME
    source: str = "random:tiny"
    weight_file: Path | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def image_size(self) -> int:
        return self.preprocess.image_size

    @property
    def logit_scale(self) -> float:
        """CLIP's learnt temperature, exp(logit_scale) (100 for OpenAI's ViT-B/32)."""
        return float(self.model.logit_scale.detach().float().exp())

    def weights_id(self) -> str:
        """What identifies the weights in a stage key: the file's sha256, or the random preset and seed."""
        if self.weight_file is None:
            return self.source
        st = self.weight_file.stat()
        return f"sha256:{_cached_sha256(str(self.weight_file), st.st_size, st.st_mtime_ns)}"

    def to(self, device: Device) -> ClipBundle:
        self.model.to(torch.device(device))
        return self

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """(P, D) normalised text features, computed on the model's device."""
        if not prompts:
            raise ValueError("encode_text needs at least one prompt")
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=77, return_tensors="pt"
        )
        out = self.model.get_text_features(
            input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
        )
        return F.normalize(_features(out).float(), dim=-1)

    @torch.no_grad()
    def encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, D) normalised image features from already preprocessed (normalised) pixels."""
        out = self.model.get_image_features(pixel_values=pixel_values.to(device=self.device, dtype=self.dtype))
        return F.normalize(_features(out).float(), dim=-1)

    @torch.no_grad()
    def embed_images(self, images: Sequence[np.ndarray], batch_size: int = 32) -> torch.Tensor:
        """(N, D) normalised features of uint8 HxWx3 RGB images, in input order, batched on the device."""
        if not len(images):
            raise ValueError("embed_images needs at least one image")
        out: torch.Tensor | None = None
        for chunk, x in to_unit_batches(images, self.device, batch_size):
            feats = self.encode_pixels(self.preprocess(x))
            if out is None:
                out = torch.empty(len(images), feats.shape[-1], device=feats.device, dtype=feats.dtype)
            out[chunk] = feats
        assert out is not None
        return out


# --------------------------------------------------------------------------------------------------
# Building (random weights) and loading (real weights)
# --------------------------------------------------------------------------------------------------
def _finish(model: CLIPModel, device: torch.device, dtype: torch.dtype | None) -> CLIPModel:
    if device.type != "meta":
        model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    # Scorers never train CLIP: no autograd bookkeeping.
    return model.eval().requires_grad_(False)


def _build(preset: str, device: Device, dtype: torch.dtype | None, seed: int, name: str) -> ClipBundle:
    from transformers import CLIPModel

    device = torch.device(device)
    tokenizer = tiny_clip_tokenizer()  # the only tokenizer that exists offline; real ones come with `load`
    config = clip_config(preset, tokenizer)
    if device.type == "meta":
        with init_on(device):
            model = CLIPModel(config)
    else:
        # Random init on the CPU under a fixed seed: the same weights on every device and worker.
        with seeded(seed):
            model = CLIPModel(config)
    return ClipBundle(
        model=_finish(model, device, dtype),
        tokenizer=tokenizer,
        preprocess=ClipPreprocess(config.vision_config.image_size),
        name=name,
        source=f"random:{preset}:{seed}",
    )


def build_clip(preset: str = "tiny", device: Device = "cpu", dtype: torch.dtype | None = None) -> ClipBundle:
    """CLIP with seeded random weights (registry builder of ``clip-vit-b32``)."""
    return _build(preset, device, dtype, SEED, NAME)


def build_liqe(preset: str = "tiny", device: Device = "cpu", dtype: torch.dtype | None = None) -> ClipBundle:
    """LIQE's CLIP with seeded random weights (registry builder of ``liqe``)."""
    return _build(preset, device, dtype, LIQE_SEED, LIQE_NAME)


def _meta_model(config: CLIPConfig) -> CLIPModel:
    import accelerate
    from transformers import CLIPModel

    # Buffers stay real (include_buffers=False): position_ids is non-persistent and never in a file.
    with accelerate.init_empty_weights(include_buffers=False):
        return CLIPModel(config)


def _read_clip_folder(folder: Path) -> tuple[CLIPConfig, CLIPTokenizer]:
    from transformers import CLIPConfig, CLIPTokenizer

    # from_pretrained (local only) rather than CLIPConfig(**json): it upgrades legacy keys.
    config = CLIPConfig.from_pretrained(str(folder), local_files_only=True)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    return config, tokenizer


def load_clip_dir(model_dir: str | Path, device: Device = "cpu", dtype: torch.dtype | None = None) -> ClipBundle:
    """Real weights from ``<weights_dir>/clip-vit-b32/`` (hub layout), strictly, offline."""
    model_dir = Path(model_dir)
    config, tokenizer = _read_clip_folder(model_dir)
    weights = resolve_weight_file(model_dir / WEIGHTS_FILE)
    if weights is None:
        raise MissingWeightsError(NAME, [(model_dir / WEIGHTS_FILE).absolute()], SPEC.fetch_command(model_dir.parent))
    model = load_weights_into(_meta_model(config), weights)
    return ClipBundle(
        model=_finish(model, torch.device(device), dtype),
        tokenizer=tokenizer,
        preprocess=ClipPreprocess(config.vision_config.image_size),
        name=NAME,
        source=str(weights),
        weight_file=weights,
    )


# OpenAI layout -> CLIPModel layout, per residual block.
_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_PARTS = {
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_TOP = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
# Projections are stored as (width, embed) matrices used as `x @ proj`; nn.Linear keeps the transpose.
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
# Scalars the JIT archives carry; openai's build_model drops them too.
_DROPPED = ("input_resolution", "context_length", "vocab_size")


def convert_openai_clip_state_dict(state: dict[str, torch.Tensor], where: str = "state dict") -> dict[str, torch.Tensor]:
    """OpenAI CLIP (ViT) keys -> transformers ``CLIPModel`` keys (what transformers' conversion script does).

    Accepts pyiqa's wrapping (``clip_model.`` prefix) and DataParallel's (``module.``). Packed attention
    ``in_proj_weight``/``in_proj_bias`` are split into q/k/v in that order, as ``nn.MultiheadAttention``
    packs them. Unknown keys (e.g. a ResNet CLIP) raise, naming the key and ``where``.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.").removeprefix("clip_model.")
        if key in _DROPPED:
            continue
        if key in _TOP:
            out[_TOP[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
        elif m := _BLOCK.match(key):
            tower = "vision_model" if m.group(1) else "text_model"
            prefix, part = f"{tower}.encoder.layers.{m.group(2)}.", m.group(3)
            if part in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = part.rsplit("_", 1)[1]  # weight | bias
                for name, chunk in zip(("q", "k", "v"), value.chunk(3, dim=0), strict=True):
                    out[f"{prefix}self_attn.{name}_proj.{kind}"] = chunk.contiguous()
            elif part in _BLOCK_PARTS:
                out[prefix + _BLOCK_PARTS[part]] = value
            else:
                raise ValueError(f"{where}: unknown CLIP block key {key!r}")
        else:
            raise ValueError(f"{where}: key {key!r} is not part of an OpenAI ViT CLIP (ResNet CLIPs are not supported)")
    return out


def _require(model: str, model_dir: Path, paths: Sequence[str], fetch: str) -> None:
    missing = [(model_dir / p).absolute() for p in paths if resolve_weight_file(model_dir / p) is None]
    if missing:
        raise MissingWeightsError(model, missing, fetch)


def load_liqe_dir(model_dir: str | Path, device: Device = "cpu", dtype: torch.dtype | None = None) -> ClipBundle:
    """LIQE's fine-tuned CLIP from ``<weights_dir>/liqe/liqe_koniq.pt``, with the architecture and tokenizer
    of ``<weights_dir>/clip-vit-b32/``; the pickle is read with ``weights_only=True`` and loaded strictly."""
    model_dir = Path(model_dir)
    clip_dir = model_dir.parent / NAME
    _require(NAME, clip_dir, CONFIG_FILES, SPEC.fetch_command(model_dir.parent))
    path = model_dir / LIQE_FILENAME
    if not path.is_file():
        raise MissingWeightsError(LIQE_NAME, [path.absolute()], LIQE_SPEC.fetch_command(model_dir.parent))
    config, tokenizer = _read_clip_folder(clip_dir)
    state = convert_openai_clip_state_dict(read_state_dict(path), where=str(path))  # unwraps {"params": ...}
    model = _meta_model(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{path}: does not match the CLIP in {clip_dir / 'config.json'}: {len(missing)} missing keys "
            f"{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    return ClipBundle(
        model=_finish(model, torch.device(device), dtype),
        tokenizer=tokenizer,
        preprocess=ClipPreprocess(config.vision_config.image_size),
        name=LIQE_NAME,
        source=str(path),
        weight_file=path,
    )


def require_clip_weights(names: Sequence[str], weights_dir: str | Path) -> None:
    """Raise one ``MissingWeightsError`` listing every missing file of ``names`` (and LIQE's borrowed
    ``clip-vit-b32`` config/tokenizer), before anything is loaded."""
    missing: list[Path] = []
    fetch: list[str] = []
    wanted: dict[str, list[str]] = {}
    for name in names:
        spec = get(name)
        wanted.setdefault(name, []).extend(f.path for f in spec.files if f.required)
        if name == LIQE_NAME:
            wanted.setdefault(NAME, []).extend(CONFIG_FILES)
    for name, paths in wanted.items():
        spec = get(name)
        model_dir = spec.model_dir(weights_dir)
        gone = [(model_dir / p).absolute() for p in dict.fromkeys(paths) if resolve_weight_file(model_dir / p) is None]
        if gone:
            missing += gone
            fetch.append(spec.fetch_command(weights_dir))
    if missing:
        raise MissingWeightsError("+".join(wanted), missing, "\n  ".join(fetch))


def load_clip(
    preset: str = "tiny",
    weights_dir: str | Path | None = None,
    device: Device | None = None,
    weights: str = NAME,
    dtype: torch.dtype | None = None,
) -> ClipBundle:
    """The CLIP both scorers use. ``weights``: ``"clip-vit-b32"`` (OpenAI) or ``"liqe"`` (LIQE's fine-tune).

    ``tiny``: seeded random tiny model (``weights_dir`` ignored, no released tiny weights exist);
    ``full`` with ``weights_dir``: real weights from ``<weights_dir>/<weights>/`` (``MissingWeightsError``
    names each missing file and the fetch command); ``full`` without: seeded random full-size weights.
    """
    from raypdm.models.context import ModelContext

    if weights not in (NAME, LIQE_NAME):
        raise ValueError(f"weights must be {NAME!r} or {LIQE_NAME!r}, got {weights!r}")
    device = resolve_device(device)
    context = ModelContext(device=str(device), preset=preset, weights_dir=weights_dir)
    if context.real_weights:
        require_clip_weights([weights], weights_dir)  # CLIP's own message for its two-folder layout
    # fresh: this context lives for one call; the scorer that asked holds the model
    return context.model(weights, dtype=dtype, fresh=True)


# --------------------------------------------------------------------------------------------------
# Layouts and registry entries
# --------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def clip_layouts() -> Layouts:
    from transformers import CLIPModel

    with init_on(torch.device("meta")):
        return {"clip": module_layout(CLIPModel(clip_config("full")))}


def clip_config_layouts(model_dir: Path) -> Layouts:
    """The layout a folder's own config.json implies (a saved tiny bundle is then not 'corrupt')."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig.from_pretrained(str(model_dir), local_files_only=True)
    with init_on(torch.device("meta")):
        return {"clip": module_layout(CLIPModel(config))}


SPEC = register(
    ModelSpec(
        name=NAME,
        description="OpenAI CLIP ViT-B/32 (224 px): CLIP-IQAC quality and the latent-mismatch probe",
        licence="MIT (OpenAI CLIP code and weights)",
        licence_note=(
            "the model card scopes the weights to research use and advises against deployed or "
            "surveillance use; weights are not redistributed here"
        ),
        hub_repo="openai/clip-vit-base-patch32",
        # The commit that carries model.safetensors (the hub's safetensors conversion); it is the revision
        # public code pins to get safetensors for this repo. Its file hashes were not read from the hub,
        # so nothing is pinned by sha256.
        hub_revision="d15b5f29721ca72dac15f8526b284be910de18be",
        files=(
            WeightFile("config.json"),
            WeightFile(WEIGHTS_FILE, layout="clip"),
            WeightFile("vocab.json"),
            WeightFile("merges.txt"),
            WeightFile("tokenizer_config.json"),
        ),
        builder=build_clip,
        loader=load_clip_dir,
        layouts=clip_layouts,
        config_layouts=clip_config_layouts,
    )
)

LIQE_SPEC = register(
    ModelSpec(
        name=LIQE_NAME,
        description=(
            "LIQE (CVPR 2023) KonIQ checkpoint: a fine-tuned CLIP ViT-B/32 in OpenAI's layout; needs the "
            "clip-vit-b32 config and tokenizer"
        ),
        licence="MIT (LIQE code and weights, github.com/zwx8981/LIQE)",
        licence_note=(
            "the file is the copy pyiqa's weight repository serves; it fine-tunes OpenAI's CLIP, whose model "
            "card scopes use to research; weights are not redistributed here"
        ),
        hub_repo=LIQE_HUB_REPO,
        hub_revision=None,
        # A pickle: read with torch.load(weights_only=True) (a dict of tensors under "params").
        files=(WeightFile(LIQE_FILENAME, url=LIQE_URL),),
        builder=build_liqe,
        loader=load_liqe_dir,
    )
)
