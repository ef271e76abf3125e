"""Quality Q = mean(LIQE mapped to [-1, 1], CLIP-IQAC), and the CLIP loader both scorers share.

Everything runs offline on tiny random CLIPs. LIQE is held to pyiqa's own ``LIQE.forward`` with the same
tiny weights injected through pyiqa's loader function; pyiqa's text-feature cache goes to a temporary
folder (``TORCH_HOME`` and the module's cache path), so random features never reach a real run.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raypdm import models
from raypdm.metrics.quality import LIQE_LEVELS, LIQE_PROMPT, QualityScorer, liqe_to_unit
from raypdm.models.clip import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ClipBundle,
    ClipPreprocess,
    convert_openai_clip_state_dict,
    load_clip,
)
from raypdm.models.tokenizer import save_tokenizer, tiny_clip_tokenizer, write_tokenizer_files
from raypdm.models.weights import MissingWeightsError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _resize(image: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC))


@pytest.fixture(scope="module")
def tiny_scorer():
    return QualityScorer(preset="tiny", device="cpu", batch_size=2)


@pytest.mark.parametrize("score, unit", [(1.0, -1.0), (5.0, 1.0), (3.0, 0.0), (2.0, -0.5), (4.5, 0.75)])
def test_liqe_to_unit_maps_1_5_onto_minus1_1(score, unit):
    assert liqe_to_unit(score) == pytest.approx(unit, abs=1e-12)
    assert liqe_to_unit(score) == pytest.approx(((score - 1) / 4) * 2 - 1, abs=1e-12)


class _ControlledCLIP(torch.nn.Module):
    """A CLIP whose logits the test fixes: text features by prompt, image features = channel means."""

    def __init__(self, text_by_ids: dict[tuple[int, ...], list[float]], scale: float):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(scale)))
        self.text_by_ids = text_by_ids

    def get_text_features(self, input_ids, attention_mask=None):
        return torch.tensor([self.text_by_ids[tuple(row.tolist())] for row in input_ids])

    def get_image_features(self, pixel_values):
        return pixel_values.mean(dim=(2, 3))


def test_clip_iqac_is_the_softmax_difference_of_the_good_and_bad_prompts():
    tokenizer = tiny_clip_tokenizer()
    good, bad = "a good photo of a dog", "a bad photo of a dog"
    ids = tokenizer([good, bad], padding="max_length", truncation=True, max_length=77)["input_ids"]
    text = {tuple(ids[0]): [1.0, 0.0, 0.0], tuple(ids[1]): [0.0, 1.0, 0.0]}
    scale = 10.0
    stub = ClipBundle(_ControlledCLIP(text, scale), tokenizer, ClipPreprocess(16), source="stub")
    liqe = load_clip("tiny", device="cpu", weights="liqe")
    scorer = QualityScorer(device="cpu", class_noun="dog", clip_bundle=stub, liqe_bundle=liqe)
    assert scorer.iqac_prompts == (good, bad)

    colours = [(200, 30, 90), (10, 240, 128)]
    images = [np.full((40, 60, 3), c, dtype=np.uint8) for c in colours]
    rows = scorer.score(images)
    for colour, row in zip(colours, rows, strict=True):
        # A solid image stays solid through resize and crop: its feature is the normalised colour.
        v = (np.array(colour) / 255.0 - np.array(OPENAI_CLIP_MEAN)) / np.array(OPENAI_CLIP_STD)
        f = v / np.linalg.norm(v)
        logits = scale * np.array([f[0], f[1]])  # cosines with the good / bad prompt features
        p = np.exp(logits - logits.max())
        p /= p.sum()
        assert row["clip_iqac"] == pytest.approx(p[0] - p[1], abs=1e-5)
        assert row["q"] == pytest.approx((row["liqe"] + row["clip_iqac"]) / 2, abs=1e-7)
    assert rows[0]["clip_iqac"] != pytest.approx(rows[1]["clip_iqac"], abs=1e-3)


def test_q_is_the_mean_of_liqe_and_clip_iqac_and_batching_does_not_change_scores(tiny_scorer, astronaut):
    rng = np.random.default_rng(0)
    images = [
        _resize(astronaut, 64, 64),
        rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        _resize(astronaut, 48, 80),  # another size: its own batch group
        _resize(astronaut, 20, 20),  # below LIQE's patch size: upsampled
    ]
    rows = tiny_scorer.score(images)
    assert len(rows) == len(images)
    for row in rows:
        assert set(row) == {"q", "liqe", "liqe_raw", "clip_iqac"}
        assert 1.0 <= row["liqe_raw"] <= 5.0
        assert row["liqe"] == pytest.approx(liqe_to_unit(row["liqe_raw"]), abs=1e-9)
        assert -1.0 <= row["clip_iqac"] <= 1.0
        assert row["q"] == pytest.approx((row["liqe"] + row["clip_iqac"]) / 2, abs=1e-9)
    assert rows[0]["q"] != pytest.approx(rows[1]["q"], abs=1e-4)  # the scores depend on the image
    for image, row in zip(images, rows, strict=True):
        (alone,) = tiny_scorer.score([image])
        for key in row:
            assert alone[key] == pytest.approx(row[key], abs=1e-5)


def test_config_dict_names_prompts_weights_and_mapping(tiny_scorer):
    cfg = tiny_scorer.config_dict()
    assert cfg["clip_iqac"]["prompts"] == ["a good photo of a person", "a bad photo of a person"]
    assert cfg["liqe"]["prompts"] == [LIQE_PROMPT.format(q) for q in LIQE_LEVELS]
    assert cfg["clip_iqac"]["weights"].startswith("random:tiny:")
    assert cfg["liqe"]["weights"].startswith("random:tiny:")
    assert cfg["liqe"]["weights"] != cfg["clip_iqac"]["weights"]


def test_bad_inputs_name_the_field(tiny_scorer):
    with pytest.raises(ValueError, match="image 1"):
        tiny_scorer.score([np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32), np.uint8)])
    with pytest.raises(ValueError, match="class_noun"):
        QualityScorer(device="cpu", class_noun=" ")


def _openai_bpe_tokenizer(folder):
    """The real CLIP vocabulary (openai-clip ships its BPE file) as a transformers tokenizer."""
    from pyiqa.archs.clip_imports import SimpleTokenizer
    from transformers import CLIPTokenizer

    simple = SimpleTokenizer()
    merges = [" ".join(pair) for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda kv: kv[1])]
    write_tokenizer_files(folder, simple.encoder, merges)
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def test_liqe_matches_pyiqa_with_the_same_tiny_weights(tmp_path, monkeypatch, astronaut):
    """Our LIQE (checkpoint converted to transformers' CLIP, patches, prompts, softmax expectation) against
    pyiqa's LIQE.forward, both on one random OpenAI-layout CLIP injected through pyiqa's loader."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    from pyiqa.archs import clip_model as openai_clip
    from pyiqa.archs import liqe_arch
    from pyiqa.archs.clip_imports import clip
    from transformers import CLIPConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        reference = openai_clip.CLIP(
            embed_dim=16, image_resolution=224, vision_layers=1, vision_width=64, vision_patch_size=32,
            context_length=77, vocab_size=49408, transformer_width=32, transformer_heads=2, transformer_layers=1,
        )
    cache = tmp_path / "pyiqa_cache"
    cache.mkdir()
    monkeypatch.setattr(liqe_arch, "load", lambda name, device: reference)
    monkeypatch.setattr(liqe_arch, "DEFAULT_CACHE_DIR", str(cache))
    pyiqa_liqe = liqe_arch.LIQE(pretrained=False).eval()

    # The same weights as a weights dir: LIQE's file in pyiqa's format, config + tokenizer next to it.
    weights = tmp_path / "weights"
    clip_dir = weights / "clip-vit-b32"
    tokenizer = _openai_bpe_tokenizer(clip_dir)
    CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=128, num_attention_heads=2,
                         num_hidden_layers=1, max_position_embeddings=77, hidden_act="quick_gelu",
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(hidden_size=64, intermediate_size=256, num_attention_heads=1, num_hidden_layers=1,
                           image_size=224, patch_size=32, hidden_act="quick_gelu"),
        projection_dim=16,
    ).save_pretrained(clip_dir)
    (weights / "liqe").mkdir()
    state = {"clip_model." + k: v for k, v in reference.state_dict().items()}
    torch.save({"params": state}, weights / "liqe" / "liqe_koniq.pt")

    prompt = LIQE_PROMPT.format("bad")
    # openai-clip pads with 0 after the end token; ours does not pad here.
    assert tokenizer([prompt])["input_ids"][0] == [i for i in clip.tokenize([prompt])[0].tolist() if i]

    liqe = load_clip("full", weights, "cpu", weights="liqe")
    assert liqe.weights_id().startswith("sha256:")
    scorer = QualityScorer(device="cpu", liqe_bundle=liqe, clip_bundle=load_clip("tiny", device="cpu"))
    # 36 and 60 patches (LIQE keeps every 2nd / 4th of them), 4 patches (all kept), 1 row of 3.
    crops = [astronaut[:384, :384], astronaut[:400, :512], astronaut[100:356, 150:406], astronaut[:240, :300]]
    for crop in crops:
        x = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None].float() / 255.0
        with torch.no_grad():
            expected = float(pyiqa_liqe(x))
        assert float(scorer.liqe_raw(x)) == pytest.approx(expected, abs=1e-5)
        (row,) = scorer.score([np.ascontiguousarray(crop)])
        assert row["liqe_raw"] == pytest.approx(expected, abs=1e-5)


def test_full_preset_without_weights_names_every_missing_file(tmp_path):
    with pytest.raises(MissingWeightsError) as err:
        QualityScorer(preset="full", weights_dir=str(tmp_path), device="cpu")
    message = str(err.value)
    assert str(tmp_path / "clip-vit-b32" / "model.safetensors") in message
    assert str(tmp_path / "liqe" / "liqe_koniq.pt") in message
    assert "hf download openai/clip-vit-base-patch32" in message
    assert "chaofengc/IQA-PyTorch-Weights" in message

    # LIQE's file alone is not enough: it borrows clip-vit-b32's config and tokenizer.
    (tmp_path / "liqe").mkdir()
    (tmp_path / "liqe" / "liqe_koniq.pt").write_bytes(b"x")
    with pytest.raises(MissingWeightsError, match="tokenizer_config.json"):
        load_clip("full", tmp_path, "cpu", weights="liqe")


def test_a_saved_tiny_bundle_loads_back_and_checks_clean(tmp_path, astronaut):
    built = load_clip("tiny", device="cpu")
    folder = tmp_path / "clip-vit-b32"
    built.model.save_pretrained(folder)
    save_tokenizer(built.tokenizer, folder)
    loaded = models.load("clip-vit-b32", tmp_path)
    image = _resize(astronaut, 48, 64)
    assert torch.allclose(built.embed_images([image]), loaded.embed_images([image]), atol=1e-6)
    assert torch.allclose(built.encode_text(["a photo of a person"]), loaded.encode_text(["a photo of a person"]), atol=1e-6)
    statuses = models.check_weights(tmp_path, "clip-vit-b32", verify_hashes=False)
    assert all(s.ok for s in statuses), [(s.path, s.status, s.detail) for s in statuses]


def test_torch_preprocessing_is_clips_within_interpolation_error(astronaut):
    from transformers import CLIPImageProcessor

    image = np.ascontiguousarray(astronaut[:400, :500])
    expected = CLIPImageProcessor()(images=image, return_tensors="pt")["pixel_values"]
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    ours = ClipPreprocess(224)(x)
    assert ours.shape == expected.shape == (1, 3, 224, 224)
    diff = (ours - expected).abs()
    # Normalised units (~1/0.27 per unit of [0, 1]): PIL's and torch's bicubic differ by a few 1/255 steps.
    assert float(diff.mean()) < 0.01 and float(diff.max()) < 0.1


def test_openai_key_conversion_rejects_a_resnet_clip():
    with pytest.raises(ValueError, match="visual.layer1.0.conv1.weight"):
        convert_openai_clip_state_dict({"visual.layer1.0.conv1.weight": torch.zeros(1)}, where="RN50.pt")
