"""The noise-token search space and the sweep's result handling (no Ray)."""

import json
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
    pairs = [["a1", "with {token} noisy pattern"], ["b2", "with {token} noisy pattern"]]
    assert [json.loads(v) for v in grid["noise"]["grid_search"]] == pairs
    rnd = space.tune_space(None, "random", ["default"])
    assert sorted(json.loads(v) for v in rnd["noise"].categories) == pairs
    # every candidate is a plain string: Optuna's categorical distributions take nothing else
    assert all(isinstance(v, str) for v in rnd["noise"].categories)


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


# ---- the paper's Table 5 phrases (issue 32 part 5)


def _table5_from_the_reference() -> list[str]:
    """The phrases as ../shared/reference/paper_tables.md prints them (when the reference is at hand)."""
    from pathlib import Path

    ref = Path(__file__).resolve().parents[3] / "shared" / "reference" / "paper_tables.md"
    if not ref.is_file():
        pytest.skip("the paper's tables are not beside this checkout")
    text = ref.read_text(encoding="utf-8").split("## Table 5")[1].split("\n## ")[0]
    rows = [line for line in text.splitlines() if line.startswith("| ") and "IMS" not in line]
    return [line.split("|")[1].strip() for line in rows]


def test_all_fifteen_table5_phrases_ship_in_the_papers_order():
    from raypdm.search.space import TABLE5_PHRASES

    assert len(TABLE5_PHRASES) == 15 and len(set(TABLE5_PHRASES)) == 15
    assert TABLE5_PHRASES[0] == "t@j noisy pattern" and TABLE5_PHRASES[-1] == "bhi noisy perturbation"
    assert list(TABLE5_PHRASES) == _table5_from_the_reference()


def test_a_phrase_is_one_token_and_its_own_template():
    from raypdm.search.space import phrase_candidate

    assert phrase_candidate("bhi noisy perturbation") == ("bhi", "with {token} noisy perturbation")
    assert phrase_candidate("xjy image imperfection") == ("xjy", "with {token} image imperfection")
    assert phrase_candidate("t@j") == ("t@j", "with {token}")
    for bad in ("", " t@j noisy", "t@j {x}"):
        with pytest.raises(ValueError, match="noise phrase"):
            phrase_candidate(bad)
    with pytest.raises(ValueError, match="noise phrase"):
        SearchSpace(phrases=["t@j {token}"])


def test_phrase_preset_adds_fifteen_pairs_not_a_product():
    from raypdm.search.space import TABLE5_PHRASES, phrase_candidate

    space = SearchSpace(phrase_preset="table5")
    pairs = space.candidates()
    assert pairs == [phrase_candidate(p) for p in TABLE5_PHRASES]  # 15, not 5 tokens × 11 endings
    grid = space.tune_space(None, "grid", ["default"])
    assert len(grid["noise"]["grid_search"]) == 15
    both = SearchSpace(tokens=["t@j"], phrase_preset="table5").candidates()
    assert len(both) == 15  # "t@j" × the default template is Table 5's first phrase: counted once


@pytest.mark.parametrize("phrase", [
    "t@j noisy pattern", "xjy image imperfection", "UNKNOWN face degradation", "XX noisy artifact",
    "bhi noisy perturbation"])
def test_phrases_reach_the_prompts_and_the_tokenizer_as_written(phrase):
    from raypdm.models.tokenizer import tiny_clip_tokenizer
    from raypdm.search.space import class_suffix_for, phrase_candidate
    from raypdm.train.prompts import cdl_prompts

    token, template = phrase_candidate(phrase)
    # what the trial builds (raypdm/search/trial.py)
    prompts = cdl_prompts("paper", token=token, instance_suffix=" " + template, class_suffix=" " + class_suffix_for(template))
    assert prompts.instance_prompt() == f"a photo of sks person with {phrase}"
    assert prompts.class_prompt() == f"a photo of a person without {phrase}"
    assert prompts.sampling_prompt("a photo of sks person") == f"a photo of sks person without {phrase}"
    tok = tiny_clip_tokenizer()
    ids = tok(prompts.instance_prompt())["input_ids"]
    # Nothing lost or replaced on the way in. CLIP lowercases ("UNKNOWN" is the word "unknown") and splits at
    # punctuation ("t@j" is three words to it: t, @, j), so compare without the spaces decoding puts back.
    decoded = tok.decode(ids, skip_special_tokens=True)
    assert "".join(decoded.split()) == "".join(f"a photo of sks person with {phrase}".lower().split())
    assert tok.unk_token_id not in ids[1:-1]  # (CLIP's unk is its end-of-text token, last)


def test_trial_keys_of_pairs_and_of_restored_token_template_configs_agree():
    from raypdm.search.space import noise_of

    new = {"noise": json.dumps(["t@j", "with {token} noisy pattern"]), "data": "default"}
    old = {"token": "t@j", "template": "with {token} noisy pattern", "data": "default"}
    assert noise_of(new) == noise_of(old) == ("t@j", "with {token} noisy pattern")
    assert trial_key(new, "x_1") == trial_key(old, "x_1")
