"""medunifier.data: manifests, datasets and the collator, image reading, the tokenizer, SynthCXR and converters.

`Processor` (texts and images -> the model's tensors) is loaded on first use, so that importing a light
module of this package (findings, manifest) does not pull in torch and transformers.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = ["Processor"]


def __getattr__(name: str) -> Any:
    if name == "Processor":
        value = import_module("medunifier.data.processor").Processor
        globals()[name] = value
        return value
    raise AttributeError(f"module 'medunifier.data' has no attribute {name!r}")
