"""CDL prompts: exact strings of both presets, vanilla DreamBooth, overrides and template validation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from raypdm.train import PROMPT_PRESETS, CDLPrompts, cdl_prompts


def test_paper_preset_exact_strings():
    p = cdl_prompts()
    assert p == CDLPrompts() == cdl_prompts("paper")
    assert p.instance_prompt() == "a photo of sks person with t@j noisy pattern"
    assert p.class_prompt() == "a photo of a person without t@j noisy pattern"
    assert p.prior_generation_prompt() == "a photo of a person"
    assert p.sampling_prompt() == "a photo of sks person without t@j noisy pattern"
    smiling = "a smiling photo of sks person"
    assert p.sampling_prompt(smiling) == "a smiling photo of sks person without t@j noisy pattern"
    assert p.negative() == "noisy, abstract, pattern, low quality"


def test_official_code_preset_exact_strings():
    p = cdl_prompts("official-code")
    assert p.token == "bhj"
    assert p.instance_prompt() == "a photo of sks person, bhj noisy pattern"
    assert p.class_prompt() == "a photo of a person, without bhj noisy pattern"
    assert p.sampling_prompt("a photo of sks person") == "a photo of sks person, without bhj noisy pattern"
    assert p.negative() == "noisy, lowres, artifact, pattern"


@pytest.mark.parametrize("preset", sorted(PROMPT_PRESETS))
def test_without_cdl_is_vanilla_dreambooth(preset):
    p = cdl_prompts(preset, cdl=False)
    assert p.instance_prompt() == "a photo of sks person"
    assert p.class_prompt() == "a photo of a person"
    assert p.sampling_prompt("a smiling photo of sks person") == "a smiling photo of sks person"
    assert p.sampling_prompt() == "a photo of sks person"
    # The negative prompt belongs to the sampler's decoupled guidance, not to CDL training.
    assert p.negative() == cdl_prompts(preset).negative()


def test_overrides():
    p = cdl_prompts("official-code", token="xq!", identifier="ohwx", class_noun="dog")
    assert p.instance_prompt() == "a photo of ohwx dog, xq! noisy pattern"
    assert p.class_prompt() == "a photo of a dog, without xq! noisy pattern"
    assert p.prior_generation_prompt() == "a photo of a dog"
    q = cdl_prompts(
        instance_template="{identifier} the {class_noun}",
        class_template="some {class_noun}",
        instance_suffix=" + {token}",
        class_suffix=" - {token}",
        negative_prompt="{token} artifacts, {{literal}}",
    )
    assert q.instance_prompt() == "sks the person + t@j"
    assert q.class_prompt() == "some person - t@j"
    assert q.negative() == "t@j artifacts, {literal}"


@pytest.mark.parametrize(
    "overrides, field, words",
    [
        ({"instance_template": "a photo of {idd} person"}, "instance_template", "unknown placeholder"),
        ({"instance_template": "a photo of a {class_noun}"}, "instance_template", "{identifier}"),
        ({"class_template": "a photo of {identifier}"}, "class_template", "cannot be used"),
        ({"class_template": "a photo"}, "class_template", "{class_noun}"),
        ({"instance_suffix": " with noisy pattern"}, "instance_suffix", "{token}"),
        ({"class_suffix": " without {0} noisy pattern"}, "class_suffix", "bare name"),
        ({"class_suffix": " without {token!r}"}, "class_suffix", "bare name"),
        ({"negative_prompt": "noisy {"}, "negative_prompt", "malformed"),
        ({"negative_prompt": "noisy {identifier}"}, "negative_prompt", "cannot be used"),
        ({"token": ""}, "token", "empty"),
        ({"identifier": " sks"}, "identifier", "whitespace"),
        ({"class_noun": "{person}"}, "class_noun", "braces"),
    ],
)
def test_bad_templates_name_the_field(overrides, field, words):
    with pytest.raises(ValidationError) as info:
        cdl_prompts(**overrides)
    errors = info.value.errors()
    assert [e["loc"] for e in errors] == [(field,)]
    assert field in errors[0]["msg"] and words in errors[0]["msg"]


def test_unknown_field_and_preset():
    with pytest.raises(ValidationError, match="tokn"):
        cdl_prompts(tokn="x")
    with pytest.raises(ValueError, match="official-code"):
        cdl_prompts("offical")


def test_instance_and_class_prompts_must_differ():
    with pytest.raises(ValidationError, match="identical"):
        cdl_prompts(
            instance_template="a photo of a {class_noun}{identifier}",
            identifier="x",
            class_template="a photo of a {class_noun}x",
            cdl=False,
        )


def test_assignment_is_validated():
    p = cdl_prompts()
    p.token = "zz"
    assert p.instance_prompt() == "a photo of sks person with zz noisy pattern"
    with pytest.raises(ValidationError, match="instance_suffix"):
        p.instance_suffix = " with noisy pattern"
