"""E-ASPL, ASPL over an ensemble of surrogates from different base models (Van Le et al., "Anti-DreamBooth:
Protecting users from personalized text-to-image synthesis", ICCV 2023; github.com/VinAIResearch/Anti-DreamBooth,
``scripts/attack_with_ensemble_aspl.sh`` and ``attacks/ensemble_aspl.py``).

Each outer iteration runs one ASPL iteration (``aspl.py``) per member j, every member starting from the same
perturbed point x: θ'_j fine-tuned on the clean photos, PGD against θ'_j gives x_j, θ_j fine-tuned on
x_j; then x = mean_j x_j (a mean of points of the ball stays in the ball; it is put back on the 1/255
grid at the end). Defaults are the release script's: SD 1.4, SD 1.5 and SD 2.1-base, 50 iterations of
3 surrogate steps and 6 PGD steps, lr 5e-7, "a photo of sks person" / "a photo of person".

Members are visited one at a time to fit memory: only the visited member (θ_j and its θ'_j) is on the
device, the others are parked on the CPU, and the device cache is emptied between members (the script
kept every member on the GPU and reloaded state dicts).

Which weights a member is (``models`` entries):
- ``preset="full"`` with ``weights_dir``: a registered model name (``raypdm models list``) is loaded
  from ``<weights_dir>/<name>``; any other entry is a diffusers Stable Diffusion folder, absolute or under
  ``weights_dir`` (``hf download CompVis/stable-diffusion-v1-4 --local-dir weights/stable-diffusion-v1-4``).
- ``preset="tiny"`` (tests, demo), or ``full`` without weights: the registered SD 2.1 preset for
  ``sd21-base``, and for any other entry the same architecture with random weights seeded from the entry's
  name, so the members differ as different base models do.

Class-prior images come from the last member (SD 2.1-base by default), as MetaCloak's ensemble code
picks them; the script's ensemble attack passed the comma-joined model list where one model was
expected. Shared differences from the scripts: see ``surrogate.py``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, field_validator

from raypdm.protect.aspl import AlternatingOptions, aspl_iteration
from raypdm.protect.base import ProtectContext, register_protection, weights_identity
from raypdm.protect.surrogate import (
    BiLevelProtection,
    IdentityAttack,
    InstanceLoss,
    SurrogateModel,
    derive_seed,
    load_class_images,
    load_sd_bundle,
)

__all__ = ["EASPL", "EASPLOptions", "resolve_member"]

RELEASE_ENSEMBLE = ("stable-diffusion-v1-4", "stable-diffusion-v1-5", "sd21-base")


class EASPLOptions(AlternatingOptions, frozen=True):
    """E-ASPL's options; defaults from ``scripts/attack_with_ensemble_aspl.sh``."""

    models: tuple[str, ...] = Field(
        RELEASE_ENSEMBLE, min_length=1, max_length=16, description="ensemble members: registered names or folders"
    )

    @field_validator("models")
    @classmethod
    def _distinct(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not m.strip() for m in value):
            raise ValueError("models: an entry is empty")
        if len(set(value)) != len(value):
            raise ValueError(f"models: duplicate entries in {list(value)}")
        return value


def _registered(name: str) -> bool:
    from raypdm.models.registry import list_models

    return name in list_models()


def _member_seed(entry: str) -> int:
    return int.from_bytes(hashlib.sha256(f"raypdm.easpl.member/{entry}".encode()).digest()[:4], "little")


def _random_bundle(entry: str, preset: str, device: torch.device):
    """SD 2.1's architecture at ``preset`` with weights seeded from the entry's name."""
    from diffusers import DDPMScheduler

    from raypdm.models import stable_diffusion as sd

    unet_cfg = sd.SD21_UNET_TINY if preset == "tiny" else sd.SD21_UNET_FULL
    vae_cfg = sd.SD2_VAE_TINY if preset == "tiny" else sd.SD2_VAE_FULL
    stack = sd.build_random_stack(preset, device, None, _member_seed(entry), unet_cfg, vae_cfg)
    return sd.StableDiffusionParts(**stack, scheduler=DDPMScheduler.from_config(sd.SD21_SCHEDULER))


def _folder(entry: str, weights_dir: str | None) -> Path:
    tried = [Path(entry)]
    if weights_dir is not None:
        tried.append(Path(weights_dir) / entry)
    for path in tried:
        if (path / "unet").is_dir():
            return path
    where = " or ".join(str(p) for p in tried)
    raise FileNotFoundError(
        f"models: {entry!r} is neither a registered model nor a diffusers Stable Diffusion folder ({where} has no "
        f"unet/); fetch one with `hf download <hub repo> --local-dir {tried[-1]}` (the release's ensemble: "
        "CompVis/stable-diffusion-v1-4, stable-diffusion-v1-5/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1-base)"
    )


def _folder_identity(path: Path) -> str:
    """Names, sizes and the first/last MiB of every file (hashing whole checkpoints would cost minutes)."""
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        size = file.stat().st_size
        h.update(f"{file.relative_to(path).as_posix()}:{size}:".encode())
        with file.open("rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(size - (1 << 20))
                h.update(f.read())
    return f"folder:{h.hexdigest()[:32]}"


def resolve_member(entry: str, context: ProtectContext) -> tuple[SurrogateModel, str]:
    """The member's base model (loaded now, parked on the CPU) and what identifies its weights."""
    real = context.preset == "full" and context.weights_dir is not None
    if _registered(entry):
        ident = weights_identity(entry, context)
        return SurrogateModel(f"{entry}:{ident}", lambda d: load_sd_bundle(entry, context, d)), ident
    if real:
        from raypdm.models.stable_diffusion import load_sd21  # reads any diffusers SD 1.x/2.x folder

        folder = _folder(entry, context.weights_dir)
        ident = _folder_identity(folder)
        return SurrogateModel(f"{entry}:{ident}", lambda d: load_sd21(folder, device=d)), ident
    ident = f"random:{context.preset}:seed={_member_seed(entry)}"
    return SurrogateModel(f"{entry}:{ident}", lambda d: _random_bundle(entry, context.preset, d)), ident


def _move(parts, device: torch.device | str):
    for name in ("unet", "text_encoder", "vae"):
        getattr(parts, name).to(device)
    return parts


@register_protection("easpl", EASPLOptions)
class EASPL(BiLevelProtection):
    name = "easpl"
    options: EASPLOptions

    def __init__(self, options: EASPLOptions | None = None, context: ProtectContext | None = None):
        super().__init__(options or EASPLOptions(), context)
        resolved = [resolve_member(entry, self.context) for entry in self.options.models]
        self.members = [model for model, _ in resolved]
        self.member_weights = {entry: ident for entry, (_, ident) in zip(self.options.models, resolved, strict=True)}
        self.weight_models = ()

    def config_dict(self) -> dict[str, Any]:
        return {**super().config_dict(), "weights": dict(self.member_weights)}

    @contextmanager
    def _on_device(self, parts) -> Iterator[Any]:
        _move(parts, self.device)
        try:
            yield parts
        finally:
            _move(parts, "cpu")
            self.release(self.device)

    def attack(self, images: Sequence[np.ndarray], clean_reference: Sequence[np.ndarray], identity: str) -> IdentityAttack:
        o = self.options
        seed = self.seed_for(identity)
        class_pool = load_class_images(self.members[-1], o, self.device)
        clean_photos = self.surrogate_data(images, clean_reference)
        image_set = self.image_set(images, identity)
        cpu = torch.device("cpu")
        models = [member.instantiate(cpu) for member in self.members]  # θ_j, parked
        last_surrogates: list[Any] = [None] * len(models)
        for i in range(o.iterations):
            total = None
            for j, parts in enumerate(models):
                with self._on_device(parts):
                    surrogate, points = aspl_iteration(
                        parts, image_set, clean_photos, class_pool, o,
                        seed=derive_seed(seed, "easpl"), iteration=i, label=f"member{j}",
                    )  # fmt: skip
                    total = points if total is None else [a + b for a, b in zip(total, points, strict=True)]
                    last_surrogates[j] = _move(surrogate, cpu) if i == o.iterations - 1 else None
                    del surrogate
            image_set.set_adv([t / len(models) for t in total])
        del models

        def open_member(parts):
            @contextmanager
            def opened() -> Iterator[InstanceLoss]:
                with self._on_device(parts):
                    yield InstanceLoss(parts, o)

            return opened

        return self.finish(image_set, self.scorer(image_set, [open_member(p) for p in last_surrogates]))
