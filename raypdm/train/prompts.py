"""Contrastive Decoupling Learning (CDL) prompts: the noise token that soaks up the protection.

CDL (paper §5) trains the instance images with "... with {token} noisy pattern" and the class-prior
images with "... without {token} noisy pattern", so the perturbation's look binds to the token instead
of the identity; sampling then asks for the identity "without {token} noisy pattern" and pushes away
from a negative prompt (decoupled guidance, Eq. 6). `cdl=False` is vanilla DreamBooth.

    p = cdl_prompts()                        # the paper's strings
    p.instance_prompt()   # 'a photo of sks person with t@j noisy pattern'
    p.class_prompt()      # 'a photo of a person without t@j noisy pattern'
    cdl_prompts("official-code", token="xyz")   # the paper's public code, another token
"""

from __future__ import annotations

import string
from typing import Any

from pydantic import field_validator, model_validator

from raypdm.config import StrictModel

__all__ = ["CDLPrompts", "PROMPT_PRESETS", "cdl_prompts"]

# Placeholders each template may use, and the ones it must use to mean anything.
_KNOWN = ("identifier", "class_noun", "token")
_ALLOWED: dict[str, tuple[str, ...]] = {
    "instance_template": ("identifier", "class_noun"),
    "class_template": ("class_noun",),
    "instance_suffix": ("token", "class_noun"),
    "class_suffix": ("token", "class_noun"),
    "negative_prompt": ("token", "class_noun"),
}
_REQUIRED: dict[str, tuple[str, ...]] = {
    "instance_template": ("identifier",),
    "class_template": ("class_noun",),
    "instance_suffix": ("token",),
    "class_suffix": ("token",),
    "negative_prompt": (),
}


def _placeholders(field: str, template: str) -> set[str]:
    """Names used as `{name}`; anything else in braces (positional, attributes, specs) is an error."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:  # a lone '{' or '}'
        hint = "write literal braces as {{ }}"
        raise ValueError(f"{field}: malformed template {template!r} ({exc}; {hint})") from None
    names: set[str] = set()
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(f"{field}: placeholder {{{name}}} in {template!r} must be a bare name like {{token}}")
        names.add(name)
    return names


class CDLPrompts(StrictModel):
    """The prompt strings of one DreamBooth(+CDL) run. Every template is checked when it is set."""

    identifier: str = "sks"
    class_noun: str = "person"
    token: str = "t@j"
    instance_template: str = "a photo of {identifier} {class_noun}"
    class_template: str = "a photo of a {class_noun}"
    instance_suffix: str = " with {token} noisy pattern"
    class_suffix: str = " without {token} noisy pattern"
    negative_prompt: str = "noisy, abstract, pattern, low quality"
    cdl: bool = True

    @field_validator("identifier", "class_noun", "token")
    @classmethod
    def _word(cls, value: str, info) -> str:
        if not value.strip():
            raise ValueError(f"{info.field_name}: must not be empty")
        if value != value.strip():
            raise ValueError(f"{info.field_name}: {value!r} has leading or trailing whitespace")
        if "{" in value or "}" in value:
            raise ValueError(f"{info.field_name}: {value!r} must not contain braces")
        return value

    @field_validator(*_ALLOWED)
    @classmethod
    def _template(cls, value: str, info) -> str:
        field = info.field_name
        names = _placeholders(field, value)
        unknown = names - set(_KNOWN)
        if unknown:
            raise ValueError(
                f"{field}: unknown placeholder(s) {sorted(unknown)} in {value!r}; known: {list(_KNOWN)}"
            )
        misplaced = names - set(_ALLOWED[field])
        if misplaced:
            raise ValueError(f"{field}: {sorted(misplaced)} cannot be used here; allowed: {list(_ALLOWED[field])}")
        missing = set(_REQUIRED[field]) - names
        if missing:
            raise ValueError(f"{field}: {value!r} must contain {', '.join('{' + m + '}' for m in sorted(missing))}")
        return value

    @model_validator(mode="after")
    def _distinct(self) -> CDLPrompts:
        # The instance and class prompts must differ, or prior preservation teaches the identity to the class.
        if self.instance_prompt() == self.class_prompt():
            prompt = self.instance_prompt()
            raise ValueError(f"instance_template: instance and class prompts are identical ({prompt!r})")
        return self

    def _fill(self, template: str) -> str:
        return template.format(identifier=self.identifier, class_noun=self.class_noun, token=self.token)

    def instance_prompt(self) -> str:
        """The prompt of the identity's (protected) training images."""
        base = self._fill(self.instance_template)
        return base + self._fill(self.instance_suffix) if self.cdl else base

    def class_prompt(self) -> str:
        """The prompt of the class-prior images during training."""
        base = self._fill(self.class_template)
        return base + self._fill(self.class_suffix) if self.cdl else base

    def prior_generation_prompt(self) -> str:
        """The prompt the base model generates the class-prior images with (no suffix: they are clean)."""
        return self._fill(self.class_template)

    def sampling_prompt(self, base: str | None = None) -> str:
        """A generation prompt (default: the instance template) asking for the identity without the noise.

        `base` is used as written; under CDL the class suffix ("without {token} noisy pattern") is added.
        """
        prompt = self._fill(self.instance_template) if base is None else base
        return prompt + self._fill(self.class_suffix) if self.cdl else prompt

    def negative(self) -> str:
        """The negative prompt c_neg of decoupled sampling (Eq. 6); how much it weighs is the sampler's w."""
        return self._fill(self.negative_prompt)


PROMPT_PRESETS: dict[str, dict[str, Any]] = {
    # The paper's text (§5, Table 5's best token).
    "paper": {},
    # What the paper's public code ran.
    "official-code": {
        "token": "bhj",
        "instance_suffix": ", {token} noisy pattern",
        "class_suffix": ", without {token} noisy pattern",
        "negative_prompt": "noisy, lowres, artifact, pattern",
    },
}


def cdl_prompts(preset: str = "paper", **overrides: Any) -> CDLPrompts:
    """A named prompt preset with field overrides (`cdl_prompts("paper", token="xyz", cdl=False)`)."""
    if preset not in PROMPT_PRESETS:
        raise ValueError(f"unknown prompt preset {preset!r}; choose one of {sorted(PROMPT_PRESETS)}")
    return CDLPrompts(**{**PROMPT_PRESETS[preset], **overrides})
