"""Protections: ℓ∞-bounded perturbations that try to stop personalisation (paper §3, Eq. 4).

Importing this package registers every protection, so ``build_protection("advdm")`` works after
``import raypdm.protect``. See ``base.py`` for the interface and ``pgd.py`` for the PGD core.
"""

from __future__ import annotations


# The interface, the PGD core and the per-image protections: this package's own modules, always present.
from raypdm.protect.adaptive_codesr import AdaptiveCodeSR, AdaptiveCodeSROptions
from raypdm.protect.advdm import AdvDM, AdvDMOptions
from raypdm.protect.base import (
    IdentityProtection,
    ImageProtection,
    ImageProtectOptions,
    ProtectContext,
    Protection,
    ProtectOptions,
    ProtectResult,
    budget_steps,
    build_protection,
    image_seed,
    list_protections,
    parse_fraction,
    protection_options_model,
    reaches_budget,
    register_protection,
)
from raypdm.protect.glaze import Glaze, GlazeOptions
from raypdm.protect.pgd import (
    PGDImageProtection,
    PGDResult,
    perturbation_norms,
    pgd_linf,
    quantise,
    to_tensor,
    to_uint8,
)
from raypdm.protect.photoguard_diffusion import PhotoGuardDiffusion, PhotoGuardDiffusionOptions
from raypdm.protect.photoguard_encoder import PhotoGuardEncoder, PhotoGuardEncoderOptions

# The per-identity (bi-level) protections register themselves on import.
from raypdm.protect import aspl, easpl, fsmg, metacloak  # noqa: E402,F401

__all__ = [
    "AdaptiveCodeSR",
    "AdaptiveCodeSROptions",
    "AdvDM",
    "AdvDMOptions",
    "Glaze",
    "GlazeOptions",
    "IdentityProtection",
    "ImageProtectOptions",
    "ImageProtection",
    "PGDImageProtection",
    "PGDResult",
    "PhotoGuardDiffusion",
    "PhotoGuardDiffusionOptions",
    "PhotoGuardEncoder",
    "PhotoGuardEncoderOptions",
    "ProtectContext",
    "ProtectOptions",
    "ProtectResult",
    "Protection",
    "budget_steps",
    "build_protection",
    "image_seed",
    "list_protections",
    "parse_fraction",
    "perturbation_norms",
    "pgd_linf",
    "protection_options_model",
    "quantise",
    "reaches_budget",
    "register_protection",
    "to_tensor",
    "to_uint8",
]
