"""The CLIP latent-mismatch probe (paper §4.1, Fig. 3): do protected images read as "noise" to CLIP?

The paper's observation is that protective perturbations push images away from the concept they depict:
a zero-shot CLIP classifier puts protected portraits in a "noise pattern" class rather than "person", and
purification pulls them back. The probe measures that, per group of images (clean, protected, purified, ...):

- embed every image with OpenAI's CLIP ViT-B/32 (``clip-vit-b32``, the same loader as CLIP-IQAC) and every
  prompt of two groups, ``person`` and ``noise`` (``DEFAULT_PERSON_PROMPTS`` / ``DEFAULT_NOISE_PROMPTS``);
- zero-shot classification: softmax over *all* prompts of exp(logit_scale) * cosine, summed per prompt
  group; ``p_noise`` is the noise group's share and an image counts as noise when ``p_noise > 0.5`` (the
  nearest group; a tie counts as person);
- image-to-prompt cosine: mean cosine to the person prompts (``cos_person``) and to the noise prompts
  (``cos_noise``), and per group their shift against the clean group;
- a 2-D projection of the image embeddings coloured by group (t-SNE and truncated SVD from scikit-learn,
  UMAP too when ``umap`` imports), one PNG with a panel per method.

The paper gives no prompt list; ours paraphrase its two classes (five prompts each, prompt ensembling as in
CLIP's zero-shot evaluation). Both lists are arguments, and ``config_dict`` records them. The projection
uses scikit-learn's ``TruncatedSVD`` on the raw (uncentred) unit vectors, as asked, so its first axis is
close to the mean direction; t-SNE's perplexity is capped at (n - 1) / 3 so that small groups still run.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from raypdm.data.uri import write_bytes

if TYPE_CHECKING:  # transformers' CLIP takes seconds to import: only the probe itself needs it
    from raypdm.models.clip import ClipBundle

__all__ = [
    "DEFAULT_NOISE_PROMPTS",
    "DEFAULT_PERSON_PROMPTS",
    "PROJECTION_METHODS",
    "MismatchProbe",
    "available_projection_methods",
    "plot_projection",
    "summarise",
    "zero_shot_rows",
]

DEFAULT_PERSON_PROMPTS: tuple[str, ...] = (
    "a photo of a person",
    "a portrait photo of a person",
    "a close-up photo of a person's face",
    "a photo of a man",
    "a photo of a woman",
)
DEFAULT_NOISE_PROMPTS: tuple[str, ...] = (
    "a noise pattern",
    "a noisy pattern",
    "an image of random noise",
    "an abstract pattern of colorful noise",
    "a texture of glitch artifacts",
)
PROJECTION_METHODS = ("tsne", "svd", "umap")
_TITLES = {"tsne": "t-SNE", "svd": "truncated SVD", "umap": "UMAP"}


def _check_prompts(prompts: Sequence[str], field: str) -> tuple[str, ...]:
    if isinstance(prompts, str) or not prompts:
        raise ValueError(f"{field}: expected a non-empty list of prompts, got {prompts!r}")
    bad = [p for p in prompts if not isinstance(p, str) or not p.strip()]
    if bad:
        raise ValueError(f"{field}: prompts must be non-empty strings, got {bad!r}")
    return tuple(prompts)


def zero_shot_rows(
    image_emb: torch.Tensor, person_emb: torch.Tensor, noise_emb: torch.Tensor, logit_scale: float
) -> list[dict[str, float]]:
    """Per image: ``p_noise``, ``is_noise`` (1.0/0.0), ``cos_person``, ``cos_noise``.

    All inputs (N, D) / (P, D) / (Q, D) are L2-normalised here (idempotent for unit vectors), so the dot
    products are cosines. ``p_noise`` sums the softmax over all P + Q prompts on the noise prompts.
    """
    img = F.normalize(image_emb.float(), dim=-1)
    person = F.normalize(person_emb.float().to(img.device), dim=-1)
    noise = F.normalize(noise_emb.float().to(img.device), dim=-1)
    cos_p, cos_n = img @ person.t(), img @ noise.t()
    probs = F.softmax(logit_scale * torch.cat([cos_p, cos_n], dim=1), dim=1)
    p_noise = probs[:, person.shape[0] :].sum(dim=1)
    is_noise = (p_noise > 0.5).float()
    cols = [p_noise, is_noise, cos_p.mean(dim=1), cos_n.mean(dim=1)]
    return [
        {"p_noise": a, "is_noise": b, "cos_person": c, "cos_noise": d}
        for a, b, c, d in zip(*(t.cpu().tolist() for t in cols), strict=True)
    ]


class MismatchProbe:
    """Embeds images with CLIP and classifies them zero-shot as person or noise; loads CLIP once per actor.

    ``preset``/``weights_dir`` as for :class:`raypdm.metrics.quality.QualityScorer` (``tiny`` random, ``full``
    real weights from ``<weights_dir>/clip-vit-b32/`` or random full-size without a ``weights_dir``).
    ``clip_bundle`` injects a ready model.
    """

    def __init__(
        self,
        preset: str = "tiny",
        weights_dir: str | None = None,
        device: str | None = None,
        person_prompts: Sequence[str] = DEFAULT_PERSON_PROMPTS,
        noise_prompts: Sequence[str] = DEFAULT_NOISE_PROMPTS,
        *,
        batch_size: int = 32,
        clip_bundle: ClipBundle | None = None,
    ):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        self.preset = preset
        self.batch_size = batch_size
        self.person_prompts = _check_prompts(person_prompts, "person_prompts")
        self.noise_prompts = _check_prompts(noise_prompts, "noise_prompts")
        from raypdm.models.clip import NAME as CLIP_NAME
        from raypdm.models.clip import load_clip, resolve_device

        self.clip = clip_bundle or load_clip(preset, weights_dir, resolve_device(device), weights=CLIP_NAME)
        self.person_text = self.clip.encode_text(self.person_prompts)
        self.noise_text = self.clip.encode_text(self.noise_prompts)

    def config_dict(self) -> dict[str, Any]:
        """What changes the rows (for a stage config hash); the device does not."""
        return {
            "metric": "clip_mismatch",
            "preset": self.preset,
            "person_prompts": list(self.person_prompts),
            "noise_prompts": list(self.noise_prompts),
            "decision": "softmax over all prompts, summed per group; noise if p_noise > 0.5",
            "image_size": self.clip.image_size,
            "weights": self.clip.weights_id(),
        }

    def embed_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """uint8 HxWx3 RGB -> (N, D) L2-normalised float32 embeddings, batched on the device."""
        if not len(images):
            return np.zeros((0, self.person_text.shape[1]), dtype=np.float32)
        return self.clip.embed_images(images, self.batch_size).cpu().numpy().astype(np.float32, copy=False)

    @torch.no_grad()
    def image_rows(self, embeddings: np.ndarray) -> list[dict[str, float]]:
        """(N, D) embeddings -> per image {"p_noise", "is_noise" (1.0/0.0), "cos_person", "cos_noise"}."""
        emb = np.asarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.person_text.shape[1]:
            raise ValueError(f"embeddings: expected shape (N, {self.person_text.shape[1]}), got {emb.shape}")
        return zero_shot_rows(
            torch.from_numpy(emb).to(self.person_text.device), self.person_text, self.noise_text, self.clip.logit_scale
        )


SUMMARY_COLUMNS = ("group", "n", "noise_share", "p_noise", "cos_person", "cos_noise", "shift_person", "shift_noise")


def summarise(rows_by_group: Mapping[str, Sequence[Mapping[str, float]]], baseline: str = "clean") -> pd.DataFrame:
    """One row per group: group, n, noise_share (share of images classified noise), p_noise (mean),
    cos_person, cos_noise (means), shift_person, shift_noise (each minus the ``baseline`` group's value).

    Shifts are NaN when ``baseline`` is not among the groups; an empty group has n = 0 and NaN means.
    """
    def mean(rows: Sequence[Mapping[str, float]], key: str) -> float:
        values = [float(r[key]) for r in rows]
        return float(np.mean(values)) if values else float("nan")

    records = [
        {
            "group": str(group),
            "n": len(rows),
            "noise_share": mean(rows, "is_noise"),
            "p_noise": mean(rows, "p_noise"),
            "cos_person": mean(rows, "cos_person"),
            "cos_noise": mean(rows, "cos_noise"),
        }
        for group, rows in rows_by_group.items()
    ]
    df = pd.DataFrame.from_records(records, columns=list(SUMMARY_COLUMNS[:-2]))
    base = df[df["group"] == baseline]
    for col in ("person", "noise"):
        ref = float(base[f"cos_{col}"].iloc[0]) if len(base) else float("nan")
        df[f"shift_{col}"] = df[f"cos_{col}"] - ref
    return df[list(SUMMARY_COLUMNS)]


# ------------------------------------------------------------------------------------------ projection


@lru_cache(maxsize=1)
def available_projection_methods() -> tuple[str, ...]:
    """t-SNE and SVD always (scikit-learn); UMAP when the optional ``umap-learn`` package imports."""
    try:
        import umap  # noqa: F401
    except Exception:  # noqa: BLE001  (umap-learn pulls numba/pynndescent; a broken install must not break the plot)
        return ("tsne", "svd")
    return ("tsne", "svd", "umap")


def _project(method: str, x: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    n = x.shape[0]
    if method == "tsne":
        from sklearn.manifold import TSNE

        # Perplexity must stay below n; (n - 1) / 3 keeps ~3 effective neighbours' worth of spread.
        perplexity = float(min(30.0, max(1.0, (n - 1) / 3.0)))
        y = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
        return y, f"t-SNE (perplexity {perplexity:.3g})"
    if method == "svd":
        from sklearn.decomposition import TruncatedSVD

        svd = TruncatedSVD(n_components=2, random_state=seed).fit(x)
        ratio = svd.explained_variance_ratio_
        return svd.transform(x), f"truncated SVD ({ratio[0]:.0%}, {ratio[1]:.0%} of variance)"
    import umap

    y = umap.UMAP(n_components=2, n_neighbors=max(2, min(15, n - 1)), random_state=seed).fit_transform(x)
    return np.asarray(y), "UMAP"


def plot_projection(
    embeddings_by_group: Mapping[str, np.ndarray],
    out_uri: str,
    methods: Sequence[str] = PROJECTION_METHODS,
    seed: int = 0,
) -> str:
    """One PNG with a 2-D projection panel per available method, points coloured by group; returns ``out_uri``.

    Unknown method names raise; ``umap`` is skipped (and said so in the figure title) when it does not
    import. Written through fsspec, so ``out_uri`` may be a local path or any fsspec URI.
    """
    unknown = [m for m in methods if m not in PROJECTION_METHODS]
    if unknown:
        raise ValueError(f"methods: unknown projection {unknown}; choose from {list(PROJECTION_METHODS)}")
    available = available_projection_methods()
    chosen = [m for m in dict.fromkeys(methods) if m in available]
    skipped = [m for m in dict.fromkeys(methods) if m not in available]
    if not chosen:
        raise ValueError(f"methods: none of {list(methods)} is available here (available: {list(available)})")

    groups, blocks = [], []
    dims = set()
    for group, emb in embeddings_by_group.items():
        arr = np.asarray(emb, dtype=np.float64)
        if arr.ndim != 2:
            raise ValueError(f"embeddings_by_group[{group!r}]: expected (N, D), got shape {arr.shape}")
        if len(arr):
            groups.append(str(group))
            blocks.append(arr)
            dims.add(arr.shape[1])
    if len(dims) > 1:
        raise ValueError(f"embeddings_by_group: groups have different dimensions {sorted(dims)}")
    x = np.concatenate(blocks) if blocks else np.empty((0, 0))
    if x.shape[0] < 3 or x.shape[1] < 3:
        raise ValueError(f"embeddings_by_group: a 2-D projection needs >= 3 points of dimension >= 3, got {x.shape}")
    labels = np.repeat(np.arange(len(groups)), [len(b) for b in blocks])

    import matplotlib

    matplotlib.use("Agg")  # headless workers: never a display backend
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(chosen), figsize=(5.0 * len(chosen), 4.6), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, method in zip(axes[0], chosen, strict=True):
        y, title = _project(method, x, seed)
        for k, group in enumerate(groups):
            pts = y[labels == k]
            ax.scatter(pts[:, 0], pts[:, 1], s=14, alpha=0.8, color=colours(k % 10), label=f"{group} ({len(pts)})")
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].legend(fontsize=8, loc="best")
    note = f" ({', '.join(skipped)} not installed)" if skipped else ""
    fig.suptitle(f"CLIP image embeddings by group, {x.shape[0]} images{note}")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    write_bytes(out_uri, png.getvalue())
    return out_uri
