"""DreamBooth + Contrastive Decoupling Learning: prompts and the single-process training core."""

from raypdm.train.dreambooth import (
    DreamBoothTrainer,
    StepLosses,
    TrainConfig,
    dreambooth_loss,
    encode_latents,
    encode_prompts,
    training_target,
)
from raypdm.train.prompts import PROMPT_PRESETS, CDLPrompts, cdl_prompts

__all__ = [
    "CDLPrompts",
    "DreamBoothTrainer",
    "PROMPT_PRESETS",
    "StepLosses",
    "TrainConfig",
    "cdl_prompts",
    "dreambooth_loss",
    "encode_latents",
    "encode_prompts",
    "training_target",
]
