"""Image decoding and encoding, hardened for untrusted files.

Every decoded image is uint8, HxWx3, RGB. Grayscale, alpha, palette, CMYK and 16-bit images are converted;
EXIF orientation is applied (phones store rotated pixels). Anything that cannot be decoded raises
`ImageDecodeError` with a reason; the caller turns that into an error row.
"""

from __future__ import annotations

import hashlib
import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Decoders we accept. Keeping the list explicit means PIL never hands a file to a risky plugin
# (EPS would call Ghostscript) just because the bytes looked like one.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
# 64 megapixels: far above any image this field trains on (512-1024 px), far below what would exhaust a
# worker's memory when a crafted header claims gigapixels (a decompression bomb).
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024

__all__ = ["ImageDecodeError", "decode_image", "encode_png", "sha256_hex", "ALLOWED_FORMATS", "DEFAULT_MAX_PIXELS"]


class ImageDecodeError(ValueError):
    """The bytes are not a usable image. The message says why."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _to_uint8_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img)
        arr = arr.astype(np.float64)
        # 16-bit PNG/TIFF data use the full 0..65535 range; "I" images from 8-bit sources stay <= 255.
        peak = 65535.0 if arr.max(initial=0) > 255 or mode.startswith("I;16") else 255.0
        arr = np.clip(np.round(arr / peak * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2) if arr.ndim == 2 else arr[..., :3]
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Alpha is dropped (as OpenCV's IMREAD_COLOR and the field's scripts do), not composited.
        img = img.convert("RGBA").convert("RGB") if mode != "RGBA" else img.convert("RGB")
    elif img.mode != "RGB":
        img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageDecodeError(f"unexpected decoded shape {arr.shape}")
    return np.ascontiguousarray(arr)


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes to uint8 HxWx3 RGB or raise ImageDecodeError."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            width, height = img.size
            if width <= 0 or height <= 0:
                raise ImageDecodeError(f"invalid size {width}x{height}")
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"{width}x{height} = {width * height} pixels exceeds the {max_pixels}-pixel limit "
                    "(possible decompression bomb)"
                )
            # Truncated files must fail, not decode as grey padding.
            ImageFile.LOAD_TRUNCATED_IMAGES = False
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_uint8_rgb(img)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(
            f"not an image in a supported format ({', '.join(ALLOWED_FORMATS)})"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(f"corrupt or truncated image: {exc}") from None


def encode_png(image: np.ndarray, *, compress_level: int = 1) -> bytes:
    """Lossless PNG. Level 1: outputs are written once and read a few times; speed beats 10% size."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected uint8 HxWx3, got {image.dtype} {image.shape}")
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()
