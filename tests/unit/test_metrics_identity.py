"""Identity score (IMS, FDFR): formulas on hand-made embeddings, tiny scorers on real photos, weights handling.

Nothing here reads or writes ~/.insightface, ~/.deepface or ~/.cache: the tiny ONNX cache and
DEEPFACE_HOME point at a temporary folder for the whole module.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from pydantic import ValidationError
from skimage import data

from raypdm import models
from raypdm.metrics.identity import (
    IdentityOptions,
    IdentityScorer,
    combine_ims,
    cosine,
    fdfr,
    reference_digest,
    reference_from_embeddings,
)
from raypdm.models import faces
from raypdm.models.weights import MissingWeightsError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OPTS = IdentityOptions(onnx_threads=1)


@pytest.fixture(scope="module", autouse=True)
def private_homes(tmp_path_factory):
    root = tmp_path_factory.mktemp("homes")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAYPDM_CACHE_DIR", str(root / "cache"))
        mp.setenv("DEEPFACE_HOME", str(root / "deepface"))
        yield root


@pytest.fixture(scope="module")
def scorer() -> IdentityScorer:
    return IdentityScorer("tiny", device="cpu", options=OPTS)


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    import cv2

    a = data.astronaut()
    return {
        "face": cv2.resize(a, (128, 128), interpolation=cv2.INTER_AREA),
        "face_crop": np.ascontiguousarray(a[20:300, 100:350]),  # 280 x 250, another framing
        "face_flip": np.ascontiguousarray(a[:, ::-1]),  # 512 px, mirrored
        "grey": np.full((96, 96, 3), 128, np.uint8),
    }


def _unit(*values: float) -> np.ndarray:
    v = np.asarray(values, dtype=np.float32)
    return v / np.linalg.norm(v)


# ------------------------------------------------------------------------------------ pure formulas
def test_cosine_on_hand_made_vectors():
    assert cosine(np.array([1.0, 0.0]), np.array([0.0, 3.0])) == pytest.approx(0.0)
    assert cosine(np.array([1.0, 1.0]), np.array([2.0, 2.0])) == pytest.approx(1.0)
    assert cosine(np.array([1.0, 0.0]), np.array([-2.0, 0.0])) == pytest.approx(-1.0)
    assert cosine(np.array([3.0, 4.0]), np.array([4.0, 3.0])) == pytest.approx(24 / 25)
    assert math.isnan(cosine(np.zeros(3), np.ones(3)))
    with pytest.raises(ValueError, match="different sizes"):
        cosine(np.ones(3), np.ones(4))


def test_combine_ims_weights_and_penalty():
    default = IdentityOptions()
    assert (default.ip_weight, default.vgg_weight, default.penalty) == (0.7, 0.3, -1.0)
    assert combine_ims(0.5, -0.2, default) == pytest.approx(0.7 * 0.5 + 0.3 * -0.2)
    assert combine_ims(default.penalty, default.penalty, default) == pytest.approx(-1.0)
    custom = IdentityOptions(ip_weight=0.5, vgg_weight=0.5)
    assert combine_ims(0.8, 0.2, custom) == pytest.approx(0.5)
    ip_only = IdentityOptions(ip_weight=1.0, vgg_weight=0.0)
    assert combine_ims(0.6, math.nan, ip_only) == pytest.approx(0.6)  # a zero weight drops the term
    assert math.isnan(combine_ims(0.6, math.nan, default))


def test_fdfr():
    assert fdfr([1.0, 0.0, 0.0, 1.0]) == pytest.approx(0.5)
    assert fdfr([True, True, True]) == 0.0
    assert fdfr([False]) == 1.0
    assert math.isnan(fdfr([]))
    with pytest.raises(ValueError, match="0/1"):
        fdfr([0.5])


def test_options_are_validated_with_field_names():
    with pytest.raises(ValidationError, match="det_size"):
        IdentityOptions(det_size=(100, 100))
    with pytest.raises(ValidationError, match="ip_weight"):
        IdentityOptions(ip_weight=0.0, vgg_weight=0.0)
    with pytest.raises(ValidationError, match="vgg_weight"):
        IdentityOptions(vgg_weight=-0.1)
    with pytest.raises(ValidationError, match="det_thres"):
        IdentityOptions(det_thres=0.3)  # misspelt: unknown fields are errors
    assert IdentityOptions.model_validate({"det_size": [320, 320]}).det_size == (320, 320)


def test_score_applies_formulas_to_embeddings(scorer, monkeypatch):
    """score() on hand-made embeddings: cosine per backend, penalty, NaN reference, flags."""
    d = 128
    ref = {"ip": _unit(*([1.0] + [0.0] * (d - 1))), "vgg": _unit(*([0.0, 1.0] + [0.0] * (d - 2)))}
    half = _unit(*([1.0, 1.0] + [0.0] * (d - 2)))  # 45 degrees from both references
    embeddings = [
        {"ip": ref["ip"], "vgg": ref["vgg"]},  # the reference itself
        {"ip": half, "vgg": -ref["vgg"]},
        {"ip": half, "vgg": None},  # a face, but no VGG crop
        {"ip": None, "vgg": None},  # no face
    ]
    monkeypatch.setattr(scorer, "embed", lambda images: embeddings)
    s = scorer.score([None] * 4, ref)
    c = math.sqrt(0.5)
    assert [r["ims_ip"] for r in s] == pytest.approx([1.0, c, c, -1.0])
    assert [r["ims_vgg"] for r in s] == pytest.approx([1.0, -1.0, -1.0, -1.0])
    assert [r["ims"] for r in s] == pytest.approx([1.0, 0.7 * c - 0.3, 0.7 * c - 0.3, -1.0])
    assert [r["face_found"] for r in s] == [1.0, 1.0, 1.0, 0.0]
    assert [r["face_found_vgg"] for r in s] == [1.0, 1.0, 0.0, 0.0]
    assert fdfr([r["face_found"] for r in s]) == pytest.approx(0.25)
    assert set(s[0]) == {"ims", "ims_ip", "ims_vgg", "face_found", "face_found_vgg"}
    assert all(type(v) is float for r in s for v in r.values())

    # A custom penalty, and a reference with no VGG face: IMS_VGG (hence IMS) is NaN, never a penalty.
    monkeypatch.setattr(scorer, "options", IdentityOptions(penalty=-0.5))
    s = scorer.score([None] * 4, {"ip": ref["ip"], "vgg": None})
    assert s[3]["ims_ip"] == -0.5
    assert all(math.isnan(r["ims_vgg"]) and math.isnan(r["ims"]) for r in s)
    assert [r["face_found"] for r in s] == [1.0, 1.0, 1.0, 0.0]


def test_reference_is_the_renormalised_mean_of_found_faces(scorer, monkeypatch):
    a, b = _unit(1, 0, 0), _unit(0, 1, 0)
    monkeypatch.setattr(scorer, "embed", lambda images: [{"ip": a, "vgg": None}, {"ip": b, "vgg": None},
                                                         {"ip": None, "vgg": None}])  # fmt: skip
    ref = scorer.reference_embedding([None] * 3)
    np.testing.assert_allclose(ref["ip"], _unit(1, 1, 0), atol=1e-6)
    np.testing.assert_array_equal(reference_from_embeddings(scorer.embed([None] * 3))["ip"], ref["ip"])
    assert ref["vgg"] is None
    assert ref["ip"].dtype == np.float32 and isinstance(ref["ip"], np.ndarray)
    assert reference_digest(ref) == reference_digest({"vgg": None, "ip": ref["ip"].copy()})
    assert reference_digest(ref) != reference_digest({"ip": a, "vgg": None})


def test_reference_must_match_the_scorer(scorer, photos):
    with pytest.raises(ValueError, match="keys"):
        scorer.score([photos["grey"]], {"ip": None})
    with pytest.raises(ValueError, match=r"reference\['ip'\] has 512 values"):
        scorer.score([photos["grey"]], {"ip": np.ones(512, np.float32), "vgg": None})
    with pytest.raises(ValueError, match="image 1: expected a uint8"):
        scorer.embed([photos["grey"], photos["grey"].astype(np.float32)])


# ------------------------------------------------------------------------------------ tiny models on photos
def test_tiny_finds_the_astronaut_and_not_a_flat_image(scorer, photos):
    out = scorer.embed([photos["face"], photos["grey"], photos["face_crop"], photos["face_flip"]])
    for e in (out[0], out[2], out[3]):
        for key, dim in (("ip", 128), ("vgg", 128)):
            v = e[key]
            assert v is not None and v.dtype == np.float32 and v.shape == (dim,)
            assert np.linalg.norm(v) == pytest.approx(1.0, abs=1e-5)
    assert out[1] == {"ip": None, "vgg": None}


def test_tiny_scores_end_to_end(scorer, photos):
    reference = scorer.reference_embedding([photos["face"], photos["grey"]])
    assert all(reference[k] is not None for k in ("ip", "vgg"))
    s = scorer.score([photos["face"], photos["grey"], photos["face_crop"]], reference)
    assert [r["face_found"] for r in s] == [1.0, 0.0, 1.0]
    assert s[0]["ims_ip"] == pytest.approx(1.0, abs=1e-5)  # the only reference face is this image
    assert s[0]["ims"] == pytest.approx(1.0, abs=1e-5)
    assert s[1] == {"ims": -1.0, "ims_ip": -1.0, "ims_vgg": -1.0, "face_found": 0.0, "face_found_vgg": 0.0}
    assert -1.0 <= s[2]["ims"] <= 1.0 and s[2]["ims"] == pytest.approx(0.7 * s[2]["ims_ip"] + 0.3 * s[2]["ims_vgg"])
    assert fdfr([r["face_found"] for r in s]) == pytest.approx(1 / 3)
    # No reference face at all: the identity cannot be scored.
    empty = scorer.reference_embedding([photos["grey"]])
    assert empty == {"ip": None, "vgg": None}
    assert math.isnan(scorer.score([photos["face"]], empty)[0]["ims"])


def test_batching_and_a_second_scorer_give_the_same_embeddings(scorer, photos):
    images = [photos["face"], photos["grey"], photos["face_crop"], photos["face_flip"]]
    other = IdentityScorer("tiny", device="cpu", options=IdentityOptions(batch_size=2, onnx_threads=1))
    together = other.embed(images)
    for image, batched in zip(images, together, strict=True):
        alone = scorer.embed([image])[0]
        for key in ("ip", "vgg"):
            if alone[key] is None:
                assert batched[key] is None
            else:
                np.testing.assert_allclose(batched[key], alone[key], atol=1e-5)


def test_a_box_outside_the_image_gives_no_vgg_crop(scorer, photos, monkeypatch):
    """One detection decides both backends; an empty deepface crop only drops VGG-Face."""
    from raypdm.metrics.identity import _Face

    kps = np.array([[150, 40], [170, 40], [160, 50], [152, 60], [168, 60]], np.float64)
    monkeypatch.setattr(scorer, "_detect", lambda bgr: _Face(np.array([140.0, 30.0, 180.0, 70.0]), 0.9, kps))
    e = scorer.embed([photos["face"]])[0]  # 128 px image: the box starts beyond its right edge
    assert e["ip"] is not None and e["vgg"] is None


def test_config_dict(scorer):
    cfg = scorer.config_dict()
    json.dumps(cfg)  # goes into a config hash
    assert cfg["ip"]["weights"].startswith("random:tiny") and cfg["vgg"]["weights"].startswith("random:tiny")
    assert (cfg["ip_weight"], cfg["vgg_weight"], cfg["penalty"]) == (0.7, 0.3, -1.0)
    assert "cpu" not in json.dumps(cfg) and "batch_size" not in cfg
    other = IdentityScorer("tiny", device="cpu", options=IdentityOptions(penalty=0.0, onnx_threads=1))
    assert other.config_dict() != cfg


def test_no_home_folders_are_touched(scorer, photos, private_homes):
    scorer.embed([photos["face"]])
    assert not (private_homes / "deepface").exists()
    assert list((private_homes / "cache" / "tiny-faces").glob("*.onnx"))


# ------------------------------------------------------------------------------------ weights and registry
def test_full_preset_with_empty_weights_dir_names_files_and_fetch_commands(tmp_path):
    with pytest.raises(MissingWeightsError) as err:
        IdentityScorer("full", weights_dir=str(tmp_path), device="cpu")
    msg = str(err.value)
    for name, file in (("antelopev2", faces.ANTELOPE_DETECTOR), ("antelopev2", faces.ANTELOPE_RECOGNIZER),
                       ("vggface", faces.VGG_FILENAME)):  # fmt: skip
        assert str((tmp_path / name / file).absolute()) in msg
    for name in ("antelopev2", "vggface"):
        assert all(line in msg for line in models.get(name).fetch_command(tmp_path).splitlines())
    assert "no working public download" in msg and f"curl -L -o {tmp_path / 'vggface' / faces.VGG_FILENAME}" in msg
    with pytest.raises(ValueError, match="needs weights_dir"):
        IdentityScorer("full", device="cpu")


def test_registry_entries(tmp_path):
    from deepface.models.facial_recognition.pytorch import VGGFace

    assert faces.VGG_URL == VGGFace.WEIGHTS_URL[0]
    ante, vgg = models.get("antelopev2"), models.get("vggface")
    assert [f.path for f in ante.files] == ["scrfd_10g_bnkps.onnx", "glintr100.onnx"]
    assert all(f.url is None for f in ante.files) and ante.presets == ("tiny",)
    assert "non-commercial" in ante.licence.lower()
    assert vgg.files[0].url == faces.VGG_URL and vgg.presets == ("tiny", "full")
    statuses = models.check_weights(tmp_path, ["antelopev2", "vggface"])
    assert len(statuses) == 3 and all(s.status == "missing" for s in statuses)
    with pytest.raises(ValueError, match="only the 'tiny' preset"):
        faces.build_antelopev2("full")
    with pytest.raises(ValueError, match="preset"):
        models.build("antelopev2", preset="full")
    with pytest.raises(MissingWeightsError, match=faces.VGG_FILENAME):
        models.load("vggface", tmp_path)
    # The full layout is deepface's own VGG-Face (fc8 classifier included, as its weight file has it).
    layout = faces.vggface_layouts()["vggface"]
    assert layout["fc6.weight"] == (4096, 512, 7, 7) and layout["fc8.weight"] == (2622, 4096, 1, 1)
    assert sum(np.prod(s) for s in layout.values()) > 140_000_000


def test_vggface_loader_is_strict_and_pickle_safe(tmp_path):
    import torch

    tiny = faces.build_vggface("tiny")
    (tmp_path / "vggface").mkdir()
    path = tmp_path / "vggface" / faces.VGG_FILENAME
    torch.save(tiny.model.model.state_dict(), path)  # the tiny network's keys do not fit VGG-Face
    with pytest.raises(ValueError, match=str(path)):
        models.load("vggface", tmp_path)
    torch.save({"evil": object()}, path)  # not plain tensors: refused, never unpickled
    with pytest.raises(ValueError, match="refused to unpickle"):
        models.load("vggface", tmp_path)


def test_full_path_on_random_antelopev2_files(tmp_path, photos, monkeypatch):
    """The full preset's loading, SCRFD detection and alignment, offline, on antelopev2-shaped random files.

    VGG-Face's 580 MB file is replaced by the tiny client; its strict loader is tested above.
    """
    faces.write_random_antelopev2(tmp_path / "antelopev2")
    (tmp_path / "vggface").mkdir()
    (tmp_path / "vggface" / faces.VGG_FILENAME).write_bytes(b"stand-in")
    monkeypatch.setattr(faces, "load_vggface", lambda model_dir, device: faces.build_vggface("tiny", device))
    full = IdentityScorer("full", weights_dir=str(tmp_path), device="cpu",
                          options=IdentityOptions(det_size=(160, 160), onnx_threads=1))  # fmt: skip
    assert type(full.ip.detector).__name__ == "SCRFD" and type(full.ip.recognizer).__name__ == "ArcFaceONNX"
    out = full.embed([photos["face"], photos["face_crop"]])
    for e in out:  # this random SCRFD fires everywhere
        assert e["ip"] is not None and np.linalg.norm(e["ip"]) == pytest.approx(1.0, abs=1e-5)
    cfg = full.config_dict()
    assert cfg["ip"]["detector"] == "scrfd" and cfg["ip"]["det_size"] == [[160, 160]]
    digest = cfg["ip"]["weights"][faces.ANTELOPE_DETECTOR]
    assert len(digest) == 64 and digest == models.weights.sha256_file(tmp_path / "antelopev2" / faces.ANTELOPE_DETECTOR)
    # Files the wrong way round are named in the error.
    (tmp_path / "swapped").mkdir()
    det, rec = faces.ANTELOPE_DETECTOR, faces.ANTELOPE_RECOGNIZER
    for src, dst in ((det, rec), (rec, det)):
        (tmp_path / "swapped" / dst).write_bytes((tmp_path / "antelopev2" / src).read_bytes())
    with pytest.raises(ValueError, match="expected an insightface detection model"):
        faces.load_antelopev2(tmp_path / "swapped")
