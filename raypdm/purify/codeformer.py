"""CodeFormer purifier: the first half of the paper's CodeSR ("codeformer+sr").

Modes:
- ``"whole"`` (default): what the paper's code effectively ran. Each image is resized to 512x512
  (bilinear), restored with ``net(x, w=fidelity_weight, adain=True)[0]``, and resized back to its own
  size, so shapes are preserved. The official script differs for whole images: it detects and aligns
  faces (RetinaFace + FFHQ 5-point template), restores each 512 crop and pastes it back, after
  upscaling the image only when its short side is below 512. Detection, parsing and paste-back are not
  reproduced here; on the 512x512 aligned face crops of the usual datasets both amount to one
  forward pass over the whole image.
- ``"aligned"``: the official ``--has_aligned`` path. The input is taken to be an aligned face crop,
  resized to 512x512 and restored; the output is the 512x512 restored face (what the script saves).

Pre/post-processing follows the official script: RGB/255 -> [-1, 1]; output clamped to [-1, 1], mapped
to [0, 255] and rounded. Resizing is bilinear with half-pixel centres and no antialiasing by default,
like the script's ``cv2.INTER_LINEAR``; it runs on the device in float, so pixels are rounded once, at
the end, instead of after each resize.

Weights: ``BuildContext.preset`` "tiny" or "full" with seeded random weights, or, with ``preset="full"``
and a ``weights_dir``, the released ``<weights_dir>/codeformer/codeformer.pth`` (NTU S-Lab License 1.0,
non-commercial use only). The tiny preset has no released weights, so ``weights_dir`` is ignored for it.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from raypdm.models.codeformer import CodeFormer, codeformer_weight_path
from raypdm.models.registry import get as get_model_spec
from raypdm.models.weights import sha256_file
from raypdm.purify.base import BuildContext, Purifier, PurifierOptions, register_purifier

__all__ = ["CodeFormerOptions", "CodeFormerPurifier"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CodeFormerOptions(PurifierOptions):
    fidelity_weight: float = Field(
        0.5, ge=0.0, le=1.0, description="w: 0 = codebook prior only (fuse blocks skipped), 1 = most faithful"
    )
    mode: Literal["whole", "aligned"] = Field(
        "whole", description="'whole': resize to 512, restore, resize back; 'aligned': 512 aligned face out"
    )
    adain: bool = Field(True, description="AdaIN the looked-up codes to the input's statistics (official: on)")
    antialias: bool = Field(False, description="antialias when shrinking to 512 (off: like cv2.INTER_LINEAR)")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="compute dtype on a GPU; the CPU always runs float32"
    )
    batch_size: int = Field(8, ge=1, le=1024, description="images per forward pass (bounds device memory)")


@register_purifier("codeformer", CodeFormerOptions)
class CodeFormerPurifier(Purifier):
    name = "codeformer"
    uses_gpu = True

    def __init__(self, options: CodeFormerOptions | None = None, context: BuildContext | None = None):
        self.options = options or CodeFormerOptions()
        self.context = context or BuildContext()
        self.device = torch.device(self.context.device)
        # Half precision on a CPU is slow and poorly supported; there the option is a no-op.
        self.dtype = _DTYPES[self.options.dtype] if self.device.type != "cpu" else torch.float32
        self.weights_path: Path | None = None
        if self.context.real_weights:
            model_dir = get_model_spec("codeformer").model_dir(self.context.weights_dir)
            self.weights_path = codeformer_weight_path(model_dir)  # for weights_id
        self.net: CodeFormer = self.context.model("codeformer", device=self.device, dtype=self.dtype)
        self.net.requires_grad_(False)
        self.size = self.net.config.img_size

    @cached_property
    def weights_id(self) -> str:
        """What identifies the weights in the stage key: the file's sha256, or the random preset."""
        if self.weights_path is None:
            return f"random:{self.context.preset}"
        return f"sha256:{sha256_file(self.weights_path)}"

    def config_dict(self) -> dict[str, Any]:
        return {**super().config_dict(), "preset": self.context.preset, "weights": self.weights_id}

    # ------------------------------------------------------------------------------------------ pixels

    def _resize(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(x.shape[-2:]) == size:
            return x
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=self.options.antialias)

    def _to_model_input(self, image: np.ndarray) -> torch.Tensor:
        """uint8 HxWx3 -> (1, 3, 512, 512) float32 in [-1, 1], on the device."""
        x = torch.from_numpy(image).to(self.device, non_blocking=True)
        x = x.permute(2, 0, 1).unsqueeze(0).float()
        x = self._resize(x, (self.size, self.size))
        return (x / 255.0 - 0.5) / 0.5  # the official normalise(mean=0.5, std=0.5)

    @torch.inference_mode()
    def _restore(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 512, 512) in [-1, 1] -> restored (B, 3, 512, 512) in [0, 255], float32, unrounded."""
        out = self.net(x.to(self.dtype), w=self.options.fidelity_weight, adain=self.options.adain)[0]
        return (out.float().clamp(-1.0, 1.0) + 1.0) / 2.0 * 255.0

    def _to_uint8(self, y: torch.Tensor) -> np.ndarray:
        """(1, 3, H, W) in [0, 255] -> uint8 HxWx3 (rounded half to even, like the script's numpy round)."""
        y = y.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0)
        return y.cpu().numpy()

    def purify(self, images: list[np.ndarray]) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        # Every image becomes 512x512 before the network, so any mix of sizes batches together.
        for start in range(0, len(images), self.options.batch_size):
            chunk = images[start : start + self.options.batch_size]
            with torch.inference_mode():
                restored = self._restore(torch.cat([self._to_model_input(im) for im in chunk]))
                for image, y in zip(chunk, restored.split(1)):
                    if self.options.mode == "whole":
                        y = self._resize(y, (int(image.shape[0]), int(image.shape[1])))
                    out.append(self._to_uint8(y))
        return out
