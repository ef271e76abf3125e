"""The red-team matrix's plan (no Ray): which cells run, where their stages write, what they share."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from raypdm.pipelines.redteam import RedteamConfig, RedteamPlan, split_method, smoke_overrides
from raypdm.train.priors import ClassPriorSection, class_prior_cache


def config(**overrides) -> RedteamConfig:
    return RedteamConfig.model_validate({**smoke_overrides(), "data": "/d", "output": "/o", **overrides})


def test_every_purifier_and_mode_by_default():
    plan = RedteamPlan(config(methods=None))
    assert [c.method for c in plan.cells()] == ["none + cdl", "none + vanilla", "codesr + cdl", "codesr + vanilla"]
    assert config(methods=None).used_purifiers() == ["none", "codesr"]


def test_the_smoke_is_the_papers_baseline_against_its_method():
    plan = RedteamPlan(config())
    assert [c.method for c in plan.cells()] == ["none + vanilla", "codesr + cdl"]
    assert config().used_purifiers() == ["none", "codesr"]


def test_methods_keep_only_those_cells_and_the_purifiers_they_use():
    cfg = config(purifiers=["none", "jpeg", "codesr"], methods=["none+vanilla", "codesr + CDL"])
    assert cfg.methods == ["none + vanilla", "codesr + cdl"]  # normalised
    plan = RedteamPlan(cfg)
    assert [c.method for c in plan.cells()] == ["none + vanilla", "codesr + cdl"]
    assert cfg.used_purifiers() == ["none", "codesr"]  # jpeg: no kept method trains on it, so it is not run
    assert set(plan.mismatch_config().mismatch_groups) == {"protected", "purified_codesr"}


def test_a_chain_with_a_plus_splits_at_its_last_plus():
    assert split_method("codeformer+sr + cdl") == ("codeformer+sr", "cdl")
    cfg = config(purifiers=["none", "codeformer+sr"], methods=["codeformer+sr + vanilla"])
    assert [c.path() for c in RedteamPlan(cfg).cells()] == ["advdm/codeformer_plus_sr/vanilla/seed0"]


@pytest.mark.parametrize(("methods", "message"), [
    (["jpeg + cdl"], "not a purifier of `purifiers`"),
    (["none + dreambooth"], "mode cdl or vanilla"),
    ([], "at least one"),
])
def test_bad_methods_name_the_field(methods, message):
    with pytest.raises(ValidationError, match="methods") as err:
        config(methods=methods)
    assert message in str(err.value)


def test_every_cell_shares_one_class_prior_cache():
    plan = RedteamPlan(config())
    caches = {class_prior_cache(plan.train_config(c).class_prior, plan.train_config(c).output) for c in plan.cells()}
    assert caches == {"/o/train/_class_priors"}
    # a cache the user chose wins
    chosen = RedteamPlan(config(class_prior={"count": 2, "cache": "/shared/priors"}))
    cell = chosen.cells()[0]
    assert class_prior_cache(chosen.train_config(cell).class_prior, "/x") == "/shared/priors"


def test_the_cache_is_not_part_of_the_prior_settings():
    section = ClassPriorSection(count=3, cache="/c")
    resolved = section.resolve(preset="tiny", weights_dir=None, prompt="a photo of a person", resolution=64)
    assert resolved == ClassPriorSection(count=3).resolve(preset="tiny", weights_dir=None,
                                                          prompt="a photo of a person", resolution=64)
    assert class_prior_cache(ClassPriorSection(), "/out/models") == "/out/models/_class_priors"
