"""`raypdm evaluate` on a local Ray cluster with tiny random scorers: schema, error rows, resume, tables."""


import pandas as pd
import pytest

from raypdm.data.manifest import Manifest
from raypdm.data.synthetic import make_synthetic
from raypdm.pipelines.evaluate import EvaluateConfig, run_evaluate

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval") / "data"
    make_synthetic(str(root), identities=1, images=2, seed=0, size=64, real_photos=True)
    (root / "id000" / "set_A" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return root


def test_evaluate_rows_tables_and_resume(ray_local, dataset, tmp_path):
    out = tmp_path / "scores"
    cfg = EvaluateConfig(images=str(dataset), reference=str(dataset), output=str(out), splits=["set_A"],
                         lpips_backbone="random", settings={"method": "none", "protection": "none"},
                         mismatch_groups={"also_clean": str(dataset)})
    first = run_evaluate(cfg)
    rows = Manifest(str(out)).read().to_pandas()
    idents = sorted(rows["identity"].unique())
    assert len(idents) == 2  # a synthetic identity and the astronaut
    assert first.total == len(rows) == 2 * 2 + 1 and first.errors == 1
    bad = rows[rows["name"] == "broken.png"].iloc[0]
    assert bad["error_kind"] == "input" and pd.isna(bad["ims"])
    ok = rows[rows["error"].isna()]
    for col in ("ims", "ims_ip", "ims_vgg", "face_found", "q", "liqe", "clip_iqac", "lpips", "ssim", "ms_ssim",
                "psnr", "p_noise", "is_noise", "method", "protection"):
        assert col in rows.columns, col
    assert ok["ims"].between(-1, 1).all() and set(ok["face_found"].unique()) <= {0.0, 1.0}
    assert ok["q"].between(-1, 1).all()
    # images scored against themselves as the clean reference: perfect faithfulness
    assert (ok["ssim"] > 0.999).all() and (ok["lpips"] < 1e-6).all()
    summary = pd.read_parquet(out / "summary.parquet")
    assert list(summary["identity"]) == idents + ["ALL"] and "fdfr" in summary.columns
    assert (out / "summary.md").read_text().startswith("| method |")
    assert (out / "mismatch.png").stat().st_size > 1000
    mism = pd.read_parquet(out / "mismatch.parquet")
    assert {"clean", "also_clean", "evaluated"} <= set(mism["group"])
    # a re-run scores nothing again
    again = run_evaluate(cfg)
    assert again.processed == 0 and again.skipped == 5 and len(Manifest(str(out)).read()) == len(rows)


def test_evaluate_config_errors():
    with pytest.raises(ValueError, match="ims"):
        EvaluateConfig(images="a", output="b")
    with pytest.raises(ValueError, match="unknown metrics"):
        EvaluateConfig(images="a", output="b", reference="r", metrics=["fid"])
    with pytest.raises(ValueError, match="clash"):
        EvaluateConfig(images="a", output="b", reference="r", settings={"ims": "x"})


def test_a_finished_evaluation_rerun_skips_everything_until_a_reference_changes(ray_local, dataset, tmp_path):
    """The re-run fast path (no reference embedding, no pipeline) holds only while the reference images'
    bytes are the ones the tables were built from."""
    import json
    import shutil

    from raypdm.pipelines import evaluate as ev

    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    (data / "id000" / "set_A" / "broken.png").unlink()
    out = tmp_path / "scores"
    cfg = EvaluateConfig(images=str(data), reference=str(data), output=str(out), splits=["set_A"],
                         metrics=["ims", "ssim"], identities=["id000"])
    run_evaluate(cfg)
    marker = json.loads((out / ev.PREPARED_MARKER).read_text())
    chash = marker["config_hash"]
    from raypdm.data.layout import list_images

    refs = [r for r in list_images(str(data), identities=["id000"], any_split=True)[0] if r.split == "set_A"]
    done = frozenset(Manifest(str(out)).done_keys())
    key = ev._prepared_key(cfg, ["id000"], chash)
    assert json.loads(json.dumps(key)) == marker and ev._finished_before(cfg, refs, chash, done, key)
    again = run_evaluate(cfg)
    assert again.skipped == again.total == 2 and again.processed == 0
    # a reference (set_B) image replaced in place: same paths, other bytes -> the tables are rebuilt
    ref_image = sorted((data / "id000" / "set_B").iterdir())[0]
    ref_image.write_bytes((data / "id000" / "set_C" / sorted(p.name for p in (data / "id000" / "set_C").iterdir())[0]).read_bytes())
    changed = ev._prepared_key(cfg, ["id000"], chash)
    assert changed != marker and not ev._finished_before(cfg, refs, chash, done, changed)
    run_evaluate(cfg)
    assert json.loads((out / ev.PREPARED_MARKER).read_text()) == json.loads(json.dumps(changed))
