"""JPEG compression purifier: encode and decode once with PIL (libjpeg).

Source: the JPEG baseline of the paper's purification comparison (quality 75). Choices: PIL's encoder
with its defaults besides quality, i.e. 4:2:0 chroma subsampling and the standard quantisation tables
scaled by quality; no ``optimize``/progressive flags (they change the file size, not the pixels).
"""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import Field

from raypdm.purify.base import BuildContext, Purifier, PurifierOptions, register_purifier


class JpegOptions(PurifierOptions):
    quality: int = Field(75, ge=1, le=100, description="libjpeg quality; 75 in the paper")
    subsampling: Literal["4:4:4", "4:2:2", "4:2:0"] = Field(
        "4:2:0", description="chroma subsampling; 4:2:0 is PIL's default"
    )


@register_purifier("jpeg", JpegOptions)
class JpegPurifier(Purifier):
    name = "jpeg"
    uses_gpu = False

    def __init__(self, options: JpegOptions | None = None, context: BuildContext | None = None):
        self.options = options or JpegOptions()

    def _one(self, image: np.ndarray) -> np.ndarray:
        buffer = io.BytesIO()
        Image.fromarray(image, "RGB").save(
            buffer, format="JPEG", quality=self.options.quality, subsampling=self.options.subsampling
        )
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            return np.asarray(decoded.convert("RGB"), dtype=np.uint8).copy()

    def purify(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return [self._one(image) for image in images]
