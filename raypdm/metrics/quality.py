"""Image quality Q: the mean of LIQE (mapped to [-1, 1]) and CLIP-IQAC, as the paper scores generations.

Q = (LIQE_unit + CLIP-IQAC) / 2, per image, where

- LIQE_unit = ((s - 1) / 4) * 2 - 1 maps LIQE's score s in [1, 5] onto [-1, 1];
- CLIP-IQAC = P("a good photo of a {class}") - P("a bad photo of a {class}"), the two probabilities from
  CLIP's zero-shot softmax over those two prompts only (logits = exp(logit_scale) * cosine), on OpenAI's
  CLIP ViT-B/32 (``clip-vit-b32``). It lies in [-1, 1].

LIQE (Zhang et al., "Blind Image Quality Assessment via Vision-Language Correspondence: A Multitask Learning
Perspective", CVPR 2023) as pyiqa 0.1.16 computes its ``liqe`` metric (``pyiqa/archs/liqe_arch.py``, KonIQ
checkpoint, ``mtl=False``): the image in [0, 1] is normalised with OpenAI's CLIP mean/std, cut into 224 x 224
patches with stride 32 (``unfold``, row-major), ``num_patch = min(15, patches)`` of them taken at indices
``k * max(1, patches // num_patch)``, each encoded by LIQE's fine-tuned CLIP; the logits
``exp(logit_scale) * cos(patch, "a photo with {q} quality")`` for q in (bad, poor, fair, good, perfect) are
averaged over the patches, softmaxed over the five levels, and the score is the expectation sum_i i * p_i.

Why this re-implements LIQE's head instead of calling pyiqa's ``LIQE`` class: that class cannot take an
injected model cleanly. Its constructor always calls ``clip_model.load('ViT-B/32')`` (a download into
``$TORCH_HOME/hub/clip``), reads checkpoints with ``torch.load(weights_only=False)`` (the weights and its
text-feature cache alike, which this project never does), and caches text features in one global file under
``$TORCH_HOME/hub/pyiqa/`` keyed by name only, so features of a random test model would be silently reused
by a real run. Here the same computation runs on the CLIP of :func:`raypdm.models.clip.load_clip` (the
``liqe`` weights: LIQE's checkpoint converted to transformers' layout), and the unit tests hold it to pyiqa's
``LIQE.forward`` numerically with the same tiny weights injected into pyiqa's loader.

Deliberate differences from pyiqa:
- images whose short side is below the patch size (224) are upsampled (bicubic, aspect kept) until it fits;
  pyiqa refuses them with an assertion;
- the five prompt features are computed in memory when the scorer loads (no cache file anywhere);
- only the KonIQ checkpoint (pyiqa's ``liqe``); the multitask ``liqe_mix`` is not provided;
- the ``tiny`` preset uses its model's 32 px input as the patch size (stride still 32), so tests run on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from raypdm.models.context import ModelContext
from raypdm.models.clip import (
    LIQE_NAME,
    ClipBundle,
    load_clip,
    require_clip_weights,
    resolve_device,
    to_unit_batches,
)
from raypdm.models.clip import (
    NAME as CLIP_NAME,
)

__all__ = [
    "CLIP_IQAC_TEMPLATES",
    "LIQE_LEVELS",
    "LIQE_NUM_PATCH",
    "LIQE_PROMPT",
    "LIQE_STEP",
    "QualityScorer",
    "clip_iqac_from_logits",
    "liqe_patches",
    "liqe_score_from_logits",
    "liqe_to_unit",
]

LIQE_LEVELS = ("bad", "poor", "fair", "good", "perfect")
LIQE_PROMPT = "a photo with {} quality"
LIQE_STEP = 32
LIQE_NUM_PATCH = 15
CLIP_IQAC_TEMPLATES = ("a good photo of a {class_noun}", "a bad photo of a {class_noun}")


def liqe_to_unit(score: float) -> float:
    """LIQE's [1, 5] onto [-1, 1]: ((s - 1) / 4) * 2 - 1."""
    return ((float(score) - 1.0) / 4.0) * 2.0 - 1.0


def liqe_score_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """(B, patches, 5) image-prompt logits -> (B,) LIQE scores: patch-mean, softmax, expectation over 1..5."""
    probs = F.softmax(logits.mean(dim=1), dim=-1)
    levels = torch.arange(1, probs.shape[-1] + 1, device=probs.device, dtype=probs.dtype)
    return probs @ levels


def clip_iqac_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """(B, 2) logits for (good, bad) prompts -> (B,) P(good) - P(bad) under a softmax over the pair."""
    probs = F.softmax(logits, dim=-1)
    return probs[:, 0] - probs[:, 1]


def liqe_patches(x: torch.Tensor, patch: int, step: int = LIQE_STEP, num_patch: int = LIQE_NUM_PATCH) -> torch.Tensor:
    """(B, 3, H, W) -> (B, n, 3, patch, patch): pyiqa's LIQE patch selection (eval mode), copying only the
    selected patches (pyiqa reshapes all of them first; the values are the same)."""
    h, w = x.shape[-2:]
    if min(h, w) < patch:
        raise ValueError(f"LIQE patches need a short side of at least {patch} px, got {h}x{w}")
    grid = x.unfold(2, patch, step).unfold(3, patch, step)  # (B, 3, nh, nw, P, P), a view
    nh, nw = grid.shape[2], grid.shape[3]
    total = nh * nw
    n = min(num_patch, total)
    sel = torch.arange(n, device=x.device) * max(1, total // n)
    picked = grid[:, :, sel // nw, sel % nw]  # (B, 3, n, P, P)
    return picked.permute(0, 2, 1, 3, 4)


class QualityScorer:
    """Scores batches of images with Q, LIQE and CLIP-IQAC; loads both CLIPs once (one scorer per actor).

    ``preset``: ``tiny`` (seeded random tiny models, tests and demo) or ``full`` (with ``weights_dir``: the
    real ``clip-vit-b32`` and ``liqe`` weights, or a ``MissingWeightsError`` naming every missing file;
    without: random full-size models, for benchmarks). ``clip_bundle``/``liqe_bundle`` inject ready models
    (tests control logits with them).
    """

    def __init__(
        self,
        preset: str = "tiny",
        weights_dir: str | None = None,
        device: str | None = None,
        class_noun: str = "person",
        *,
        batch_size: int = 16,
        liqe_step: int = LIQE_STEP,
        liqe_num_patch: int = LIQE_NUM_PATCH,
        clip_bundle: ClipBundle | None = None,
        liqe_bundle: ClipBundle | None = None,
    ):
        if not isinstance(class_noun, str) or not class_noun.strip():
            raise ValueError(f"class_noun: expected a non-empty string, got {class_noun!r}")
        for field, value in (("batch_size", batch_size), ("liqe_step", liqe_step), ("liqe_num_patch", liqe_num_patch)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{field}: expected a positive integer, got {value!r}")
        self.preset = preset
        self.class_noun = class_noun.strip()
        self.batch_size = batch_size
        self.liqe_step = liqe_step
        self.liqe_num_patch = liqe_num_patch
        device = resolve_device(device)
        real = ModelContext(preset=preset, weights_dir=weights_dir).real_weights
        if real and (clip_bundle is None or liqe_bundle is None):
            # One error listing every missing file of both models, before seconds of loading.
            require_clip_weights([CLIP_NAME, LIQE_NAME], weights_dir)
        self.clip = clip_bundle or load_clip(preset, weights_dir, device, weights=CLIP_NAME)
        self.liqe = liqe_bundle or load_clip(preset, weights_dir, device, weights=LIQE_NAME)
        self.device = self.clip.device
        self.iqac_prompts = tuple(t.format(class_noun=self.class_noun) for t in CLIP_IQAC_TEMPLATES)
        self.liqe_prompts = tuple(LIQE_PROMPT.format(level) for level in LIQE_LEVELS)
        self.iqac_text = self.clip.encode_text(self.iqac_prompts)
        self.liqe_text = self.liqe.encode_text(self.liqe_prompts)

    def config_dict(self) -> dict[str, Any]:
        """What changes the scores (for a stage config hash); the device does not."""
        return {
            "metric": "quality",
            "preset": self.preset,
            "q": "mean(liqe, clip_iqac)",
            "liqe": {
                "variant": "koniq",
                "prompts": list(self.liqe_prompts),
                "patch": self.liqe.image_size,
                "step": self.liqe_step,
                "num_patch": self.liqe_num_patch,
                "small_images": "upsample short side to patch",
                "mapping": "((s-1)/4)*2-1",
                "weights": self.liqe.weights_id(),
            },
            "clip_iqac": {
                "prompts": list(self.iqac_prompts),
                "image_size": self.clip.image_size,
                "weights": self.clip.weights_id(),
            },
        }

    # ------------------------------------------------------------------------------------------ parts
    @torch.no_grad()
    def clip_iqac(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B,) CLIP-IQAC."""
        feats = self.clip.encode_pixels(self.clip.preprocess(x))
        return clip_iqac_from_logits(self.clip.logit_scale * feats @ self.iqac_text.t())

    @torch.no_grad()
    def liqe_raw(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B,) LIQE scores in [1, 5]."""
        patch = self.liqe.image_size
        if min(x.shape[-2:]) < patch:
            x = self.liqe.preprocess.resize_shortest_side(x, patch)
        patches = liqe_patches(self.liqe.preprocess.normalize(x), patch, self.liqe_step, self.liqe_num_patch)
        b, n = patches.shape[:2]
        # All patches of the chunk in one forward pass, as pyiqa does for a batch.
        feats = self.liqe.encode_pixels(patches.reshape(b * n, 3, patch, patch))
        logits = self.liqe.logit_scale * feats @ self.liqe_text.t()
        return liqe_score_from_logits(logits.view(b, n, -1))

    # ------------------------------------------------------------------------------------------ API
    @torch.no_grad()
    def score(self, images: Sequence[np.ndarray]) -> list[dict[str, float]]:
        """uint8 HxWx3 RGB -> per image {"q", "liqe" (in [-1, 1]), "liqe_raw" (in [1, 5]), "clip_iqac"}; batched."""
        rows: list[dict[str, float]] = [{} for _ in images]
        for chunk, x in to_unit_batches(images, self.device, self.batch_size):
            iqac = self.clip_iqac(x).cpu().tolist()
            raw = self.liqe_raw(x.to(self.liqe.device)).cpu().tolist()
            for i, s, c in zip(chunk, raw, iqac, strict=True):
                liqe = liqe_to_unit(s)
                rows[i] = {"q": (liqe + c) / 2.0, "liqe": liqe, "liqe_raw": float(s), "clip_iqac": float(c)}
        return rows
