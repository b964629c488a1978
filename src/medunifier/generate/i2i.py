"""Image-to-image with a trained run: translate, upscale and segment one image (`medunifier generate ...`, REST).

`ImageToImage.from_run(RUN)` loads the model; `translate(image, to=KIND)`, `upscale(image, scale=K)` and
`segment(image, finding=F)` return uint8 arrays at the model's image size. The instruction given to the model
is the phrasing its training records use (`instruction_for`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medunifier.data.converters.mri import MRI_TRANSLATIONS
from medunifier.data.images import as_array, to_tensor
from medunifier.data.synthcxr import I2I_SCALES, I2I_TRANSLATIONS, MASK_FINDINGS, MASK_NAMES
from medunifier.utils import denormalise

__all__ = ["FINDING_ALIASES", "ImageToImage", "instruction_for", "translation_kinds"]

FINDING_ALIASES = {"cardiomegaly": "heart"}  # a finding whose mask is an organ's outline


def translation_kinds() -> list[str]:
    """Every target kind `translate` knows: SynthCXR's and the MRI contrasts."""
    return [*I2I_TRANSLATIONS, *MRI_TRANSLATIONS]


def instruction_for(task: str, *, to: str | None = None, scale: int | None = None, finding: str | None = None) -> str:
    """The instruction of a request, as the training records phrase it.

    Raises ValueError naming the accepted values for an unknown kind, scale or finding.
    """
    if task == "translate":
        phrasings = {**{k: v[0] for k, v in I2I_TRANSLATIONS.items()}, **MRI_TRANSLATIONS}
        if to not in phrasings:
            raise ValueError(f"unknown target kind {to!r}: use one of {sorted(phrasings)}")
        return phrasings[to]
    if task == "upscale":
        if scale not in I2I_SCALES:
            raise ValueError(f"scale must be one of {list(I2I_SCALES)}, got {scale!r}")
        return f"upscale x{scale}"
    if task == "segment":
        name = FINDING_ALIASES.get(str(finding), finding)
        if name not in MASK_FINDINGS:
            raise ValueError(f"unknown finding {finding!r}: use one of {[*MASK_FINDINGS, *FINDING_ALIASES]}")
        return f"outline {MASK_NAMES[name]}"
    raise ValueError(f"unknown image-to-image task {task!r}: translate, upscale or segment")


@dataclass
class ImageToImage:
    """A loaded model with an image-to-image head and its preprocessing."""

    model: Any

    @classmethod
    def from_run(cls, ckpt: str | Path, device: str | None = None) -> ImageToImage:
        from medunifier.generate.train_prior import model_dir_of
        from medunifier.model import load_model

        model = load_model(model_dir_of(ckpt), device)
        if getattr(model, "i2i", None) is None:
            raise ValueError(f"{ckpt}: the model has no image-to-image head (train it with i2i.enabled=true and "
                             "'i2i:' mixture keys)")
        return cls(model)

    @property
    def size(self) -> int:
        return self.model.config.image.size

    def _run(self, image: Any, instruction: str) -> tuple[np.ndarray, np.ndarray]:
        c = self.model.config.image
        pixels = to_tensor(as_array(image), c.size, c.channels, c.mean, c.std)[None]
        with torch.no_grad():
            out, mask = self.model.image_to_image(pixels.to(next(self.model.parameters()).device), [instruction])
        grey = denormalise(out[0].float(), c.mean, c.std).clamp(0, 1).mean(0).cpu().numpy()
        return (grey * 255.0 + 0.5).astype(np.uint8), mask[0, 0].float().cpu().numpy()

    def translate(self, image: Any, to: str) -> np.ndarray:
        """The image translated to `to` (a kind of `translation_kinds()`): uint8 (S, S)."""
        return self._run(image, instruction_for("translate", to=to))[0]

    def upscale(self, image: Any, scale: int) -> np.ndarray:
        """An (S / scale)-pixel image upscaled to uint8 (S, S); another input size is refused (the model learned
        this factor from that size)."""
        instruction = instruction_for("upscale", scale=scale)
        arr = as_array(image)
        if arr.shape[0] * scale != self.size or arr.shape[1] * scale != self.size:
            raise ValueError(f"an x{scale} upscale needs a {self.size // scale}x{self.size // scale} input (the model "
                             f"makes {self.size}x{self.size} images), got {arr.shape[1]}x{arr.shape[0]}")
        return self._run(arr, instruction)[0]

    def segment(self, image: Any, finding: str) -> tuple[np.ndarray, np.ndarray]:
        """(mask bool (S, S) at probability >= 0.5, probabilities float (S, S)) of `finding`."""
        probs = self._run(image, instruction_for("segment", finding=finding))[1]
        return probs >= 0.5, probs
