"""The noise-token search space and the sweep's result handling (no Ray)."""

import math
import os

import pandas as pd
import pytest

from raypdm.search.space import SearchSpace, class_suffix_for, random_tokens, rare_tokens
from raypdm.search.sweep import SweepConfig, best_configuration, collect_results
from raypdm.search.trial import ROW_COLUMNS, _write_rows, objective, trial_key


def test_class_suffix_contrasts_the_instance_suffix():
    assert class_suffix_for("with {token} noisy pattern") == "without {token} noisy pattern"
    assert class_suffix_for("{token} artifacts") == "without {token} artifacts"


def test_generated_candidates_are_deterministic_and_distinct():
    a, b = random_tokens(5, 3, seed=1), random_tokens(5, 3, seed=1)
    assert a == b and len(set(a)) == 5 and all(len(t) == 3 for t in a)
    assert random_tokens(5, 3, seed=2) != a
    from raypdm.models.tokenizer import tiny_clip_tokenizer

    tok = tiny_clip_tokenizer()
    rare = rare_tokens(tok, 3, seed=0)
    assert len(rare) == 3 and rare == rare_tokens(tok, 3, seed=0)
    for t in rare:  # each candidate is one whole-word entry of the vocabulary
        assert f"{t}</w>" in tok.get_vocab()


def test_space_validation_names_the_field():
    with pytest.raises(ValueError, match="candidates"):
        SearchSpace()
    with pytest.raises(ValueError, match=r"\{token\}"):
        SearchSpace(tokens=["t@j"], templates=["noisy pattern"])
    with pytest.raises(ValueError, match="unknown token preset"):
        SearchSpace(token_preset="nope")
    space = SearchSpace(tokens=["t@j", "t@j"], token_preset="paper", w=[7.5], w_range=(1.0, 3.0, 3))
    assert space.candidate_tokens()[0] == "t@j" and space.candidate_tokens().count("t@j") == 1
    assert space.w_values() == [1.0, 2.0, 3.0, 7.5]


def test_tune_space_grid_and_choice():
    space = SearchSpace(tokens=["a1", "b2"], templates=["with {token} noisy pattern"])
    grid = space.tune_space(None, "grid", ["default"])
    assert grid["token"] == {"grid_search": ["a1", "b2"]}
    rnd = space.tune_space(None, "random", ["default"])
    assert sorted(rnd["token"].categories) == ["a1", "b2"]


def test_objective_and_trial_key():
    assert objective({"ims": 0.5, "q": 0.25}, "ims+q") == 0.75
    assert math.isnan(objective({"q": 0.1}, "ims"))
    k = trial_key({"token": "t@j", "template": "with {token} noisy pattern", "data": "default", "extra": 1})
    assert k == trial_key({"token": "t@j", "template": "with {token} noisy pattern", "data": "default"})
    # two trials that draw the same point keep apart; one trial keeps its key across restarts
    point = {"token": "t@j", "template": "with {token} noisy pattern", "data": "default"}
    assert trial_key(point, "abc_00000") != trial_key(point, "abc_00001")
    assert trial_key(point, "abc_00000") == trial_key(dict(point), "abc_00000")
    assert trial_key(point, "abc_00000").startswith(k)


def _row(trial, token, identity, w, score, final=True, step=2):
    return {"trial": trial, "token": token, "template": "with {token} noisy pattern", "data": "default",
            "identity": identity, "w": w, "negative_prompt": "n", "final": final, "step": step,
            "steps_trained": step, "ims": score, "ims_ip": score, "ims_vgg": score, "q": 0.0, "liqe": 0.0,
            "clip_iqac": 0.0, "fdfr": 0.0, "score": score, "images": 1, "seconds": 1.0}


def test_results_schema_status_and_best(tmp_path):
    out = str(tmp_path)
    _write_rows(out, "t1", 0, [_row("t1", "t@j", "a", 3.0, 0.1, final=False, step=1)])
    _write_rows(out, "t1", 1, [_row("t1", "t@j", "a", 3.0, 0.2), _row("t1", "t@j", "a", 7.5, 0.6)])
    _write_rows(out, "t2", 0, [_row("t2", "bhi", "a", 3.0, 0.3, final=False, step=1)])
    _write_rows(out, "t2", 1, [_row("t2", "bhi", "a", 3.0, 0.95)])  # stopped after one identity: not comparable
    _write_rows(out, "old", 0, [_row("old", "zzz", "a", 3.0, 0.9)])  # not in this sweep's trial table
    trials = pd.DataFrame([
        {"trial": "t1", "token": "t@j", "template": "x", "data": "default", "status": "done", "error": None},
        {"trial": "t2", "token": "bhi", "template": "x", "data": "default", "status": "stopped", "error": None},
        {"trial": "t3", "token": "bad", "template": "x", "data": "default", "status": "error", "error": "boom"},
    ])
    res = collect_results(out, trials)
    assert set(ROW_COLUMNS) <= set(res.columns) and {"status", "stopped_early", "error"} <= set(res.columns)
    assert "zzz" not in set(res["token"])
    assert res[res["trial"] == "t2"]["stopped_early"].all()
    assert res[res["trial"] == "t3"]["error"].tolist() == ["boom"]
    best = best_configuration(res)
    assert best["token"] == "t@j" and best["w"] == 7.5 and best["score"] == pytest.approx(0.6)


def test_sweep_config_needs_data():
    with pytest.raises(ValueError, match="data"):
        SweepConfig(output="o", reference="r", space={"tokens": ["a1"]})
    cfg = SweepConfig(output="o", reference="r", data="d", space={"tokens": ["a1"], "data": {"x": "e"}})
    # Relative paths are absolute from the config on (against the working directory).
    assert cfg.data_uris() == {"default": os.path.abspath("d"), "x": os.path.abspath("e")}
