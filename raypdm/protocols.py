"""The paper's protocol by name: `paper` (its text) and `official-code` (what its public code ran).

Users set raypdm's numbers beside the paper's, so every setting that changes those numbers has a value
per protocol, here, in one table. A job picks one with `--protocol NAME` (or `protocol:` in its YAML;
default `paper`); the protocol is the lowest layer above the model defaults, so a value given in the
YAML, by `--smoke`, a flag or `--set` overrides it, and `--print-config` says where each value came
from. A row applies to every job whose config has its path (`sampling.w` reaches `sample` and
`redteam`; `train.latents` reaches `train`, `sweep` and `redteam`).

The model defaults of these fields are the `paper` values (tests/unit/test_protocols.py fails when one
drifts), so a config built in Python without the CLI is the paper's too.

Where the two protocols agree, the row still names both: the table is the record of what was checked
against the paper (`../shared/reference/paper_tables.md`, App. A.1/A.2) and against the public code
(DiffShortcut, with MetaCloak's and Anti-DreamBooth's evaluation code). The README's "Fidelity" section
is rendered from the same rows (`fidelity_rows`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import BaseModel

__all__ = ["DEFAULT_PROTOCOL", "PROTOCOLS", "SETTINGS", "Setting", "applies", "fidelity_rows", "protocol_layer"]

PROTOCOLS = ("paper", "official-code")
DEFAULT_PROTOCOL = "paper"


@dataclasses.dataclass(frozen=True)
class Setting:
    path: str  # dot path inside a job config
    paper: Any
    official_code: Any
    why: str
    # Config classes the row leaves alone although they have the path: the sweep's probe sampling is a
    # cheaper, deliberate other setting (its final evaluation is a red-team/sample run).
    not_in: tuple[str, ...] = ()

    def value(self, protocol: str) -> Any:
        return self.paper if protocol == "paper" else self.official_code


SETTINGS: tuple[Setting, ...] = (
    Setting("prompt_preset", "paper", "official-code",
            "CDL prompts. Text (§5, Table 5): token `t@j`, instance ' with {token} noisy pattern', class ' without "
            "{token} noisy pattern', negative 'noisy, abstract, pattern, low quality'. Code: token `bhj`, ', {token} "
            "noisy pattern', ', without {token} noisy pattern', negative 'noisy, lowres, artifact, pattern'."),
    Setting("sampling.scheduler", "pndm", "pndm",
            "Evaluation sampler: SD 2.1-base's own scheduler (PNDM, as its hub pipeline ships); raypdm's exports "
            "keep the training DDPM schedule, which the `model` scheduler would sample with."),
    Setting("sampling.w", 6.5, 6.5,
            "Guidance. App. A.2 and the code call the pipeline with guidance_scale 7.5; in Eq. 6's terms "
            "s = 1 + w, so w = 6.5 (Eq. 6's 'w = 7.5' read literally would be s = 8.5)."),
    Setting("sampling.steps", 100, 100, "100 inference steps (App. A.2).", not_in=("SweepConfig",)),
    Setting("sampling.num_images", 16, 16, "16 images per prompt (App. A.2).", not_in=("SweepConfig",)),
    Setting("train.latents", "sample", "sample",
            "DreamBooth latents: a fresh posterior sample of the VAE each step (the diffusers script), not the mean."),
    Setting("train.optimizer", "auto", "auto",
            "8-bit AdamW (bitsandbytes) where a GPU and bitsandbytes are present, on DeepSpeed as a client "
            "optimizer too; torch AdamW otherwise (said in the run's log)."),
    Setting("train.mixed_precision", "auto", "auto", "bf16 on a GPU (App. A.2), fp32 on a CPU."),
    Setting("train.lr", 5e-7, 5e-7, "Constant learning rate 5e-7 (App. A.2)."),
    Setting("train.steps", 1000, 1000, "1000 DreamBooth steps (App. A.2)."),
    Setting("statistics.unit", "observation", "observation",
            "Means and spreads over identities × generated images (App. A.1), tests paired by identity, prompt "
            "and seed; the public code has no test, so both follow the text."),
    Setting("statistics.alpha", 0.01, 0.01, "Table 1's stars: p ≤ 0.01."),
    Setting("statistics.test", "improvement", "improvement",
            "One-sided Wilcoxon signed-rank: 'significant improvement over the baselines'."),
)


def _field_model(model: type[BaseModel], path: str) -> bool:
    """Whether `path` names a field of `model` (walking nested pydantic models)."""
    node: Any = model
    for part in path.split("."):
        fields = getattr(node, "model_fields", None)
        if not fields or part not in fields:
            return False
        node = fields[part].annotation
    return True


def applies(setting: Setting, model: type[BaseModel]) -> bool:
    return model.__name__ not in setting.not_in and _field_model(model, setting.path)


def protocol_layer(model: type[BaseModel], protocol: str) -> dict[str, Any]:
    """The nested config data `protocol` sets for a job whose config class is `model`."""
    if protocol not in PROTOCOLS:
        from raypdm.config import ConfigError

        raise ConfigError(f"protocol: must be one of {', '.join(PROTOCOLS)} (got {protocol!r})")
    data: dict[str, Any] = {}
    for s in SETTINGS:
        if not applies(s, model):
            continue
        node = data
        parts = s.path.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = s.value(protocol)
    return data


def fidelity_rows() -> list[tuple[str, str, str, str]]:
    """(setting, paper, official-code, why) for the README's Fidelity section."""
    return [(s.path, repr(s.paper), repr(s.official_code), s.why) for s in SETTINGS]
