"""Face models behind the identity score (IMS): InsightFace antelopev2 and DeepFace's VGG-Face.

Two registry entries:

- ``antelopev2`` — InsightFace's antelopev2 package (Deng et al., ArcFace; Guo et al., SCRFD), of which
  IMS needs two ONNX files: ``scrfd_10g_bnkps.onnx`` (face detector with 5 landmarks) and
  ``glintr100.onnx`` (ArcFace ResNet-100 trained on Glint360K, 512-d). They are loaded offline through
  ``insightface.model_zoo.get_model`` — the per-file route ``FaceAnalysis`` itself takes — so the
  detector is insightface's own ``SCRFD`` class and the recognizer its ``ArcFaceONNX``. There is no
  working public download (insightface's release link is reported dead upstream): users bring their copy
  of the package and the fetch command says so.
- ``vggface`` — VGG-Face (Parkhi et al., BMVC 2015) as deepface 0.0.103 ships it for its PyTorch
  backend: deepface's ``VggFaceBaseModel`` (fc6/fc7/fc8 as convolutions), its ``VggFaceDescriptor``
  (the 4096-d fc7 output) and its ``VggFaceClient`` model object, with the weight file deepface downloads
  (``vgg_face_weights.pth``, URL from deepface's own source). deepface would read it from
  ``$DEEPFACE_HOME/.deepface/weights/`` and download it when absent; here it is read from
  ``<weights_dir>/vggface/`` (an existing ``~/.deepface/weights/vgg_face_weights.pth`` can be copied or
  linked there) with ``torch.load(weights_only=True)``, strictly, and the client is assembled around it,
  so nothing touches the network or ``~/.deepface``.

Presets (``raypdm.models.build``), random weights, for tests and the demo:

- ``antelopev2`` ``tiny``: the recognizer is a tiny random ArcFace-shaped CNN exported to ONNX
  (``torch.onnx.export(dynamo=False)``) into a cache folder at first use and loaded through the same
  ``model_zoo.get_model`` → ``ArcFaceONNX`` path as ``glintr100.onnx``. The detector is NOT SCRFD: a
  random SCRFD "finds" faces everywhere or nowhere, which would make the demo's detection failure rate
  meaningless. It is a real offline detector instead: OpenCV's LBP frontal-face cascade as shipped with
  scikit-image, run with ``skimage.feature.Cascade`` (OpenCV 5 wheels no longer bundle cascades and its
  ``CascadeClassifier`` does not read this file). It has no landmarks, so the 5 points handed to the
  alignment are ArcFace's template placed in the detected box; alignment then only scales and shifts.
  It runs on the CPU and has no confidence: faces are ranked by box area. Same interface as
  insightface's SCRFD (``prepare``, ``detect(img) -> (boxes+scores, landmarks)``).
  There is no random ``full`` build: the real model is ONNX files, loaded with ``raypdm.models.load``.
- ``vggface`` ``tiny``: a VGG-Face-shaped network (same 13 conv + fc6/fc7 layer names, 224 px input)
  with narrow layers, inside deepface's ``VggFaceDescriptor`` and ``VggFaceClient``; ``full``: deepface's
  own architecture with random weights (benchmarks).

``write_random_antelopev2(dir)`` writes random antelopev2-shaped files (a tiny SCRFD with keypoint heads,
a tiny recognizer) under the real file names, so the ``full`` loading path runs offline in tests.

Licences: insightface code is MIT, but its pretrained models (antelopev2 included) are for
non-commercial research only. deepface is MIT; the VGG-Face weights come from Oxford's Visual Geometry
Group; treat them as non-commercial research use unless their terms say otherwise. Neither is
redistributed here.
"""

from __future__ import annotations

import logging
import os
import shlex
import uuid
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from raypdm.models.registry import Layouts, ModelSpec, WeightFile, register
from raypdm.models.weights import MissingWeightsError, init_on, load_weights_into, module_layout, seeded

__all__ = [
    "ANTELOPE",
    "ANTELOPE_DETECTOR",
    "ANTELOPE_RECOGNIZER",
    "ANTELOPE_SPEC",
    "VGG",
    "VGG_FILENAME",
    "VGG_SPEC",
    "VGG_URL",
    "CascadeFaceDetector",
    "InsightFaceModels",
    "build_antelopev2",
    "build_vggface",
    "load_antelopev2",
    "load_vggface",
    "onnx_providers",
    "tiny_cache_dir",
    "vggface_layouts",
    "write_random_antelopev2",
    "write_tiny_recognizer",
]

logger = logging.getLogger(__name__)

ANTELOPE = "antelopev2"
ANTELOPE_DETECTOR = "scrfd_10g_bnkps.onnx"
ANTELOPE_RECOGNIZER = "glintr100.onnx"
VGG = "vggface"
VGG_FILENAME = "vgg_face_weights.pth"
# deepface 0.0.103, deepface/models/facial_recognition/pytorch/VGGFace.py: WEIGHTS_URL[0] (the Hugging
# Face mirror is its fallback). A test checks these stay in step with the installed deepface.
VGG_URL = "https://github.com/serengil/deepface_models/releases/download/v1.0/vgg_face_weights.pth"
VGG_INPUT = 224
SEED = 20150907  # VGG-Face (BMVC 2015) date; fixed so tiny weights never change
# Bump when a tiny architecture changes, so stale cached ONNX files are never reused.
TINY_VERSION = "v1"
# The tiny cascade detector works on images resized so their longer side is this many pixels (as
# SCRFD works at its det_size): faces of 64-512 px images then fall in the cascade's 24 px+ windows.
TINY_DETECTOR_SIDE = 192

# ArcFace's 5-point template in a 112x112 crop (insightface.utils.face_align.arcface_dst): eyes,
# nose tip, mouth corners, in image order (image-left eye first).
_ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)


# --------------------------------------------------------------------------------------------------
# Paths, providers, small helpers
# --------------------------------------------------------------------------------------------------
def tiny_cache_dir() -> Path:
    """Where tiny random ONNX files are written at first use.

    ``$RAYPDM_CACHE_DIR``, else ``$XDG_CACHE_HOME/raypdm``, else ``~/.cache/raypdm``; tests point the
    first at a temporary folder.
    """
    if os.environ.get("RAYPDM_CACHE_DIR"):
        return Path(os.environ["RAYPDM_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "raypdm"


def onnx_providers(device: torch.device) -> tuple[list[Any], int]:
    """onnxruntime providers and insightface ``ctx_id`` for a torch-style device.

    CUDA needs the ``onnxruntime-gpu`` build; without its CUDA provider the ONNX models run on the CPU
    (with a warning) while VGG-Face still uses the GPU.
    """
    import onnxruntime

    if device.type == "cuda":
        index = device.index if device.index is not None else 0
        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"], index
        logger.warning(
            "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu): face ONNX models run on the CPU"
        )
    return ["CPUExecutionProvider"], -1


def _session_options(threads: int):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads > 0:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def _check_float32(name: str, dtype: torch.dtype | None) -> None:
    if dtype not in (None, torch.float32):
        raise ValueError(f"{name}: runs in float32 only (ONNX files / deepface's float32 input), got dtype={dtype}")


def _atomic_onnx_export(module: nn.Module, args: tuple, path: Path, **kwargs: Any) -> None:
    """Export to a temporary file next to ``path`` and rename it into place.

    Several Ray actors may build the tiny models at once; a rename is atomic, so none ever reads a
    half-written file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript-exporter deprecation noise
            torch.onnx.export(
                module, args, str(tmp), dynamo=False, opset_version=17, do_constant_folding=True, **kwargs
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# Tiny random ONNX models (recognizer for the tiny preset; SCRFD-shaped detector for smoke tests)
# --------------------------------------------------------------------------------------------------
class _TinyArcFace(nn.Module):
    """112x112 RGB face crop -> 128-d embedding; ArcFace's input contract, a few strided convolutions.

    The last feature map is flattened (no global pooling), so crops of different faces or poses get
    visibly different random embeddings.
    """

    def __init__(self, dim: int = 128):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(32, 16, 3, 2, 1),
        )  # fmt: skip
        self.fc = nn.Linear(16 * 7 * 7, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


class _TinySCRFD(nn.Module):
    """SCRFD's output contract (9 outputs: scores, box distances, 5-point offsets at strides 8/16/32,
    2 anchors per cell, rank-2 "unbatched" tensors as in antelopev2's ``scrfd_10g_bnkps.onnx``).

    Random score weights with a positive bias make it fire at every anchor with slightly different
    scores, boxes 4 strides wide and landmarks at ArcFace's template inside them: detection, NMS and
    alignment all run, deterministically; what it finds means nothing.
    """

    strides = (8, 16, 32)
    anchors = 2

    def __init__(self, width: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 8, 8)
        self.down = nn.ModuleList([nn.Conv2d(width, width, 2, 2) for _ in self.strides[1:]])
        a = self.anchors
        self.score = nn.ModuleList([nn.Conv2d(width, a, 1) for _ in self.strides])
        self.bbox = nn.ModuleList([nn.Conv2d(width, a * 4, 1) for _ in self.strides])
        self.kps = nn.ModuleList([nn.Conv2d(width, a * 10, 1) for _ in self.strides])
        # Landmark offsets in units of stride, around the anchor, in a box of half-size 2 strides.
        offsets = torch.from_numpy((_ARCFACE_TEMPLATE - 56.0) / 28.0).flatten().repeat(a)
        with torch.no_grad():
            for s, b, k in zip(self.score, self.bbox, self.kps, strict=True):
                s.bias.fill_(3.0)
                b.weight.zero_()
                b.bias.fill_(2.0)
                k.weight.zero_()
                k.bias.copy_(offsets)

    def forward(self, x: torch.Tensor):
        feats = [torch.relu(self.stem(x))]
        for down in self.down:
            feats.append(torch.relu(down(feats[-1])))

        def flat(t: torch.Tensor, c: int) -> torch.Tensor:
            # (1, A*C, h, w) -> (h*w*A, C): row-major cells, then anchors, as SCRFD's decoder expects
            return t.permute(0, 2, 3, 1).reshape(-1, c)

        scores = [flat(torch.sigmoid(h(f)), 1) for h, f in zip(self.score, feats, strict=True)]
        boxes = [flat(h(f), 4) for h, f in zip(self.bbox, feats, strict=True)]
        kpss = [flat(h(f), 10) for h, f in zip(self.kps, feats, strict=True)]
        return (*scores, *boxes, *kpss)


def write_tiny_recognizer(path: str | os.PathLike, seed: int = SEED) -> Path:
    """Export the seeded tiny ArcFace-shaped recognizer to ``path`` (dynamic batch, 112x112 input)."""
    path = Path(path)
    with seeded(seed):
        net = _TinyArcFace().eval()
    _atomic_onnx_export(
        net,
        (torch.zeros(1, 3, 112, 112),),
        path,
        input_names=["input.1"],
        output_names=["embedding"],
        dynamic_axes={"input.1": {0: "batch"}, "embedding": {0: "batch"}},
    )
    return path


def _write_tiny_scrfd(path: Path, seed: int) -> Path:
    with seeded(seed):
        net = _TinySCRFD().eval()
    outputs = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in _TinySCRFD.strides]
    _atomic_onnx_export(
        net,
        (torch.zeros(1, 3, 128, 128),),
        path,
        input_names=["input.1"],
        output_names=outputs,
        dynamic_axes={"input.1": {2: "height", 3: "width"}, **{o: {0: f"n_{o}"} for o in outputs}},
    )
    return path


def write_random_antelopev2(model_dir: str | os.PathLike, seed: int = SEED) -> Path:
    """Random antelopev2-shaped files under the real names, so ``load_antelopev2`` runs offline.

    For smoke tests of the ``full`` loading path only: the detector fires everywhere (see
    ``_TinySCRFD``) and the recognizer is random.
    """
    model_dir = Path(model_dir)
    _write_tiny_scrfd(model_dir / ANTELOPE_DETECTOR, seed)
    write_tiny_recognizer(model_dir / ANTELOPE_RECOGNIZER, seed)
    return model_dir


# --------------------------------------------------------------------------------------------------
# Detectors and the antelopev2 bundle
# --------------------------------------------------------------------------------------------------
class CascadeFaceDetector:
    """OpenCV's LBP frontal-face cascade (shipped with scikit-image) behind SCRFD's interface.

    ``detect(img)`` takes an HxWx3 uint8 BGR image (as insightface's detectors do; the cascade reads its
    luminance) and returns ``(det, kpss)``: ``det`` (N, 5) float32 ``[x1, y1, x2, y2, score]`` and
    ``kpss`` (N, 5, 2) in image pixels, largest face first. The cascade gives no confidence, so
    ``score`` is the box area as a share of the image; the landmarks are ArcFace's template placed in
    the box. Deterministic; CPU only.
    """

    taskname = "detection"

    def __init__(self, side: int = TINY_DETECTOR_SIDE, min_neighbors: int = 4):
        from skimage import data
        from skimage.feature import Cascade

        self.cascade_file = data.lbp_frontal_face_cascade_filename()
        self.cascade = Cascade(self.cascade_file)
        self.side = side
        self.min_neighbors = min_neighbors

    def prepare(self, ctx_id: int = -1, **kwargs: Any) -> None:
        """Nothing to set up (CPU only, fixed working size); present for SCRFD's interface."""

    def config(self) -> dict[str, Any]:
        return {"detector": "lbp-cascade(skimage lbpcascade_frontalface_opencv)", "side": self.side,
                "scale_factor": 1.2, "min_neighbors": self.min_neighbors, "landmarks": "arcface-template-in-box"}

    def detect(self, img: np.ndarray, max_num: int = 0, metric: str = "default") -> tuple[np.ndarray, np.ndarray]:
        import cv2

        h, w = img.shape[:2]
        scale = self.side / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        gray = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_BGR2GRAY)
        small = cv2.resize(gray, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        found = self.cascade.detect_multi_scale(
            img=small, scale_factor=1.2, step_ratio=1, min_size=(24, 24), max_size=small.shape[:2],
            min_neighbor_number=self.min_neighbors, intersection_score_threshold=0.5,
        )  # fmt: skip
        if not found:
            return np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)
        boxes = np.array([[f["c"], f["r"], f["c"] + f["width"], f["r"] + f["height"]] for f in found], np.float32)
        boxes /= scale
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        order = np.argsort(-areas, kind="stable")
        boxes, areas = boxes[order], areas[order]
        if max_num > 0:
            boxes, areas = boxes[:max_num], areas[:max_num]
        det = np.concatenate([boxes, (areas / float(h * w))[:, None]], axis=1).astype(np.float32)
        size_xy = (boxes[:, 2:4] - boxes[:, 0:2])[:, None, :]
        kpss = boxes[:, None, 0:2] + _ARCFACE_TEMPLATE[None] / 112.0 * size_xy
        return det, kpss.astype(np.float32)


@dataclass
class InsightFaceModels:
    """A face detector and an ArcFace recognizer (insightface's ``ArcFaceONNX``): what IMS_IP runs.

    ``detector`` is insightface's ``SCRFD`` (``full``) or ``CascadeFaceDetector`` (``tiny``);
    ``files`` names the weight files on disk (empty for tiny weights), ``weights`` says what they are.
    """

    detector: Any
    recognizer: Any
    weights: str  # "antelopev2" or "random:tiny"
    files: dict[str, Path] = field(default_factory=dict)
    ctx_id: int = -1  # insightface's device id: -1 CPU, else the CUDA device the ONNX sessions use

    def prepare(self, det_size: tuple[int, int] = (640, 640), det_thresh: float = 0.5) -> None:
        """As ``FaceAnalysis.prepare``: detector input size and score threshold, recognizer provider."""
        self.detector.prepare(self.ctx_id, input_size=tuple(det_size), det_thresh=det_thresh)
        self.recognizer.prepare(self.ctx_id)

    def detector_config(self) -> dict[str, Any]:
        if isinstance(self.detector, CascadeFaceDetector):
            return self.detector.config()
        return {
            "detector": "scrfd",
            "det_size": [list(s) for s in getattr(self.detector, "input_sizes", [self.detector.input_size])],
            "det_thresh": float(self.detector.det_thresh),
            "nms_thresh": float(self.detector.nms_thresh),
        }

    @property
    def embedding_dim(self) -> int:
        return int(self.recognizer.output_shape[-1])


def _load_onnx(path: Path, task: str, providers: list[Any], threads: int) -> Any:
    from insightface.model_zoo import model_zoo

    model = model_zoo.get_model(str(path), providers=providers, sess_options=_session_options(threads))
    if model is None or model.taskname != task:
        got = "nothing insightface recognises" if model is None else f"a {model.taskname} model"
        raise ValueError(f"{path}: expected an insightface {task} model, found {got}")
    return model


def _tiny_recognizer_file(seed: int = SEED) -> Path:
    path = tiny_cache_dir() / "tiny-faces" / f"arcface-tiny-{TINY_VERSION}-seed{seed}.onnx"
    if not path.is_file():
        write_tiny_recognizer(path, seed)
    return path


def build_antelopev2(
    preset: str = "tiny", device: str | torch.device = "cpu", dtype: torch.dtype | None = None, *, onnx_threads: int = 0
) -> InsightFaceModels:
    """The tiny stand-in for antelopev2 (see the module docstring), prepared at 640x640, threshold 0.5."""
    _check_float32(ANTELOPE, dtype)
    if preset != "tiny":
        raise ValueError(
            f"{ANTELOPE}: only the 'tiny' preset can be built (the real model is ONNX files: "
            f"raypdm.models.load({ANTELOPE!r}, weights_dir)), got {preset!r}"
        )
    providers, ctx_id = onnx_providers(torch.device(device))
    recognizer = _load_onnx(_tiny_recognizer_file(), "recognition", providers, onnx_threads)
    models = InsightFaceModels(CascadeFaceDetector(), recognizer, weights="random:tiny", ctx_id=ctx_id)
    models.prepare()
    return models


def load_antelopev2(
    model_dir: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
    *, onnx_threads: int = 0,
) -> InsightFaceModels:  # fmt: skip
    """SCRFD + ArcFace from ``<model_dir>/scrfd_10g_bnkps.onnx`` and ``glintr100.onnx``, offline."""
    _check_float32(ANTELOPE, dtype)
    model_dir = Path(model_dir)
    files = {"detector": model_dir / ANTELOPE_DETECTOR, "recognizer": model_dir / ANTELOPE_RECOGNIZER}
    missing = [p.absolute() for p in files.values() if not p.is_file()]
    if missing:
        raise MissingWeightsError(ANTELOPE, missing, _antelope_fetch(model_dir.absolute()))
    providers, ctx_id = onnx_providers(torch.device(device))
    detector = _load_onnx(files["detector"], "detection", providers, onnx_threads)
    if not detector.use_kps:
        raise ValueError(f"{files['detector']}: this SCRFD gives no landmarks; IMS needs them to align faces")
    recognizer = _load_onnx(files["recognizer"], "recognition", providers, onnx_threads)
    models = InsightFaceModels(detector, recognizer, weights=ANTELOPE, files=files, ctx_id=ctx_id)
    models.prepare()
    return models


# --------------------------------------------------------------------------------------------------
# VGG-Face through deepface's model object
# --------------------------------------------------------------------------------------------------
class _TinyVggFace(nn.Module):
    """VGG-Face's topology and parameter names (conv1_1 … conv5_3, fc6 as a 7x7 conv, fc7 as 1x1) with
    narrow layers; ``embed`` matches deepface's ``VggFaceBaseModel.embed`` (fc7 output, flattened)."""

    widths = (8, 16, 32, 32, 32)
    fc = 128

    def __init__(self) -> None:
        super().__init__()
        convs = (2, 2, 3, 3, 3)
        c_in = 3
        self.names: list[list[str]] = []
        for block, (n, c) in enumerate(zip(convs, self.widths, strict=True), start=1):
            names = []
            for i in range(1, n + 1):
                name = f"conv{block}_{i}"
                setattr(self, name, nn.Conv2d(c_in, c, kernel_size=3, padding=1))
                names.append(name)
                c_in = c
            self.names.append(names)
        self.fc6 = nn.Conv2d(c_in, self.fc, kernel_size=7)
        self.fc7 = nn.Conv2d(self.fc, self.fc, kernel_size=1)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.relu = nn.ReLU(inplace=True)
        # He init keeps the signal alive through 15 ReLU layers (PyTorch's default init shrinks it
        # towards all-zero fc7 outputs, whose direction is undefined).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        for names in self.names:
            for name in names:
                x = self.relu(getattr(self, name)(x))
            x = self.pool(x)
        x = self.relu(self.fc6(x))
        x = self.relu(self.fc7(x))
        return torch.flatten(x, start_dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)


def _vgg_client(base: nn.Module, device: torch.device, output_shape: int):
    """deepface's ``VggFaceClient`` around ``base`` (wrapped in its ``VggFaceDescriptor``).

    Its constructor would download weights into ``$DEEPFACE_HOME`` and pick the device itself; the
    object is assembled here with the same attributes instead, so ``predict``/``forward`` behave as
    deepface's (channels-last BGR in, (n, D) out, on ``client.device``).
    """
    from deepface.models.facial_recognition.pytorch.VGGFace import VggFaceClient, VggFaceDescriptor

    client = VggFaceClient.__new__(VggFaceClient)
    client.model_name = "VGG-Face"
    client.input_shape = (VGG_INPUT, VGG_INPUT)
    client.output_shape = output_shape
    client.device = device
    client.model = VggFaceDescriptor(base).to(device).eval()
    return client


def _full_vgg_base(device: torch.device):
    from deepface.models.facial_recognition.pytorch.VGGFace import VggFaceBaseModel

    with init_on(device):
        return VggFaceBaseModel(include_top=True)


def build_vggface(preset: str = "tiny", device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """deepface's ``VggFaceClient`` with seeded random weights (``full``: deepface's own architecture)."""
    _check_float32(VGG, dtype)
    device = torch.device(device)
    if preset not in ("tiny", "full"):
        raise ValueError(f"{VGG}: unknown preset {preset!r}; choose one of tiny, full")
    if device.type == "meta":
        base = _full_vgg_base(device) if preset == "full" else _TinyVggFace().to(device)
    else:
        # Random init on the CPU under a fixed seed: the same weights on every machine and device.
        with seeded(SEED):
            base = _full_vgg_base(torch.device("cpu")) if preset == "full" else _TinyVggFace()
    return _vgg_client(base, device, 4096 if preset == "full" else _TinyVggFace.fc)


def load_vggface(model_dir: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """deepface's ``VggFaceClient`` with ``<model_dir>/vgg_face_weights.pth`` loaded strictly.

    The file is deepface's own (fc8 classifier included, as in its ``VggFaceBaseModel``); it is read
    with ``torch.load(weights_only=True)`` (a converted ``.safetensors`` next to it works too).
    """
    _check_float32(VGG, dtype)
    path = Path(model_dir) / VGG_FILENAME
    converted = path.with_suffix(".safetensors")
    if not path.is_file() and converted.is_file():
        path = converted
    if not path.is_file():
        raise MissingWeightsError(VGG, [path.absolute()], _vgg_fetch(Path(model_dir).absolute()))
    base = load_weights_into(_full_vgg_base(torch.device("meta")), path)
    return _vgg_client(base, torch.device(device), 4096)


@lru_cache(maxsize=1)
def vggface_layouts() -> Layouts:
    return {VGG: module_layout(_full_vgg_base(torch.device("meta")))}


# --------------------------------------------------------------------------------------------------
# Registry entries
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _BringYourOwnSpec(ModelSpec):
    """A model without a working public download: the fetch command says where to copy the files."""

    def manual_fetch_command(self, weights_dir: str | Path) -> str:
        return _antelope_fetch(self.model_dir(weights_dir))


def _antelope_fetch(dest: Path) -> str:
    sources = " ".join(f"/path/to/{ANTELOPE}/{name}" for name in (ANTELOPE_DETECTOR, ANTELOPE_RECOGNIZER))
    quoted = shlex.quote(str(dest))
    return (
        f"# {ANTELOPE} has no working public download (insightface's release URL is dead upstream): "
        f"copy these files from your own {ANTELOPE} package (non-commercial research licence)\n"
        f"mkdir -p {quoted} && cp {sources} {quoted}/"
    )


def _vgg_fetch(dest: Path) -> str:
    target = shlex.quote(str(dest / VGG_FILENAME))
    return f"mkdir -p {shlex.quote(str(dest))} && curl -L -o {target} {VGG_URL}"


ANTELOPE_SPEC = register(
    _BringYourOwnSpec(
        name=ANTELOPE,
        description="InsightFace antelopev2: SCRFD-10G face detector (5 landmarks) + ArcFace R100 (Glint360K), ONNX",
        licence="insightface code MIT; pretrained models NON-COMMERCIAL research use only",
        restricted=True,
        licence_note=(
            "insightface states that its pretrained models, whether downloaded by hand or by the library, "
            "are for non-commercial research purposes only. Weights are not redistributed here."
        ),
        hub_repo=None,
        hub_revision=None,
        # Not pinned: no authoritative checksum is published for these files.
        files=(WeightFile(ANTELOPE_DETECTOR), WeightFile(ANTELOPE_RECOGNIZER)),
        builder=build_antelopev2,
        loader=load_antelopev2,
        presets=("tiny",),
    )
)

VGG_SPEC = register(
    ModelSpec(
        name=VGG,
        description="VGG-Face (Parkhi et al. 2015), deepface's PyTorch version: 4096-d fc7 descriptor, 224 px",
        licence="deepface MIT; VGG-Face weights by Oxford VGG — treat as non-commercial research use",
        restricted=True,
        licence_note=(
            "The weight file is deepface's PyTorch conversion of Oxford VGG's VGG-Face model; deepface's "
            "code is MIT, the model's own terms come from its authors (research use). Not redistributed here."
        ),
        hub_repo=None,
        hub_revision=None,
        files=(WeightFile(VGG_FILENAME, url=VGG_URL, layout=VGG),),
        builder=build_vggface,
        loader=load_vggface,
        layouts=vggface_layouts,
    )
)

