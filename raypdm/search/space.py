"""The noise-token search space: tokens (listed, preset, or generated) × suffix templates, whole noise
phrases (the paper's Table 5), guidance weights, negative prompts and training-data variants.

A noise candidate — a (token, template) pair — changes the fine-tune (it is in the instance and class
prompts); a guidance weight w and a negative prompt change only sampling. So candidates and data
variants are Ray Tune dimensions (`noise`: each candidate as a JSON pair, a plain string that grid, random
and Optuna search all accept; `data`), while every (w, negative prompt) pair is evaluated inside each trial
from the same trained model (see `raypdm.search.trial`).

A *phrase* is the paper's V_N* written whole, e.g. "xjy image imperfection": its first word is the token
and the rest follows it, so the instance prompt gets "with xjy image imperfection" and the class prompt
"without xjy image imperfection" (`phrase_candidate`). Table 5's 15 phrases are pairs, not a product of
5 tokens × 11 endings, so they are their own list (`phrase_preset: table5`). CLIP's tokenizer lowercases
its input and splits it at punctuation: "UNKNOWN face degradation" reaches the model as the common word
"unknown", and "t@j" as the three words t, @, j — as in the paper's runs (same tokenizer).
"""

from __future__ import annotations

import itertools
import json
import random
import string
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from raypdm.config import StrictModel, Uri

__all__ = ["PHRASE_PRESETS", "TABLE5_PHRASES", "TOKEN_PRESETS", "SearchSpace", "class_suffix_for", "generated_tokens",
           "noise_of", "phrase_candidate", "rare_tokens", "random_tokens"]

# The paper's Table 5 (paper_tables.md), ranked by Avg.: "t@j noisy pattern" best, "bhi noisy perturbation"
# worst. Each is one whole noise phrase V_N*, spelled as the paper wrote it.
TABLE5_PHRASES: tuple[str, ...] = (
    "t@j noisy pattern",
    "xjy image imperfection",
    "xjy visual interference",
    "xjy visual distortion",
    "xjy image artifact",
    "xjy digital glitch",
    "UNKNOWN face degradation",
    "xjy image disturbance",
    "xjy image corruption",
    "xjy image degradation",
    "UNKNOWN noisy pattern",
    "xjy visual anomaly",
    "XX noisy artifact",
    "xjy visual noise",
    "bhi noisy perturbation",
)
PHRASE_PRESETS: dict[str, tuple[str, ...]] = {"table5": TABLE5_PHRASES}
# The tokens of Table 5's phrases, the public code's "bhj" and the DreamBooth identifier "sks" (each with
# every template of the space).
TOKEN_PRESETS: dict[str, list[str]] = {
    "paper": ["t@j", "xjy", "UNKNOWN", "XX", "bhi", "bhj", "sks"],
}
DEFAULT_TEMPLATES = ("with {token} noisy pattern",)
_RANDOM_ALPHABET = string.ascii_lowercase + string.digits + "@#$%&*"


def phrase_candidate(phrase: str) -> tuple[str, str]:
    """A whole noise phrase as a (token, instance-suffix template) pair: "xjy image imperfection" ->
    ("xjy", "with {token} image imperfection"). Errors name the phrase."""
    words = phrase.split()
    if not words or phrase != phrase.strip() or "{" in phrase or "}" in phrase:
        raise ValueError(f"noise phrase {phrase!r} must be non-empty words without outer spaces or braces")
    return words[0], " ".join(["with {token}", *words[1:]])


def noise_of(config: dict[str, Any]) -> tuple[str, str]:
    """A trial config's (token, template): from its `noise` pair, or from `token`/`template` (a sweep
    started before candidates were pairs, restored)."""
    if "noise" in config:
        token, template = json.loads(config["noise"])
        return str(token), str(template)
    return config["token"], config["template"]


def class_suffix_for(template: str) -> str:
    """The class-prompt suffix that contrasts with an instance suffix: "with X" -> "without X"."""
    t = template.strip()
    if t.startswith("with "):
        return "without " + t[len("with "):]
    return "without " + t


def rare_tokens(tokenizer, count: int, seed: int = 0, max_chars: int = 4) -> list[str]:
    """Short whole-word vocabulary entries from the end of the BPE merge order (the rarest merges),
    the way DreamBooth picked "sks": short, rarely seen, one token. Deterministic for a seed."""
    if count <= 0:
        return []
    vocab = tokenizer.get_vocab()
    special = set(getattr(tokenizer, "all_special_tokens", []))
    words = []
    for tok, idx in vocab.items():
        if tok in special or not tok.endswith("</w>"):
            continue
        word = tok[: -len("</w>")]
        if 2 <= len(word) <= max_chars and word.isascii() and word.isprintable() and " " not in word and "{" not in word and "}" not in word:
            words.append((idx, word))
    words.sort(reverse=True)  # highest ids = latest merges = rarest
    pool = [w for _, w in words[: max(count * 20, 50)]]
    rng = random.Random(seed)
    rng.shuffle(pool)
    return sorted(pool[:count])


def random_tokens(count: int, length: int = 3, seed: int = 0) -> list[str]:
    """Random short strings like "t@j" (letters, digits and a few symbols), deterministic for a seed."""
    rng = random.Random(seed + 7919)
    out: list[str] = []
    while len(out) < count:
        s = "".join(rng.choice(_RANDOM_ALPHABET) for _ in range(length))
        if s not in out and s[0].isalpha():
            out.append(s)
    return out


def generated_tokens(space: SearchSpace, tokenizer=None) -> list[str]:
    rare = rare_tokens(tokenizer, space.rare_tokens, space.seed) if (tokenizer is not None and space.rare_tokens) else []
    return rare + random_tokens(space.random_tokens, space.random_length, space.seed)


class SearchSpace(StrictModel):
    tokens: list[str] = Field(default_factory=list, description="noise tokens to try (each with every template)")
    token_preset: str | None = Field(None, description=f"add a preset list: {sorted(TOKEN_PRESETS)}")
    phrases: list[str] = Field(default_factory=list,
                               description="whole noise phrases, e.g. 'xjy image imperfection' (first word = token)")
    phrase_preset: Literal["table5"] | None = Field(None, description="add the paper's 15 Table 5 phrases")
    rare_tokens: int = Field(0, ge=0, le=1000, description="add N rare tokenizer tokens")
    random_tokens: int = Field(0, ge=0, le=1000, description="add N random short strings")
    random_length: int = Field(3, ge=1, le=12)
    seed: int = Field(0, ge=0, description="seed of the generated candidates")
    templates: list[str] = Field(default_factory=lambda: list(DEFAULT_TEMPLATES), min_length=1,
                                 description="instance-suffix templates with {token}; the class suffix is 'without …'")
    w: list[float] = Field(default_factory=lambda: [7.5], min_length=1, description="decoupled-guidance weights")
    w_range: tuple[float, float, int] | None = Field(None, description="(low, high, count): adds evenly spaced w values")
    negative_prompts: list[str] = Field(default_factory=lambda: ["noisy, abstract, pattern, low quality"], min_length=1)
    data: dict[str, Uri] = Field(default_factory=dict,
                                 description="training-data variants, name -> dataset URI (protection × purifier)")

    @field_validator("tokens")
    @classmethod
    def _clean_tokens(cls, v: list[str]) -> list[str]:
        for t in v:
            if not t.strip() or t != t.strip() or "{" in t or "}" in t:
                raise ValueError(f"token {t!r} must be non-empty, without outer spaces or braces")
        return v

    @field_validator("phrases")
    @classmethod
    def _clean_phrases(cls, v: list[str]) -> list[str]:
        for p in v:
            phrase_candidate(p)
        return v

    @field_validator("token_preset")
    @classmethod
    def _known_preset(cls, v: str | None) -> str | None:
        if v is not None and v not in TOKEN_PRESETS:
            raise ValueError(f"unknown token preset {v!r}; choose one of {sorted(TOKEN_PRESETS)}")
        return v

    @field_validator("templates")
    @classmethod
    def _has_token(cls, v: list[str]) -> list[str]:
        for t in v:
            if "{token}" not in t:
                raise ValueError(f"template {t!r} must contain {{token}}")
        return v

    @field_validator("w")
    @classmethod
    def _non_negative(cls, v: list[float]) -> list[float]:
        if any(x < 0 for x in v):
            raise ValueError(f"guidance weights must be >= 0, got {v}")
        return v

    @model_validator(mode="after")
    def _some_token(self) -> SearchSpace:
        if not (self.tokens or self.token_preset or self.rare_tokens or self.random_tokens or self.phrases
                or self.phrase_preset):
            raise ValueError("the search needs candidates: tokens, token_preset, rare_tokens, random_tokens, "
                             "phrases or phrase_preset")
        return self

    def w_values(self) -> list[float]:
        values = list(self.w)
        if self.w_range is not None:
            lo, hi, n = self.w_range
            if n < 1 or hi < lo or lo < 0:
                raise ValueError(f"w_range must be (low >= 0, high >= low, count >= 1), got {self.w_range}")
            values += [lo + (hi - lo) * i / max(1, n - 1) for i in range(int(n))]
        return sorted(dict.fromkeys(round(v, 6) for v in values))

    def candidate_tokens(self, tokenizer=None) -> list[str]:
        out = list(self.tokens) + list(TOKEN_PRESETS.get(self.token_preset or "", [])) + generated_tokens(self, tokenizer)
        return list(dict.fromkeys(out))

    def candidate_phrases(self) -> list[str]:
        return list(dict.fromkeys([*self.phrases, *PHRASE_PRESETS.get(self.phrase_preset or "", ())]))

    def candidates(self, tokenizer=None) -> list[tuple[str, str]]:
        """Every (token, template) to fine-tune: tokens × templates, then each phrase's own pair."""
        pairs = list(itertools.product(self.candidate_tokens(tokenizer), self.templates))
        pairs += [phrase_candidate(p) for p in self.candidate_phrases()]
        return list(dict.fromkeys(pairs))

    def tune_space(self, tokenizer, search: str, data_names: list[str]) -> dict[str, Any]:
        """Ray Tune's param_space: grid_search for a grid, choice for random/Optuna."""
        from ray import tune

        noise = [json.dumps([token, template], ensure_ascii=False) for token, template in self.candidates(tokenizer)]
        dims = {"noise": noise, "data": data_names}
        if search == "grid":
            return {k: tune.grid_search(v) for k, v in dims.items()}
        return {k: tune.choice(v) for k, v in dims.items()}
