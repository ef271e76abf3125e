"""A deterministic, face-like synthetic dataset in the layout, for the demo and tests.

No real face data can be downloaded here, and the demo must run anywhere. Each identity gets its own
skin tone, hair, eye colour, face shape and background; each image varies pose, scale, expression and
lighting a little, and carries a little sensor noise, so purifiers and scorers see texture. With
`real_photos=True` an extra identity, `astronaut`, is cut from the portrait scikit-image ships
(`skimage.data.astronaut()`, public domain, NASA), with crops, flips and lighting changes per image.
Same seed, same bytes.
"""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from raypdm.data.decode import encode_png
from raypdm.data.layout import SPLITS, validate_component
from raypdm.data.uri import join, write_bytes

__all__ = ["make_synthetic", "synthetic_face", "identity_names"]


def _rng(*parts: object) -> np.random.Generator:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def identity_names(n: int) -> list[str]:
    return [f"id{i:03d}" for i in range(n)]


def _identity_traits(seed: int, identity: str) -> dict:
    r = _rng(seed, identity, "traits")
    skin = np.array([r.uniform(150, 240), r.uniform(100, 190), r.uniform(80, 160)])
    return {
        "skin": skin,
        "hair": r.uniform(10, 120, 3) * np.array([1.0, 0.8, 0.6]),
        "eyes": r.uniform(20, 140, 3),
        "bg": r.uniform(40, 230, 3),
        "aspect": r.uniform(0.72, 0.9),
        "hair_len": r.uniform(0.05, 0.35),
        "nose": r.uniform(0.06, 0.12),
    }


def synthetic_face(seed: int, identity: str, index: int, size: int = 512) -> np.ndarray:
    """One uint8 HxWx3 face-like image; a pure function of (seed, identity, index, size)."""
    t = _identity_traits(seed, identity)
    r = _rng(seed, identity, index)
    s = size
    light = r.uniform(0.8, 1.15)
    img = Image.new("RGB", (s, s), tuple(int(c) for c in np.clip(t["bg"] * light, 0, 255)))
    d = ImageDraw.Draw(img)
    cx, cy = s * (0.5 + r.uniform(-0.05, 0.05)), s * (0.52 + r.uniform(-0.04, 0.04))
    fw = s * r.uniform(0.26, 0.31)
    fh = fw / t["aspect"]
    col = lambda c: tuple(int(v) for v in np.clip(c * light, 0, 255))  # noqa: E731
    # shoulders, hair behind the head, face, ears
    d.ellipse([cx - fw * 1.9, cy + fh * 0.85, cx + fw * 1.9, cy + fh * 2.6], fill=col(t["bg"] * 0.5 + 40))
    d.ellipse([cx - fw * 1.12, cy - fh * 1.15, cx + fw * 1.12, cy + fh * (0.2 + t["hair_len"] * 2)], fill=col(t["hair"]))
    d.ellipse([cx - fw * 1.08, cy - fh * 0.15, cx - fw * 0.9, cy + fh * 0.2], fill=col(t["skin"] * 0.92))
    d.ellipse([cx + fw * 0.9, cy - fh * 0.15, cx + fw * 1.08, cy + fh * 0.2], fill=col(t["skin"] * 0.92))
    d.ellipse([cx - fw, cy - fh, cx + fw, cy + fh], fill=col(t["skin"]))
    d.chord([cx - fw * 1.02, cy - fh * 1.08, cx + fw * 1.02, cy - fh * 0.2], 180, 360, fill=col(t["hair"]))
    # eyes, brows, nose, mouth (expression varies per image)
    ey, ex = cy - fh * 0.12, fw * 0.42
    er = fw * 0.13
    for sx in (-1, 1):
        x = cx + sx * ex + r.uniform(-1, 1) * s * 0.004
        d.ellipse([x - er * 1.4, ey - er * 0.8, x + er * 1.4, ey + er * 0.8], fill=(245, 245, 240))
        d.ellipse([x - er * 0.7, ey - er * 0.7, x + er * 0.7, ey + er * 0.7], fill=col(t["eyes"]))
        d.ellipse([x - er * 0.3, ey - er * 0.3, x + er * 0.3, ey + er * 0.3], fill=(15, 15, 15))
        d.line([x - er * 1.5, ey - er * 1.9, x + er * 1.5, ey - er * 2.2 + r.uniform(-1, 1) * er * 0.4],
               fill=col(t["hair"] * 0.8), width=max(1, int(s * 0.012)))
    nl = fh * t["nose"] * 2.5
    d.line([cx, ey + er, cx - fw * 0.08, ey + er + nl, cx + fw * 0.04, ey + er + nl * 1.05],
           fill=col(t["skin"] * 0.7), width=max(1, int(s * 0.008)))
    smile = r.uniform(-0.3, 1.0)
    my, mw = cy + fh * 0.48, fw * r.uniform(0.32, 0.45)
    box = [cx - mw, my - fh * 0.08, cx + mw, my + fh * 0.08 + smile * fh * 0.06]
    d.arc(box, 10 if smile > 0 else 190, 170 if smile > 0 else 350, fill=(150, 50, 60), width=max(1, int(s * 0.012)))
    img = img.rotate(r.uniform(-8, 8), resample=Image.BILINEAR, center=(cx, cy), fillcolor=col(t["bg"]))
    img = img.filter(ImageFilter.GaussianBlur(radius=s / 512 * 0.8))
    arr = np.asarray(img, dtype=np.float32)
    # Smooth lighting gradient plus sensor noise: real photos are never flat.
    yy, xx = np.mgrid[0:s, 0:s] / s
    g = 1.0 + r.uniform(-0.12, 0.12) * (xx - 0.5) + r.uniform(-0.12, 0.12) * (yy - 0.5)
    arr = arr * g[..., None] + r.normal(0, 3.0, arr.shape)
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def _astronaut(seed: int, index: int, size: int) -> np.ndarray:
    from skimage import data

    photo = data.astronaut()  # 512x512 RGB portrait; the face is roughly at rows 20-230, cols 130-330
    r = _rng(seed, "astronaut", index)
    side = int(r.uniform(200, 300))
    top = int(np.clip(r.uniform(0, 60), 0, 512 - side))
    left = int(np.clip(r.uniform(90, 160), 0, 512 - side))
    crop = Image.fromarray(photo[top : top + side, left : left + side]).resize((size, size), Image.BICUBIC)
    arr = np.asarray(crop, dtype=np.float32) * r.uniform(0.85, 1.15)
    if r.random() < 0.5:
        arr = arr[:, ::-1]
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def make_synthetic(
    out_uri: str,
    *,
    identities: int = 2,
    images: int = 4,
    seed: int = 0,
    size: int = 512,
    real_photos: bool = False,
    splits: tuple[str, ...] = SPLITS,
) -> list[str]:
    """Write `images` PNGs per split for each identity under `out_uri`; return the written URIs."""
    if identities < 0 or images < 1 or size < 16:
        raise ValueError("need identities >= 0, images >= 1 and size >= 16")
    written = []
    names = identity_names(identities) + (["astronaut"] if real_photos else [])
    for ident in names:
        validate_component(ident, "identity")
        for s_i, split in enumerate(splits):
            for k in range(images):
                index = s_i * 10_000 + k
                img = _astronaut(seed, index, size) if ident == "astronaut" else synthetic_face(seed, ident, index, size)
                uri = join(out_uri, ident, split, f"{k:04d}.png")
                write_bytes(uri, encode_png(img, compress_level=6))
                written.append(uri)
    return written
