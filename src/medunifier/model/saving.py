"""A trained model's folder: safetensors weights, the JSON config and the tokenizer files; never pickle.

    model_dir/
        model.safetensors   every tensor once (tied weights, such as the LM head, under one name)
        config.json         the MedUnifierConfig, with text.tokenizer pointing at tokenizer/
        tokenizer/          the tokenizer's files
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from medunifier.config import MedUnifierConfig, config_from_dict
from medunifier.pretrained import SAVED_CONFIG_NAME, SAVED_TOKENIZER_DIR, saved_model_dir
from medunifier.tokens import load_tokenizer

if TYPE_CHECKING:
    from medunifier.model.medunifier import MedUnifier

__all__ = ["CONFIG_NAME", "TOKENIZER_DIR", "WEIGHTS_NAME", "load_pretrained", "save_pretrained", "save_weights"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = SAVED_CONFIG_NAME
TOKENIZER_DIR = SAVED_TOKENIZER_DIR


def _untied(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The state with each shared storage once: safetensors refuses tensors that share memory."""
    seen: dict[int, str] = {}
    unique = {}
    for key, tensor in state.items():
        ptr = tensor.data_ptr() if tensor.numel() else id(tensor)
        if ptr in seen and state[seen[ptr]].shape == tensor.shape:
            continue
        seen[ptr] = key
        unique[key] = tensor
    return unique


def save_pretrained(model: MedUnifier, out_dir: str | Path) -> Path:
    """Write `model` to `out_dir` (created) as described in the module docstring; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out)
    data = model.config.to_dict()
    data["text"]["tokenizer"] = TOKENIZER_DIR
    (out / CONFIG_NAME).write_text(json.dumps(data, indent=2))
    model.tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    return out


def save_weights(model: nn.Module, out_dir: str | Path) -> Path:
    """Write `model`'s tensors to `out_dir/model.safetensors` through a temporary file and a rename, so that a
    reader never sees a half-written file and a failed write leaves the previous weights in place."""
    path = Path(out_dir) / WEIGHTS_NAME
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{WEIGHTS_NAME}.tmp{os.getpid()}")
    try:
        save_file(_untied(state), str(tmp), metadata={"format": "pt", "medunifier": "0.1.0"})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_pretrained(build: Callable[..., MedUnifier], model_dir: str | Path,
                    map_location: str | torch.device = "cpu") -> MedUnifier:
    """The model saved in `model_dir` (or a run folder), on `map_location`.

    Args:
        build: the model class, called as build(config, tokenizer=..., load_pretrained=False).
        model_dir: a folder written by `save_pretrained`, or a run folder holding one as `model/`.
        map_location: where the weights go.
    Raises RuntimeError when a weight is missing or unexpected (tied weights aside).
    """
    model_dir = saved_model_dir(model_dir)
    data: dict[str, Any] = json.loads((model_dir / CONFIG_NAME).read_text())
    tokenizer = load_tokenizer(str(model_dir / TOKENIZER_DIR))
    data["text"]["tokenizer"] = str(model_dir / TOKENIZER_DIR)
    config: MedUnifierConfig = config_from_dict(data, str(model_dir / CONFIG_NAME))
    model = build(config, tokenizer=tokenizer, load_pretrained=False)
    state = load_file(str(model_dir / WEIGHTS_NAME), device=str(map_location))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if _is_tied(model, k, state)}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.config.text.tokenizer = str(model_dir / TOKENIZER_DIR)
    return model.to(map_location)


def _is_tied(model: nn.Module, key: str, state: dict[str, Tensor]) -> bool:
    """True when `key` shares storage with a parameter that was saved under another name."""
    params = dict(model.state_dict())
    target = params.get(key)
    if target is None:
        return False
    return any(
        other in state and other != key and params[other].data_ptr() == target.data_ptr() for other in params
    )
