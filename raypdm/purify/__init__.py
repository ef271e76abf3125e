"""Purifiers: one module per purifier; a purifier maps a uint8 HxWx3 batch to a uint8 HxWx3 batch.

Importing this package registers every purifier, so ``build_purifier("codesr")`` works after
``import raypdm.purify``. See ``base.py`` for the interface and how to add one.
"""

from __future__ import annotations


from raypdm.purify.base import (
    BuildContext,
    ChainPurifier,
    Purifier,
    PurifierOptions,
    build_purifier,
    check_image,
    default_device,
    float_to_uint8,
    group_indices_by_size,
    list_aliases,
    list_purifiers,
    parse_spec,
    purifier_options_model,
    purifier_uses_gpu,
    register_alias,
    register_purifier,
)

# Classic purifiers: always present.
from raypdm.purify.gaussian import GaussianOptions, GaussianPurifier
from raypdm.purify.jpeg import JpegOptions, JpegPurifier
from raypdm.purify.tvm import TvmOptions, TvmPurifier

# Model purifiers (each registers itself on import).
from raypdm.purify import codeformer, ddspure, gridpure, impress, latent_diffpure, pixel_diffpure, sr  # noqa: E402,F401

__all__ = [
    "BuildContext",
    "ChainPurifier",
    "GaussianOptions",
    "GaussianPurifier",
    "JpegOptions",
    "JpegPurifier",
    "Purifier",
    "PurifierOptions",
    "TvmOptions",
    "TvmPurifier",
    "build_purifier",
    "check_image",
    "default_device",
    "float_to_uint8",
    "group_indices_by_size",
    "list_aliases",
    "list_purifiers",
    "parse_spec",
    "purifier_options_model",
    "purifier_uses_gpu",
    "register_alias",
    "register_purifier",
]
