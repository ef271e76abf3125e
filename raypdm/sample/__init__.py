"""Sampling personalized models: decoupled negative guidance (paper Eq. 6)."""

from raypdm.sample.decoupled import (
    DEFAULT_PROMPTS,
    DecoupledSampler,
    SamplingConfig,
    cfg_scale_for,
    decoupled_noise_pred,
    positive_prompt,
    seeds_for,
    w_for_cfg_scale,
)

__all__ = [
    "DEFAULT_PROMPTS",
    "DecoupledSampler",
    "SamplingConfig",
    "cfg_scale_for",
    "decoupled_noise_pred",
    "positive_prompt",
    "seeds_for",
    "w_for_cfg_scale",
]
