"""Identity score IMS = 0.7·IMS_IP + 0.3·IMS_VGG, with a penalty for missing faces, and FDFR.

The metric of *Rethinking and Red-Teaming Protective Perturbation in Personalized Diffusion Models*
(Liu et al.): for each generated image, the cosine similarity between its face embedding and the
identity's clean reference embedding, once with InsightFace's antelopev2 ArcFace (IMS_IP) and once with
DeepFace's VGG-Face (IMS_VGG), combined with weights 0.7 / 0.3. An image where no face is found scores
the penalty (-1 by default) and counts toward the face detection failure rate (FDFR).

How a face is found and embedded (one decision for both backends):

1. Detection: the antelopev2 SCRFD detector (insightface's own ``SCRFD`` class) at ``det_size`` 640x640
   and threshold 0.5, as the usual ``FaceAnalysis.prepare(det_size=(640, 640))`` evaluation scripts set
   it (insightface 2.x would otherwise run two scales, 128 and 640). With several faces, the one with
   the highest detection score is used (the first face ``FaceAnalysis.get`` returns). No face: both
   backends score the penalty and ``face_found`` is 0.
2. IMS_IP: insightface's ``norm_crop`` aligns the face to ArcFace's 112x112 five-point template using
   SCRFD's landmarks, and ``ArcFaceONNX.get_feat`` embeds the crops (BGR→RGB, (x-127.5)/127.5), as
   ``FaceAnalysis.get`` does; the embedding is L2-normalised (insightface's ``normed_embedding``).
3. IMS_VGG: deepface's own ``extract_face(align=True)`` cuts the face from the same SCRFD box and eyes
   (rotation so the eyes are level, then the box), then deepface's preprocessing: /255,
   ``resize_image`` to 224x224 (aspect kept, black padding), BGR, ``normalization="base"``, the 4096-d
   fc7 descriptor, L2-normalised — what ``DeepFace.represent(model_name="VGG-Face")`` computes after its
   own detection. Deliberate difference: DeepFace would detect again with its default OpenCV Haar
   cascade (which OpenCV 5 wheels no longer ship), one image per call; sharing SCRFD's detection makes
   "no face" a single decision and lets both backends see the same face. ``face_found_vgg`` is 0 only
   when that crop comes out empty (a box entirely outside the image).
4. Reference: the mean of the L2-normalised embeddings of the reference images (``set_B`` by default,
   chosen by the caller) in which a face was found, re-normalised, per backend. A backend for which no
   reference image had a face has reference ``None``; images scored against it get NaN for that
   backend (the identity cannot be scored, which a mean then shows), never a silent penalty.
5. IMS = ``ip_weight``·IMS_IP + ``vgg_weight``·IMS_VGG (0.7 / 0.3; weights are used as given, not
   renormalised). FDFR = share of images with ``face_found`` = 0.

Batching: detection runs per image (antelopev2's SCRFD graph has a fixed batch of one and images differ
in size); the aligned ArcFace crops of a whole call go through the ONNX recognizer ``batch_size`` at a
time, and the VGG-Face crops through deepface's model object (``VggFaceClient.predict``) on the torch
device in batches, instead of DeepFace's one-image-per-call API.

Presets: ``full`` reads ``<weights_dir>/antelopev2/`` and ``<weights_dir>/vggface/`` (see
``raypdm.models.faces``; a missing file raises ``MissingWeightsError`` naming it and the fetch command);
``tiny`` runs the same code with random-weight models (a tiny ONNX ArcFace through insightface's
``ArcFaceONNX``, a narrow VGG-Face inside deepface's client) and, as the one exception to "same path",
a real offline LBP face cascade instead of a random SCRFD, so face photos are found and flat images are
not. Tiny scores only show the plumbing.
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from raypdm.config import StrictModel
from raypdm.models import faces
from raypdm.models.registry import get
from raypdm.models.weights import MissingWeightsError, require_files, sha256_file

__all__ = [
    "BACKENDS",
    "IdentityOptions",
    "IdentityScorer",
    "combine_ims",
    "cosine",
    "fdfr",
    "reference_digest",
    "reference_from_embeddings",
]

logger = logging.getLogger(__name__)

BACKENDS = ("ip", "vgg")
PRESETS = ("tiny", "full")


class IdentityOptions(StrictModel):
    """Settings of the identity score. Everything except ``batch_size`` and ``onnx_threads`` changes scores."""

    ip_weight: float = Field(0.7, ge=0, description="weight of IMS_IP (antelopev2 ArcFace) in IMS")
    vgg_weight: float = Field(0.3, ge=0, description="weight of IMS_VGG (DeepFace VGG-Face) in IMS")
    penalty: float = Field(-1.0, description="similarity given to a backend when no face is found")
    det_size: tuple[int, int] = Field((640, 640), description="SCRFD input size (width, height), full preset")
    det_thresh: float = Field(0.5, gt=0, lt=1, description="SCRFD face score threshold, full preset")
    batch_size: int = Field(32, ge=1, description="face crops per recognizer call (speed only)")
    onnx_threads: int = Field(0, ge=0, description="onnxruntime intra-op threads; 0: its default (speed only)")

    @field_validator("det_size")
    @classmethod
    def _stride_multiple(cls, v: tuple[int, int]) -> tuple[int, int]:
        # SCRFD decodes anchors on stride-8/16/32 grids; other sizes misalign the grids and the outputs.
        if any(s < 32 or s % 32 for s in v):
            raise ValueError(f"each side must be a positive multiple of 32, got {v}")
        return v

    @model_validator(mode="after")
    def _some_weight(self) -> IdentityOptions:
        if self.ip_weight + self.vgg_weight <= 0:
            raise ValueError("ip_weight and vgg_weight: at least one must be positive")
        return self


# --------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------
def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors (float64 arithmetic); NaN when either is all zeros."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"cosine: vectors of different sizes {a.size} and {b.size}")
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return math.nan
    return float(np.clip(a @ b / (na * nb), -1.0, 1.0))


def combine_ims(ims_ip: float, ims_vgg: float, options: IdentityOptions) -> float:
    """IMS = ip_weight·IMS_IP + vgg_weight·IMS_VGG; a backend with weight 0 does not enter (not even a NaN)."""
    total = 0.0
    for weight, value in ((options.ip_weight, ims_ip), (options.vgg_weight, ims_vgg)):
        if weight:
            total += weight * float(value)
    return total


def fdfr(face_found: Sequence[float | bool]) -> float:
    """Face detection failure rate: the share of images where no face was found; NaN for no images."""
    found = np.asarray(list(face_found), dtype=np.float64)
    if found.size == 0:
        return math.nan
    if not np.isin(found, (0.0, 1.0)).all():
        raise ValueError("fdfr: face_found values must be 0/1 or booleans")
    return float(1.0 - found.mean())


def _l2_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; an all-zero row stays zero (its cosine is then NaN)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


# --------------------------------------------------------------------------------------------------
# The scorer
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Face:
    bbox: np.ndarray  # (4,) x1, y1, x2, y2 in image pixels
    score: float
    kps: np.ndarray  # (5, 2) image-left eye, image-right eye, nose, mouth corners


class IdentityScorer:
    """Loads the face models once (one scorer per Ray actor) and scores batches of images.

    ``preset="full"`` needs ``weights_dir`` holding ``antelopev2/`` and ``vggface/``; ``"tiny"`` builds
    random-weight models (its ONNX recognizer is written to ``raypdm.models.faces.tiny_cache_dir()``
    at first use). ``device=None`` picks CUDA when present.
    """

    def __init__(
        self,
        preset: str = "tiny",
        weights_dir: str | None = None,
        device: str | None = None,
        options: IdentityOptions | None = None,
    ):
        if preset not in PRESETS:
            raise ValueError(f"identity scorer: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        self.preset = preset
        self.options = options or IdentityOptions()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.weights_dir = Path(weights_dir) if weights_dir is not None else None
        threads = self.options.onnx_threads
        if preset == "full":
            if self.weights_dir is None:
                raise ValueError(
                    "identity scorer: preset 'full' needs weights_dir (the folder holding antelopev2/ and vggface/)"
                )
            self._require_weights(self.weights_dir)
            ip_dir, vgg_dir = (get(name).model_dir(self.weights_dir) for name in (faces.ANTELOPE, faces.VGG))
            self.ip = faces.load_antelopev2(ip_dir, self.device, onnx_threads=threads)
            self.vgg = faces.load_vggface(vgg_dir, self.device)
        else:
            self.ip = faces.build_antelopev2("tiny", self.device, onnx_threads=threads)
            self.vgg = faces.build_vggface("tiny", self.device)
        self.ip.prepare(det_size=self.options.det_size, det_thresh=self.options.det_thresh)
        self._digests: dict[str, Any] | None = None

    @staticmethod
    def _require_weights(weights_dir: Path) -> None:
        """Both models' files checked before anything loads: one error lists every missing file."""
        errors: list[MissingWeightsError] = []
        for name in (faces.ANTELOPE, faces.VGG):
            try:
                require_files(get(name), weights_dir)
            except MissingWeightsError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        if errors:
            names = ", ".join(e.model for e in errors)
            missing = [p for e in errors for p in e.missing]
            fetch = "\n  ".join(line for e in errors for line in e.fetch.splitlines())
            raise MissingWeightsError(names, missing, fetch)

    # ----------------------------------------------------------------------------- config
    def _weights_identity(self) -> dict[str, Any]:
        if self._digests is None:
            if self.preset == "tiny":
                self._digests = {"ip": f"random:tiny-seed{faces.SEED}-{faces.TINY_VERSION}",
                                 "vgg": f"random:tiny-seed{faces.SEED}"}  # fmt: skip
            else:
                vgg_file = get(faces.VGG).model_dir(self.weights_dir) / faces.VGG_FILENAME
                vgg_file = vgg_file if vgg_file.is_file() else vgg_file.with_suffix(".safetensors")
                self._digests = {
                    "ip": {p.name: sha256_file(p) for p in self.ip.files.values()},
                    "vgg": {vgg_file.name: sha256_file(vgg_file)},
                }
        return self._digests

    def config_dict(self) -> dict[str, Any]:
        """What changes the scores (for a stage config hash): models, weights, crops, options. Not the device.

        For ``full`` the weights are identified by sha256, hashed once per scorer (a few seconds for the
        ~0.8 GB of files); ``tiny`` says ``random:tiny``.
        """
        import deepface
        import insightface

        o = self.options
        weights = self._weights_identity()
        return {
            "metric": "ims",
            "preset": self.preset,
            "ip": {
                "model": faces.ANTELOPE,
                "weights": weights["ip"],
                **self.ip.detector_config(),
                "face": "highest detector score",
                "align": "insightface norm_crop to the 112 px arcface template",
                "embedding_dim": self.ip.embedding_dim,
            },
            "vgg": {
                "model": "VGG-Face (deepface pytorch)",
                "weights": weights["vgg"],
                "crop": "deepface extract_face(align=True) on the ip detector's box and eyes",
                "input": list(self.vgg.input_shape),
                "normalization": "base",
            },
            "ip_weight": o.ip_weight,
            "vgg_weight": o.vgg_weight,
            "penalty": o.penalty,
            "versions": {"insightface": insightface.__version__, "deepface": deepface.__version__},
        }

    # ----------------------------------------------------------------------------- embedding
    @staticmethod
    def _check(image: np.ndarray, i: int) -> None:
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise ValueError(f"image {i}: expected a uint8 HxWx3 RGB array, got {got}")
        if min(image.shape[:2]) < 1:
            raise ValueError(f"image {i}: empty image {image.shape}")

    def _detect(self, bgr: np.ndarray) -> _Face | None:
        det, kpss = self.ip.detector.detect(bgr, max_num=0)
        if det.shape[0] == 0:
            return None
        best = int(np.argmax(det[:, 4]))  # first maximum: insightface's own score order
        return _Face(det[best, :4].astype(np.float64), float(det[best, 4]), kpss[best].astype(np.float64))

    def _arcface_crop(self, bgr: np.ndarray, face: _Face) -> np.ndarray:
        from insightface.utils import face_align

        with warnings.catch_warnings():
            # scikit-image deprecates SimilarityTransform.estimate, which insightface still calls.
            warnings.simplefilter("ignore", FutureWarning)
            return face_align.norm_crop(bgr, landmark=face.kps, image_size=self.ip.recognizer.input_size[0])

    def _vgg_input(self, bgr: np.ndarray, face: _Face) -> np.ndarray | None:
        """deepface's crop and preprocessing for VGG-Face, from our detection (see the module docstring)."""
        from deepface.models.Detector import FacialAreaRegion
        from deepface.modules import detection, preprocessing

        x1, y1, x2, y2 = face.bbox
        # deepface detectors hand over integer boxes and eyes; its "left eye" is the person's left,
        # i.e. the image-right one (insightface's second landmark).
        area = FacialAreaRegion(
            x=int(x1), y=int(y1), w=int(x2 - x1), h=int(y2 - y1),
            left_eye=(int(face.kps[1, 0]), int(face.kps[1, 1])),
            right_eye=(int(face.kps[0, 0]), int(face.kps[0, 1])),
            confidence=face.score,
        )  # fmt: skip
        crop = detection.extract_face(
            facial_area=area, img=bgr, align=True, expand_percentage=0, width_border=0, height_border=0,
            detector_backend="insightface",  # any name but "opencv": eyes are given, no second detector
        ).img  # fmt: skip
        if crop.shape[0] == 0 or crop.shape[1] == 0:
            return None
        crop = crop / 255 if crop.max() > 1 else crop.astype(np.float64)  # as extract_faces(normalize_face=True)
        height, width = self.vgg.input_shape
        return preprocessing.resize_image(img=crop, target_size=(width, height))  # (1, 224, 224, 3) float32

    def _run_arcface(self, crops: list[np.ndarray]) -> np.ndarray:
        rec = self.ip.recognizer
        if not crops:
            return np.zeros((0, self.ip.embedding_dim), np.float32)
        # A graph with a fixed batch of one (some exports) takes crops one at a time.
        step = 1 if rec.input_shape[0] == 1 else self.options.batch_size
        out = [rec.get_feat(crops[i : i + step]) for i in range(0, len(crops), step)]
        return _l2_rows(np.concatenate(out))

    def _run_vgg(self, inputs: list[np.ndarray]) -> np.ndarray:
        if not inputs:
            return np.zeros((0, self.vgg.output_shape), np.float32)
        step = self.options.batch_size
        out = [self.vgg.predict(np.concatenate(inputs[i : i + step])) for i in range(0, len(inputs), step)]
        return _l2_rows(np.concatenate(out))

    def embed(self, images: list[np.ndarray]) -> list[dict[str, np.ndarray | None]]:
        """uint8 HxWx3 RGB images (any size) -> per image ``{"ip": unit float32 vector or None when no face,
        "vgg": same}``; crops are batched through both recognizers."""
        for i, image in enumerate(images):
            self._check(image, i)
        out: list[dict[str, np.ndarray | None]] = [{"ip": None, "vgg": None} for _ in images]
        ip_crops, ip_rows, vgg_inputs, vgg_rows = [], [], [], []
        for i, image in enumerate(images):
            bgr = np.ascontiguousarray(image[:, :, ::-1])  # insightface and deepface both take BGR
            face = self._detect(bgr)
            if face is None:
                continue
            ip_crops.append(self._arcface_crop(bgr, face))
            ip_rows.append(i)
            vgg_input = self._vgg_input(bgr, face)
            if vgg_input is not None:
                vgg_inputs.append(vgg_input)
                vgg_rows.append(i)
        with torch.inference_mode():
            for row, vector in zip(ip_rows, self._run_arcface(ip_crops), strict=True):
                out[row]["ip"] = vector
            for row, vector in zip(vgg_rows, self._run_vgg(vgg_inputs), strict=True):
                out[row]["vgg"] = vector
        return out

    def reference_embedding(self, images: list[np.ndarray]) -> dict[str, np.ndarray | None]:
        """Per backend: the mean of the unit embeddings of the images with a face, re-normalised; ``None``
        when no reference image had a face. Plain numpy, so it ships to Ray actors as is."""
        return reference_from_embeddings(self.embed(images))

    # ----------------------------------------------------------------------------- scoring
    def _check_reference(self, reference: dict[str, np.ndarray | None]) -> None:
        if not isinstance(reference, dict) or set(reference) != set(BACKENDS):
            got = sorted(reference) if isinstance(reference, dict) else type(reference).__name__
            raise ValueError(
                f"reference: expected a dict with keys {list(BACKENDS)} (from reference_embedding), got {got}"
            )
        dims = {"ip": self.ip.embedding_dim, "vgg": self.vgg.output_shape}
        for key in BACKENDS:
            ref = reference[key]
            if ref is None:
                logger.warning(
                    "reference has no %r embedding (no face in any reference image): IMS_%s is NaN", key, key.upper()
                )
            elif np.asarray(ref).size != dims[key]:
                raise ValueError(
                    f"reference[{key!r}] has {np.asarray(ref).size} values but this scorer's {key} model gives "
                    f"{dims[key]}: was the reference made with another preset or weights?"
                )

    def _similarity(self, vector: np.ndarray | None, reference: np.ndarray | None) -> float:
        if reference is None:
            return math.nan
        if vector is None:
            return self.options.penalty
        return cosine(vector, reference)

    def score(self, images: list[np.ndarray], reference: dict[str, np.ndarray | None]) -> list[dict[str, float]]:
        """Per image ``{"ims", "ims_ip", "ims_vgg", "face_found", "face_found_vgg"}`` as floats.

        ``face_found`` is 1.0 when the detector found a face (its complement's mean is FDFR);
        ``face_found_vgg`` when VGG-Face got a crop. A backend without a face scores ``penalty``.
        """
        self._check_reference(reference)
        results = []
        for e in self.embed(images):
            ims_ip = self._similarity(e["ip"], reference["ip"])
            ims_vgg = self._similarity(e["vgg"], reference["vgg"])
            results.append({
                "ims": combine_ims(ims_ip, ims_vgg, self.options),
                "ims_ip": ims_ip,
                "ims_vgg": ims_vgg,
                "face_found": float(e["ip"] is not None),
                "face_found_vgg": float(e["vgg"] is not None),
            })  # fmt: skip
        return results


def reference_from_embeddings(embeddings: Sequence[dict[str, np.ndarray | None]]) -> dict[str, np.ndarray | None]:
    """``reference_embedding`` from embeddings already computed with ``embed`` (one pass per reference set)."""
    reference: dict[str, np.ndarray | None] = {}
    for key in BACKENDS:
        found = [e[key] for e in embeddings if e[key] is not None]
        reference[key] = _l2_rows(np.mean(found, axis=0, keepdims=True))[0] if found else None
    return reference


def reference_digest(reference: dict[str, np.ndarray | None]) -> str:
    """sha256 of a reference embedding's bytes (for manifests that key rows by their reference)."""
    h = hashlib.sha256()
    for key in BACKENDS:
        value = reference.get(key)
        h.update(key.encode())
        h.update(b"none" if value is None else np.ascontiguousarray(value, dtype=np.float32).tobytes())
    return h.hexdigest()
