"""The purify stage on a local Ray: faithfulness columns (vs input and vs a clean reference), the CodeSR
chain in the "fused" and "pools" layouts, the LPIPS weights check, and images too small to score."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
from PIL import Image

from raypdm.config import config_hash
from raypdm.data.decode import decode_image, encode_png
from raypdm.data.manifest import Manifest
from raypdm.data.synthetic import make_synthetic
from raypdm.metrics.faithfulness import FaithfulnessScorer
from raypdm.pipelines.purify import PurifyConfig, purify_stage, run_purify

pytestmark = pytest.mark.ray

METRICS = ["lpips", "ssim", "ms_ssim", "psnr"]
REF_METRICS = [f"ref_{m}" for m in METRICS]
SR_FAST = {"steps": 2, "low_res": 32}


def _read(path) -> np.ndarray:
    with open(path, "rb") as f:
        return decode_image(f.read())


def _rows(out) -> dict[tuple[str, str], dict]:
    rows = Manifest(str(out)).read().to_pylist()
    keyed = {(r["identity"], r["name"]): r for r in rows}
    assert len(keyed) == len(rows), "a row appears twice"
    return keyed


def _assert_scores(row: dict, expected: dict[str, float], prefix: str = "") -> None:
    for m in METRICS:
        got, want = row[prefix + m], expected[m]
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5), (prefix + m, got, want)


@pytest.fixture(scope="module")
def scorer() -> FaithfulnessScorer:
    return FaithfulnessScorer(device="cpu", lpips_pretrained=False)


# ------------------------------------------------------------------- faithfulness vs a clean reference


@pytest.fixture(scope="module")
def reference_run(ray_local, tmp_path_factory):
    """Input: JPEG'ed copies (.jpg) of a clean synthetic set (.png), which is the reference.

    id000/0000.jpg  reference 0000.png (found by stem)
    id000/0001.jpg  reference 0001.png, stored at 48 px (resized to the output's size to compare)
    id000/extra.png reference extra.png (exact name), another image
    id001/0000.jpg  no reference file                       -> ref_* NaN
    id001/0001.jpg  two candidates, 0001.png and 0001.bmp    -> ambiguous, ref_* NaN
    id001/tiny.jpg  24 px input (reference 24 px too)        -> purified, every score NaN
    id001/narrow.png 64 x 20 px input (reference 64 px)       -> purified, every score NaN
    """
    tmp = tmp_path_factory.mktemp("reference")
    clean, data, out = tmp / "clean", tmp / "data", tmp / "out"
    make_synthetic(str(clean), identities=2, images=2, size=64, seed=3, splits=("set_A",))
    for png in sorted(clean.rglob("*.png")):
        target = data / png.relative_to(clean).with_suffix(".jpg")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(png).convert("RGB").save(target, format="JPEG", quality=40)
    a, b = clean / "id000" / "set_A", clean / "id001" / "set_A"
    Image.open(a / "0001.png").resize((48, 48), Image.BICUBIC).save(a / "0001.png")
    shutil.copy(b / "0000.png", data / "id000" / "set_A" / "extra.png")  # an input that is a PNG...
    shutil.copy(b / "0001.png", a / "extra.png")  # ...whose same-named reference is another image
    (b / "0000.png").unlink()
    Image.open(b / "0001.png").save(b / "0001.bmp")
    tiny = make_synthetic(str(tmp / "tiny"), identities=2, images=1, size=24, seed=3, splits=("set_A",))[1]
    shutil.copy(tiny, b / "tiny.png")
    Image.open(tiny).convert("RGB").save(data / "id001" / "set_A" / "tiny.jpg", format="JPEG", quality=40)
    narrow = np.zeros((20, 64, 3), np.uint8) + np.arange(64, dtype=np.uint8)[None, :, None] * 3
    (data / "id001" / "set_A" / "narrow.png").write_bytes(encode_png(narrow))  # 64 wide but 20 high
    shutil.copy(a / "0000.png", b / "narrow.png")

    cfg = PurifyConfig(input=str(data), output=str(out), purifier="jpeg", options={"jpeg": {"quality": 60}},
                       splits=["set_A"], reference=str(clean), lpips_backbone="random", batch_size=2)
    summary = run_purify(cfg)
    return cfg, summary, _rows(out), clean


def test_faithfulness_columns_equal_a_direct_computation(reference_run, scorer):
    cfg, summary, rows, _ = reference_run
    assert (summary.total, summary.processed, summary.errors) == (7, 7, 0)
    assert set(rows) == {("id000", "0000.jpg"), ("id000", "0001.jpg"), ("id000", "extra.png"),
                         ("id001", "0000.jpg"), ("id001", "0001.jpg"), ("id001", "tiny.jpg"), ("id001", "narrow.png")}
    table = Manifest(cfg.output).read()
    assert set(METRICS + REF_METRICS) <= set(table.column_names)
    for name in METRICS + REF_METRICS:
        assert str(table.schema.field(name).type) == "double"
    for key, row in rows.items():
        assert row["error"] is None and row["stage"] == "jpeg"
        if key[1] in ("tiny.jpg", "narrow.png"):
            continue  # too small to score: see below
        output, source = _read(row["uri"]), _read(row["src_uri"])
        _assert_scores(row, scorer.score([output], [source])[0])
        assert 0 < row["lpips"] and 0 < row["ssim"] < 1 and 0 < row["ms_ssim"] < 1 and 15 < row["psnr"] < 60


def test_reference_columns_compare_with_the_clean_image(reference_run, scorer):
    _, _, rows, clean = reference_run
    found = {
        ("id000", "0000.jpg"): clean / "id000" / "set_A" / "0000.png",
        ("id000", "0001.jpg"): clean / "id000" / "set_A" / "0001.png",  # 48 px
        ("id000", "extra.png"): clean / "id000" / "set_A" / "extra.png",
    }
    for key, ref_path in found.items():
        row = rows[key]
        output, ref = _read(row["uri"]), _read(ref_path)
        expected = scorer.score([output], [ref])[0]
        _assert_scores(row, expected, prefix="ref_")
        assert row["ref_psnr"] != pytest.approx(row["psnr"])  # the clean image, not the input
    # extra.png's same-named reference is a different face: far worse than vs its own input.
    assert rows[("id000", "extra.png")]["ref_psnr"] < rows[("id000", "extra.png")]["psnr"] - 5
    # A JPEG'ed input is closer to its clean original than to any other image.
    assert rows[("id000", "0000.jpg")]["ref_psnr"] > rows[("id000", "extra.png")]["ref_psnr"] + 5


def test_missing_or_ambiguous_reference_gives_nan_not_an_error(reference_run):
    _, _, rows, _ = reference_run
    for key in [("id001", "0000.jpg"), ("id001", "0001.jpg")]:
        row = rows[key]
        assert row["error"] is None and row["uri"]
        assert all(math.isnan(row[m]) for m in REF_METRICS), {m: row[m] for m in REF_METRICS}
        assert all(math.isfinite(row[m]) for m in METRICS)


# --------------------------------------------------------------------------- images too small to score


def test_images_below_32_px_are_purified_with_nan_scores(reference_run):
    _, _, rows, _ = reference_run
    for key in [("id001", "tiny.jpg"), ("id001", "narrow.png")]:
        row = rows[key]
        assert row["error"] is None and row["error_kind"] is None
        output, source = _read(row["uri"]), _read(row["src_uri"])
        assert output.shape == source.shape and min(output.shape[:2]) < 32
        assert all(math.isnan(row[m]) for m in METRICS + REF_METRICS), {m: row[m] for m in METRICS + REF_METRICS}


# ------------------------------------------------------------------------------ CodeSR: fused vs pools


@pytest.mark.slow
def test_codesr_fused_and_pools_layouts_agree(ray_local, tmp_path, scorer):
    data = tmp_path / "data"
    make_synthetic(str(data), identities=2, images=2, size=64, seed=7)  # set_B/C exist but are not selected
    base = dict(input=str(data), purifier="codesr", preset="tiny", splits=["set_A"], options={"sr": SR_FAST},
                batch_size=2, lpips_backbone="random")
    # Scores (one more actor) only on the pools run, to keep the test short; pixels do not depend on them.
    # Pools is where they can go wrong: the original input must travel through both pools to the scorer.
    fused = PurifyConfig(output=str(tmp_path / "fused"), chain_layout="fused", faithfulness=False, **base)
    pools = PurifyConfig(output=str(tmp_path / "pools"), chain_layout="pools", **base)

    stages = {cfg.chain_layout: purify_stage(cfg) for cfg in (fused, pools)}
    assert callable(stages["fused"].make_transform)  # one actor runs the whole chain
    assert isinstance(stages["pools"].make_transform, list) and len(stages["pools"].make_transform) == 2
    assert stages["pools"].make_scorer is not None and stages["fused"].make_scorer is None
    for stage in stages.values():
        assert stage.name == "codeformer+sr"
        assert stage.uses_model
        assert stage.config["purifier"] == ["codeformer", "sr"]
        assert stage.config["options"]["sr"]["steps"] == 2 and stage.config["options"]["codeformer"]["fidelity_weight"] == 0.5
        assert stage.config_hash == config_hash(stage.config)
    # The layout is placement, not output: one hash, so a run resumes whichever layout wrote it.
    fused_scored = purify_stage(fused.model_copy(update={"faithfulness": True}))
    assert fused_scored.config_hash == stages["pools"].config_hash
    assert stages["pools"].config_hash != stages["fused"].config_hash  # scores on/off is another key
    steps3 = pools.model_copy(update={"options": {"sr": {**SR_FAST, "steps": 3}}})
    assert purify_stage(steps3).config_hash != stages["pools"].config_hash
    # codeformer's own options reach its pool (and only its pool).
    with_cf = pools.model_copy(update={"options": {"sr": SR_FAST, "codeformer": {"fidelity_weight": 0.7}}})
    makers = purify_stage(with_cf).make_transform
    assert [m.keywords["options"] for m in makers] == [{"codeformer": {"fidelity_weight": 0.7}}, {"sr": SR_FAST}]

    outputs = {}
    for cfg in (fused, pools):
        summary = run_purify(cfg)
        assert (summary.total, summary.processed, summary.errors, summary.skipped) == (4, 4, 0, 0)
        rows = Manifest(cfg.output).read().to_pylist()
        keys = [(r["identity"], r["split"], r["name"]) for r in rows]
        assert sorted(keys) == [(i, "set_A", n) for i in ("id000", "id001") for n in ("0000.png", "0001.png")]
        assert all(r["error"] is None for r in rows), [r["error"] for r in rows]
        assert {r["stage"] for r in rows} == {"codeformer+sr"}
        assert {r["config_hash"] for r in rows} == {stages[cfg.chain_layout].config_hash}
        assert all(r["seconds"] > 0 for r in rows)
        assert len(list((tmp_path / cfg.chain_layout).rglob("*.png"))) == 4
        outputs[cfg.chain_layout] = {k: _read(r["uri"]) for k, r in zip(keys, rows)}
        columns = Manifest(cfg.output).read().column_names
        assert not set(REF_METRICS) & set(columns), "no reference: no ref_* columns"
        if cfg.faithfulness:  # vs the chain's input, the original image (not CodeFormer's output)
            for r in rows:
                _assert_scores(r, scorer.score([_read(r["uri"])], [_read(r["src_uri"])])[0])
        else:
            assert not set(METRICS) & set(columns)
    for key, image in outputs["fused"].items():
        assert image.shape == (64, 64, 3)
        assert not np.array_equal(image, _read(data / key[0] / key[1] / key[2])), "the chain changed nothing"
        # Same seeded models and batches; the layouts run with different torch thread counts (one actor
        # with both cores vs one core per pool), so float sums differ by ulps: at most one grey level.
        diff = np.abs(image.astype(int) - outputs["pools"][key].astype(int))
        assert diff.max() <= 1 and diff.mean() < 0.05, (key, diff.max(), diff.mean())


# ----------------------------------------------------------------------------- config checks up front


def test_pretrained_lpips_without_alexnet_weights_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    data, out = tmp_path / "data", tmp_path / "out"
    make_synthetic(str(data), identities=1, images=1, size=32, splits=("set_A",))
    cfg = PurifyConfig(input=str(data), output=str(out), purifier="jpeg", lpips_backbone="pretrained")
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth") as err:
        purify_stage(cfg)
    assert str(tmp_path / "empty-torch-home") in str(err.value)
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth"):
        run_purify(cfg)
    assert not out.exists(), "nothing may be written before the check"
    # Without faithfulness scores, or with the random trunk, no weights are needed.
    assert purify_stage(cfg.model_copy(update={"faithfulness": False})).make_scorer is None
    assert purify_stage(cfg.model_copy(update={"lpips_backbone": "random"})).make_scorer is not None


def test_bad_sr_prompt_template_fails_at_config_time(tmp_path):
    with pytest.raises(ValueError, match=r"prompt_template.*\{class_noun\}"):
        PurifyConfig(input=str(tmp_path), output=str(tmp_path / "o"), purifier="codesr",
                     options={"sr": {"prompt_template": "a photo of a person"}})
    with pytest.raises(ValueError, match="noise_level"):
        PurifyConfig(input=str(tmp_path), output=str(tmp_path / "o"), purifier="codesr",
                     options={"sr": {"noise_level": 351}})
