"""Dataset layout, fsspec I/O, hardened decoding, Ray Data reading, manifests and synthetic data."""

from raypdm.data.decode import ImageDecodeError, decode_image, encode_png
from raypdm.data.layout import SPLITS, ImageRef, LayoutError, list_images, validate_component
from raypdm.data.manifest import Manifest

__all__ = [
    "SPLITS",
    "ImageDecodeError",
    "ImageRef",
    "LayoutError",
    "Manifest",
    "decode_image",
    "encode_png",
    "list_images",
    "validate_component",
]
