"""Class-prior images and the sampling stage on a local Ray (tiny random-weight SD 2.1, 2 steps, CPU)."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raypdm import models
from raypdm.data.manifest import Manifest
from raypdm.pipelines.sample import SampleJobConfig, export_fingerprint, load_export, prompt_slug, run_sample
from raypdm.sample.decoupled import DecoupledSampler, SamplingConfig, seeds_for
from raypdm.train.priors import ClassPriorConfig, class_prior_uri, generate_class_images, prior_seed
from raypdm.train.prompts import CDLPrompts

pytestmark = pytest.mark.ray

PROMPTS = ["a photo of sks person", "a smiling photo of sks person"]


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(Path(path).read_bytes())).convert("RGB"))


def _snapshot(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and "_manifest_parts" not in str(p)}


# ------------------------------------------------------------------------------------ class priors


@pytest.mark.slow
def test_class_priors_cached_deterministic_and_resumable(ray_local, tmp_path):
    # batch_size 1: every image is drawn alone, so a regenerated image must be bit-identical.
    cfg = ClassPriorConfig(count=5, steps=2, resolution=32, batch_size=1, seed=3)
    assert cfg.prompt == "a photo of a person"
    folder = generate_class_images(cfg, str(tmp_path / "cache"))
    assert folder == class_prior_uri(cfg, str(tmp_path / "cache"))
    root = Path(folder)
    assert root.parent.name == "sd21-base-tiny"
    names = sorted(p.name for p in root.glob("*.png"))
    assert names == [f"{i:05d}.png" for i in range(5)]
    table = Manifest(folder).read().to_pylist()
    assert len(table) == 5 and all(r["error"] is None and r["output_sha256"] for r in table)
    assert [r["seed"] for r in sorted(table, key=lambda r: r["index"])] == [prior_seed(3, i) for i in range(5)]
    assert json.loads((root / "prior.json").read_text())["count"] == 5
    images = [_png(root / n) for n in names]
    assert images[0].shape == (32, 32, 3)
    assert np.abs(images[0].astype(int) - images[1].astype(int)).mean() > 1  # per-image seeds differ

    # Cache hit: returns at once and writes nothing.
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    t0 = time.perf_counter()
    assert generate_class_images(cfg, str(tmp_path / "cache")) == folder
    assert time.perf_counter() - t0 < 1.0
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before

    # A deleted image is regenerated alone, by another run: same key -> the same bytes.
    original = (root / "00002.png").read_bytes()
    (root / "00002.png").unlink()
    generate_class_images(cfg, str(tmp_path / "cache"))
    after = {p: p.stat().st_mtime_ns for p in root.glob("*.png")}
    changed = {p.name for p in after if after[p] != before.get(p)}
    assert changed == {"00002.png"}
    assert (root / "00002.png").read_bytes() == original
    assert Manifest(folder).read().num_rows == 5

    # A different key (another seed) is another folder.
    assert class_prior_uri(cfg.model_copy(update={"seed": 4}), "x") != class_prior_uri(cfg, "x")


def test_concurrent_callers_share_one_folder(ray_local, tmp_path):
    cfg = ClassPriorConfig(count=3, steps=1, resolution=32, batch_size=3, seed=11)
    results: list[str] = []
    errors: list[BaseException] = []

    def call():
        try:
            results.append(generate_class_images(cfg, str(tmp_path / "cache")))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 2 and results[0] == results[1]
    table = Manifest(results[0]).read()
    assert table.num_rows == 3
    assert len(set(table.column("run_id").to_pylist())) == 1  # one caller generated, the other waited


# ---------------------------------------------------------------------------------------- sampling


def _export(parts, folder: Path) -> Path:
    parts.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def trained_models(tmp_path_factory):
    """Three identities' exports: a (trained with token 'bhj'), b (perturbed UNet), c (truncated UNet file)."""
    root = tmp_path_factory.mktemp("models")
    parts = models.build("sd21-base", preset="tiny")
    a = _export(parts, root / "alice" / "export")
    (a / "cdl_prompts.json").write_text(json.dumps({"prompts": CDLPrompts(token="bhj").model_dump(), "step": 3}))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in parts.unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    _export(parts, root / "bob" / "export")
    c = _export(parts, root / "carol" / "export")
    weights = c / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (root / "dave").mkdir()  # no export: not trained yet, skipped with a note
    return root


def test_sampling_stage_rows_seeds_resume_and_broken_export(ray_local, trained_models, tmp_path):
    out = tmp_path / "samples"
    sampling = SamplingConfig(prompts=PROMPTS, num_images=2, steps=2, height=64, width=64, w=0.0)
    cfg = SampleJobConfig(models=str(trained_models), output=str(out), sampling=sampling, batch_size=2)
    summary = run_sample(cfg)
    assert (summary.total, summary.processed, summary.errors, summary.skipped) == (12, 8, 4, 0)
    assert any("dave" in p for p in summary.problems)

    rows = Manifest(str(out)).read().to_pylist()
    assert len(rows) == 12
    ok = [r for r in rows if r["error"] is None]
    bad = [r for r in rows if r["error"] is not None]
    assert {r["identity"] for r in ok} == {"alice", "bob"} and len(ok) == 8
    assert {r["identity"] for r in bad} == {"carol"} and all(r["error_kind"] == "input" for r in bad)
    assert "cannot load export" in bad[0]["error"]
    for r in ok:
        assert Path(r["uri"]) == out / r["identity"] / prompt_slug(r["prompt"]) / f"{r['image_index']:04d}.png"
        assert Path(r["uri"]).is_file() and r["output_sha256"] and r["config_hash"] and r["input_sha256"]
        assert r["seed"] == seeds_for(0, r["identity"], r["prompt_index"], 2)[r["image_index"]]
        assert r["w"] == 0.0 and r["cfg_scale"] == 1.0 and r["negative_prompt"] is None and r["steps"] == 2
        assert r["split"] == prompt_slug(r["prompt"]) and r["name"] == f"{r['image_index']:04d}.png"
    tokens = {r["identity"]: r["token"] for r in ok}
    assert tokens == {"alice": "bhj", "bob": "t@j"}  # alice's token comes from its cdl_prompts.json
    by = {(r["identity"], r["prompt_index"], r["image_index"]): r for r in ok}
    assert by[("alice", 0, 0)]["positive_prompt"] == "a photo of sks person without bhj noisy pattern"
    assert sorted(p.name for p in (out / "bob" / "a-smiling-photo-of-sks-person").iterdir()) == ["0000.png", "0001.png"]

    # A manifest row regenerates its image with DecoupledSampler alone.
    row = by[("bob", 1, 1)]
    pipe = models.get("sd21-base").loader(trained_models / "bob" / "export", "cpu", None).to_pipeline()
    again = DecoupledSampler(pipe, sampling).sample(row["prompt"], [row["seed"]])[0]
    assert np.abs(again.astype(int) - _png(row["uri"]).astype(int)).max() <= 1
    # Different models and seeds give different images.
    assert np.abs(_png(by[("alice", 1, 1)]["uri"]).astype(int) - _png(row["uri"]).astype(int)).mean() > 1

    # Resume: nothing is sampled or written again (carol's input errors stay failed).
    before = _snapshot(out)
    second = run_sample(cfg)
    assert (second.processed, second.skipped, second.errors) == (0, 12, 0)
    after = _snapshot(out)
    assert {p for p in after if after[p] != before.get(p)} <= {out / "config.yaml"}
    assert Manifest(str(out)).read().num_rows == 12
    assert second.verified == 8 and not second.recomputed

    # A deleted image is sampled again (its row replaced), a stray staged file removed; the rest untouched.
    victim = Path(by[("alice", 0, 1)]["uri"])
    victim.unlink()
    (victim.parent / (victim.name + ".tmp-20990101T000000000000Z-abcdef")).write_bytes(b"stray")
    third = run_sample(cfg)
    assert (third.processed, third.skipped, third.recomputed, third.cleaned) == (1, 11, {"missing": 1}, 1)
    fresh = {(r["identity"], r["split"], r["name"]): r for r in Manifest(str(out)).read().to_pylist()}
    assert len(fresh) == 12 and hashlib.sha256(victim.read_bytes()).hexdigest() == \
        fresh[("alice", by[("alice", 0, 1)]["split"], victim.name)]["output_sha256"]
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def test_guided_sampling_uris_and_missing_identity(ray_local, trained_models, tmp_path):
    """file:// URIs, w > 0 records c_neg, an identity asked for without an export gives error rows."""
    out = f"file://{tmp_path}/s"
    sampling = SamplingConfig(prompts=PROMPTS[:1], num_images=1, steps=2, height=64, width=64, w=2.0)
    cfg = SampleJobConfig(models=f"file://{trained_models}", output=out, sampling=sampling,
                          identities=["bob", "erin"])
    summary = run_sample(cfg)
    assert (summary.processed, summary.errors) == (1, 1)
    rows = {r["identity"]: r for r in Manifest(out).read().to_pylist()}
    assert rows["bob"]["w"] == 2.0 and rows["bob"]["cfg_scale"] == 3.0
    assert rows["bob"]["negative_prompt"] == "noisy, abstract, pattern, low quality"
    assert (tmp_path / "s" / "bob" / "a-photo-of-sks-person" / "0000.png").is_file()
    assert "no export folder" in rows["erin"]["error"] and rows["erin"]["error_kind"] == "input"


def test_export_from_a_remote_filesystem(trained_models):
    """A non-local export is copied to a temporary folder, loaded, and the copy removed."""
    import fsspec

    fs = fsspec.filesystem("memory")
    export = trained_models / "bob" / "export"
    for f in export.rglob("*"):
        if f.is_file():
            fs.pipe_file(f"/raypdm-test/bob/export/{f.relative_to(export).as_posix()}", f.read_bytes())
    uri = "memory://raypdm-test/bob/export"
    assert export_fingerprint(uri) == export_fingerprint("memory://raypdm-test/bob/export/")
    pipe = load_export(uri, "cpu")
    image = DecoupledSampler(pipe, SamplingConfig(steps=1, height=64, width=64, w=0.0)).sample(PROMPTS[0], [1])[0]
    assert image.shape == (64, 64, 3)
    fs.rm("/raypdm-test", recursive=True)
