"""CLIP latent-mismatch probe: zero-shot person/noise rows, per-group summary, projection plot."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from raypdm.data.uri import read_bytes
from raypdm.metrics.mismatch import (
    DEFAULT_NOISE_PROMPTS,
    DEFAULT_PERSON_PROMPTS,
    MismatchProbe,
    plot_projection,
    summarise,
    zero_shot_rows,
)
from raypdm.models.weights import MissingWeightsError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def probe():
    return MismatchProbe(preset="tiny", device="cpu", batch_size=2)


def test_default_prompts_are_two_non_empty_groups():
    assert len(DEFAULT_PERSON_PROMPTS) >= 1 and len(DEFAULT_NOISE_PROMPTS) >= 1
    assert not set(DEFAULT_PERSON_PROMPTS) & set(DEFAULT_NOISE_PROMPTS)
    assert all(isinstance(p, str) and p for p in DEFAULT_PERSON_PROMPTS + DEFAULT_NOISE_PROMPTS)


def test_zero_shot_rows_match_a_hand_computed_softmax():
    person = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0]])
    noise = torch.tensor([[0.0, 0.0, 1.0]])
    images = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]])  # the second is not unit length on purpose
    rows = zero_shot_rows(images, person, noise, logit_scale=10.0)

    # image 0: cosines (1, 0.6 | 0) -> logits (10, 6 | 0)
    p0 = 1.0 / (math.exp(10) + math.exp(6) + 1.0)
    assert rows[0]["p_noise"] == pytest.approx(p0, rel=1e-5)
    assert rows[0]["is_noise"] == 0.0
    assert rows[0]["cos_person"] == pytest.approx(0.8, abs=1e-6)
    assert rows[0]["cos_noise"] == pytest.approx(0.0, abs=1e-6)
    # image 1: cosines (0, 0 | 1) -> logits (0, 0 | 10)
    p1 = math.exp(10) / (2.0 + math.exp(10))
    assert rows[1]["p_noise"] == pytest.approx(p1, rel=1e-5)
    assert rows[1]["is_noise"] == 1.0
    assert rows[1]["cos_person"] == pytest.approx(0.0, abs=1e-6)
    assert rows[1]["cos_noise"] == pytest.approx(1.0, abs=1e-6)


def test_probe_embeds_normalised_float32_batched_and_rows_use_its_prompts(probe, astronaut):
    rng = np.random.default_rng(0)
    images = [
        np.ascontiguousarray(astronaut[:128, :128]),
        rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        np.ascontiguousarray(astronaut[100:164, 200:296]),
    ]
    emb = probe.embed_images(images)
    assert emb.dtype == np.float32 and emb.shape == (3, probe.person_text.shape[1])
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    for i, image in enumerate(images):  # batch of 2 + one alone == each alone
        np.testing.assert_allclose(probe.embed_images([image])[0], emb[i], atol=1e-5)

    rows = probe.image_rows(emb)
    expected = zero_shot_rows(torch.from_numpy(emb), probe.person_text, probe.noise_text, probe.clip.logit_scale)
    assert len(rows) == 3
    for row, exp in zip(rows, expected, strict=True):
        assert set(row) == {"p_noise", "is_noise", "cos_person", "cos_noise"}
        assert row["is_noise"] == float(row["p_noise"] > 0.5)
        for key in row:
            assert row[key] == pytest.approx(exp[key], abs=1e-6)
    with pytest.raises(ValueError, match="embeddings"):
        probe.image_rows(emb[:, :3])
    assert probe.embed_images([]).shape == (0, emb.shape[1]) and probe.image_rows(probe.embed_images([])) == []


def test_config_dict_records_prompts_and_weights(probe):
    cfg = probe.config_dict()
    assert cfg["person_prompts"] == list(DEFAULT_PERSON_PROMPTS)
    assert cfg["noise_prompts"] == list(DEFAULT_NOISE_PROMPTS)
    assert cfg["weights"].startswith("random:tiny:")


def test_summarise_hand_made_rows():
    def row(is_noise, p, cp, cn):
        return {"is_noise": is_noise, "p_noise": p, "cos_person": cp, "cos_noise": cn}

    rows = {
        "clean": [row(0.0, 0.1, 0.30, 0.10), row(0.0, 0.2, 0.28, 0.12)],
        "protected": [row(1.0, 0.9, 0.20, 0.25), row(1.0, 0.7, 0.22, 0.21), row(0.0, 0.3, 0.24, 0.20)],
        "purified": [row(0.0, 0.4, 0.27, 0.14)],
    }
    df = summarise(rows)
    assert list(df.columns) == [
        "group", "n", "noise_share", "p_noise", "cos_person", "cos_noise", "shift_person", "shift_noise"
    ]
    by = df.set_index("group")
    assert list(by.index) == ["clean", "protected", "purified"]
    assert by.loc["clean", "n"] == 2 and by.loc["protected", "n"] == 3 and by.loc["purified", "n"] == 1
    assert by.loc["clean", "noise_share"] == pytest.approx(0.0)
    assert by.loc["protected", "noise_share"] == pytest.approx(2 / 3)
    assert by.loc["protected", "p_noise"] == pytest.approx(1.9 / 3)
    assert by.loc["clean", "cos_person"] == pytest.approx(0.29)
    assert by.loc["protected", "cos_person"] == pytest.approx(0.22)
    assert by.loc["protected", "cos_noise"] == pytest.approx(0.22)
    assert by.loc["clean", "shift_person"] == pytest.approx(0.0)
    assert by.loc["protected", "shift_person"] == pytest.approx(0.22 - 0.29)
    assert by.loc["protected", "shift_noise"] == pytest.approx(0.22 - 0.11)
    assert by.loc["purified", "shift_noise"] == pytest.approx(0.14 - 0.11)

    # Another baseline; a missing one leaves the shifts NaN; an empty group has n = 0 and NaN means.
    assert summarise(rows, baseline="protected").set_index("group").loc["clean", "shift_person"] == pytest.approx(0.07)
    no_base = summarise({"protected": rows["protected"], "empty": []})
    assert no_base["shift_person"].isna().all() and no_base["shift_noise"].isna().all()
    assert no_base.set_index("group").loc["empty", "n"] == 0
    assert pd.isna(no_base.set_index("group").loc["empty", "noise_share"])


def test_plot_projection_writes_a_png_with_tsne_and_svd(tmp_path):
    rng = np.random.default_rng(0)
    groups = {
        "clean": rng.normal(size=(6, 16)).astype(np.float32),
        "protected": (rng.normal(size=(6, 16)) + 2.0).astype(np.float32),
        "purified": rng.normal(size=(5, 16)).astype(np.float32),
    }
    out = str(tmp_path / "plots" / "projection.png")
    assert plot_projection(groups, out, methods=("tsne", "svd"), seed=0) == out
    data = (tmp_path / "plots" / "projection.png").read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000

    # Through fsspec: any URI works; the default methods skip UMAP when it does not import.
    uri = "memory://raypdm-test-mismatch/projection.png"
    plot_projection(groups, uri)
    assert read_bytes(uri).startswith(PNG_MAGIC)


def test_plot_projection_rejects_bad_requests(tmp_path):
    rng = np.random.default_rng(1)
    groups = {"a": rng.normal(size=(4, 8)), "b": rng.normal(size=(4, 8))}
    with pytest.raises(ValueError, match="methods"):
        plot_projection(groups, str(tmp_path / "x.png"), methods=("pca3d",))
    with pytest.raises(ValueError, match="dimensions"):
        plot_projection({"a": rng.normal(size=(4, 8)), "b": rng.normal(size=(4, 6))}, str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match=">= 3 points"):
        plot_projection({"a": rng.normal(size=(2, 8))}, str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()


def test_full_preset_without_weights_names_the_missing_file(tmp_path):
    with pytest.raises(MissingWeightsError) as err:
        MismatchProbe(preset="full", weights_dir=str(tmp_path), device="cpu")
    assert str(tmp_path / "clip-vit-b32" / "model.safetensors") in str(err.value)
    assert "liqe" not in str(err.value)  # the probe only needs OpenAI's CLIP
