"""FSMG, Fully-trained Surrogate Model Guidance (Van Le et al., "Anti-DreamBooth: Protecting users from
personalized text-to-image synthesis", ICCV 2023; github.com/VinAIResearch/Anti-DreamBooth,
``scripts/attack_with_fsmg.sh`` and ``attacks/fsmg.py``).

1. Fine-tune a surrogate with DreamBooth (prior preservation) on the identity's clean photos:
   ``finetune_steps`` = 1000 steps, lr 5e-7, batch 2 instance + 2 class images, text encoder trained.
2. Freeze it and run ``steps`` = 100 sign-gradient PGD steps on the images to protect, maximising the
   instance loss E_{t,ε}‖ε_θ*(z_t(E(x + δ)), t, τ("a photo of sks person")) − ε‖² (one (t, ε) draw per
   image per step, the VAE posterior sampled, as the script).

The surrogate learns from ``clean_reference`` (set_B here: the script's ``CLEAN_TRAIN_DIR``); an identity
without references trains on the clean originals of its images. Differences from the script are those
every bi-level protection shares (see ``surrogate.py``: budget in [0, 1] units with the project's
r = 11/255, α = 1/255, trainer-style resizing, fixed-draw before/after scores).
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
    InstanceLoss,
    SurrogateModel,
    SurrogateOptions,
    derive_seed,
    finetune,
    frozen,
    load_class_images,
    load_sd_bundle,
)

__all__ = ["FSMG", "FSMGOptions"]


class FSMGOptions(SurrogateOptions, frozen=True):
    """FSMG's options; defaults from ``scripts/attack_with_fsmg.sh``."""

    model: str = Field("sd21-base", description="registered base model of the surrogate")
    finetune_steps: int = Field(1000, ge=0, le=1_000_000, description="DreamBooth steps on the clean photos")
    train_batch_size: int = Field(2, ge=1, le=64, description="instance (and class) images per step (script: 2)")
    steps: int = Field(100, ge=0, le=100_000, description="PGD steps against the fine-tuned surrogate")


@register_protection("fsmg", FSMGOptions)
class FSMG(BiLevelProtection):
    name = "fsmg"
    options: FSMGOptions

    def __init__(self, options: FSMGOptions | None = None, context: ProtectContext | None = None):
        super().__init__(options or FSMGOptions(), context)
        self.weight_models = (self.options.model,)
        ctx = self.context
        self.model = SurrogateModel(
            f"{self.options.model}:{ctx.preset}:{ctx.weights_dir}", lambda d: load_sd_bundle(self.options.model, ctx, d)
        )

    def attack(self, images: Sequence[np.ndarray], clean_reference: Sequence[np.ndarray], identity: str) -> IdentityAttack:
        o = self.options
        seed = self.seed_for(identity)
        class_pool = load_class_images(self.model, o, self.device)
        parts = self.model.instantiate(self.device)
        finetune(
            parts, self.surrogate_data(images, clean_reference), class_pool, o,
            steps=o.finetune_steps, seed=derive_seed(seed, "fsmg-finetune"),
        )  # fmt: skip
        image_set = self.image_set(images, identity)
        objective = InstanceLoss(parts, o)
        with frozen(parts):
            image_set.set_adv(image_set.pgd(objective, o, o.steps, o.timesteps_per_step))
        result = self.finish(image_set, self.scorer(image_set, [lambda: nullcontext(objective)]))
        # The scorer keeps the surrogate alive for callers of attack(); protect_identity drops it.
        return result
