"""medunifier.model: the vision encoder, the image-text encoder, the generator and `MedUnifier`, which joins them.

`load_model` is the one way the layers above read a trained model; it imports the model code on first use so
that importing this package stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from medunifier.model.medunifier import MedUnifier

__all__ = ["default_device", "load_model"]


def default_device() -> str:
    """"cuda" when a GPU is visible, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(ckpt: str | Path, device: str | None = None) -> MedUnifier:
    """A trained MedUnifier from a run folder (or its `model/`), in eval mode.

    Args:
        ckpt: the run folder or its `model/` (see `MedUnifier.from_pretrained`).
        device: where to put the weights (default: `default_device()`).
    """
    from medunifier.model.medunifier import MedUnifier

    model = MedUnifier.from_pretrained(ckpt, map_location=device or default_device())
    model.eval()
    return model
