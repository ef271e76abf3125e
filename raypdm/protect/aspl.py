"""ASPL, Alternating Surrogate and Perturbation Learning (Van Le et al., "Anti-DreamBooth: Protecting users
from personalized text-to-image synthesis", ICCV 2023; github.com/VinAIResearch/Anti-DreamBooth,
``scripts/attack_with_aspl.sh`` and ``attacks/aspl.py``).

A model θ starts at the base weights; each of ``iterations`` = 50 outer iterations:

1. θ' = a copy of θ, fine-tuned ``surrogate_steps`` = 3 DreamBooth steps on the identity's *clean* photos
   (the surrogate "as if" the attacker trained on clean data);
2. ``steps`` = 6 PGD steps on the protected images against θ' (maximise its instance loss);
3. θ fine-tuned 3 DreamBooth steps on the current *protected* images (it follows what an attacker would
   actually train on).

Defaults from the release script: lr 5e-7, batch 1 + 1 class image, prior weight 1, instance prompt
"a photo of sks person", class prompt "a photo of person", 200 class images, text encoder trained. (The
script's argparse default lr is 5e-6; the script the authors ran passes 5e-7, which is used here.)

The clean photos are ``clean_reference`` (set_B here: the script's ``CLEAN_TRAIN_DIR``); an identity
without references uses the clean originals of its images. Shared differences from the script: see
``surrogate.py`` (budget in [0, 1] units with r = 11/255, α = 1/255; θ trains on the uint8 protected
images; fixed-draw before/after scores under the last θ').
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
from pydantic import Field

from raypdm.protect.base import ProtectContext, register_protection
from raypdm.protect.surrogate import (
    BiLevelProtection,
    IdentityAttack,
    IdentityImages,
    InstanceLoss,
    SurrogateModel,
    SurrogateOptions,
    clone_parts,
    derive_seed,
    finetune,
    frozen,
    load_class_images,
    load_sd_bundle,
)

__all__ = ["ASPL", "ASPLOptions", "AlternatingOptions", "aspl_iteration"]


class AlternatingOptions(SurrogateOptions, frozen=True):
    """The alternation of ASPL and E-ASPL; defaults from ``scripts/attack_with_aspl.sh``."""

    iterations: int = Field(50, ge=1, le=100_000, description="outer iterations (script: --max_train_steps 50)")
    surrogate_steps: int = Field(3, ge=0, le=100_000, description="DreamBooth steps per phase (--max_f_train_steps)")
    steps: int = Field(6, ge=0, le=100_000, description="PGD steps per iteration (--max_adv_train_steps)")


class ASPLOptions(AlternatingOptions, frozen=True):
    model: str = Field("sd21-base", description="registered base model of the surrogate")


def aspl_iteration(
    parts,
    image_set: IdentityImages,
    clean_photos: Sequence[np.ndarray],
    class_pool: Sequence[np.ndarray],
    opts: AlternatingOptions,
    *,
    seed: int,
    iteration: int,
    label: str = "",
):
    """One outer iteration of ASPL on ``parts`` (θ, trained in place) and ``image_set``; returns θ' and
    the new perturbed points (not yet stored: E-ASPL averages them over its members first).
    ``label`` separates the random streams of ensemble members."""
    surrogate = clone_parts(parts)
    finetune(
        surrogate, clean_photos, class_pool, opts,
        steps=opts.surrogate_steps, seed=derive_seed(seed, "aspl-surrogate", label, iteration),
    )  # fmt: skip
    with frozen(surrogate):
        points = image_set.pgd(InstanceLoss(surrogate, opts), opts, opts.steps, opts.timesteps_per_step)
    finetune(
        parts, image_set.uint8(points), class_pool, opts,
        steps=opts.surrogate_steps, seed=derive_seed(seed, "aspl-model", label, iteration),
    )  # fmt: skip
    return surrogate, points


@register_protection("aspl", ASPLOptions)
class ASPL(BiLevelProtection):
    name = "aspl"
    options: ASPLOptions

    def __init__(self, options: ASPLOptions | None = None, context: ProtectContext | None = None):
        super().__init__(options or ASPLOptions(), context)
        self.weight_models = (self.options.model,)
        ctx = self.context
        self.model = SurrogateModel(
            f"{self.options.model}:{ctx.preset}:{ctx.weights_dir}", lambda d: load_sd_bundle(self.options.model, ctx, d)
        )

    def attack(self, images: Sequence[np.ndarray], clean_reference: Sequence[np.ndarray], identity: str) -> IdentityAttack:
        o = self.options
        seed = self.seed_for(identity)
        class_pool = load_class_images(self.model, o, self.device)
        clean_photos = self.surrogate_data(images, clean_reference)
        image_set = self.image_set(images, identity)
        parts = self.model.instantiate(self.device)
        surrogate = None
        for i in range(o.iterations):
            del surrogate  # θ' of the previous iteration: free it before the next copy exists
            surrogate, points = aspl_iteration(parts, image_set, clean_photos, class_pool, o, seed=seed, iteration=i)
            image_set.set_adv(points)
        del parts  # θ is not needed for scoring; the last θ' is what the perturbation was fitted to
        self.release(self.device)
        last = surrogate
        return self.finish(image_set, self.scorer(image_set, [lambda: nullcontext(InstanceLoss(last, o))]))
