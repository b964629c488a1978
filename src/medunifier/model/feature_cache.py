"""Frozen-backbone features on disk: the reader side of `medunifier data features`.

A cache folder holds

    cache.json                 format, fingerprint, backbone, preprocessing, feature shape and dtype
    index-<rank>.json          entry key -> shard file, one per writing process
    features-<rank>-<k>.safetensors   one tensor per entry, named by its key: the backbone's output [L, Dv]

An entry key is `<record id>|<first 16 hex digits of the image file's SHA-256>` (made by
`ManifestDataset(..., hash_images=True)`), so an edited image misses instead of returning stale features. The fingerprint is a SHA-256 over the backbone's weights
(every tensor, by name) and the preprocessing (backbone type, image size, channels, mean, std): a model
refuses a cache built from other weights or other preprocessing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

__all__ = ["CACHE_FILE", "DiskFeatureCache", "FeatureCacheMismatch", "fingerprint"]

CACHE_FILE = "cache.json"
FORMAT = 1


class FeatureCacheMismatch(ValueError):
    """A feature cache that does not belong to this model (other weights or preprocessing)."""


def fingerprint(backbone: nn.Module, preprocessing: dict[str, Any]) -> str:
    """SHA-256 over every weight and buffer of `backbone` (by name) and the preprocessing settings."""
    digest = hashlib.sha256(json.dumps(preprocessing, sort_keys=True).encode())
    for name, tensor in sorted(backbone.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class DiskFeatureCache:
    """Read-only access to a cache folder; `get` returns None for keys it does not hold.

    Args:
        folder: the cache folder.
        expected_fingerprint: this model's fingerprint; a different one raises `FeatureCacheMismatch`.
    """

    def __init__(self, folder: str | Path, expected_fingerprint: str | None = None):
        self.folder = Path(folder)
        meta_path = self.folder / CACHE_FILE
        if not meta_path.exists():
            raise FileNotFoundError(f"{self.folder} is not a feature cache (no {CACHE_FILE}): write one with "
                                    "`medunifier data features --vision DIR --data MANIFEST --out FOLDER`")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: unsupported cache format {self.meta.get('format')!r} (expected {FORMAT})")
        if expected_fingerprint is not None and self.meta["fingerprint"] != expected_fingerprint:
            raise FeatureCacheMismatch(
                f"the feature cache {self.folder} was written from other backbone weights or preprocessing "
                f"(cache {self.meta['fingerprint'][:12]}, this model {expected_fingerprint[:12]}; cache "
                f"preprocessing {self.meta.get('preprocessing')}): rebuild it with `medunifier data features` "
                "from this model's vision folder, or drop vision.feature_cache"
            )
        self.dtype = getattr(torch, self.meta.get("dtype", "float16"))
        self.index: dict[str, str] = {}
        for part in sorted(self.folder.glob("index-*.json")):
            self.index.update(json.loads(part.read_text()))
        self._handles: dict[str, Any] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def get(self, key: str) -> Tensor | None:
        shard = self.index.get(key)
        if shard is None:
            self.misses += 1
            return None
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = safe_open(str(self.folder / shard), framework="pt")
        self.hits += 1
        return handle.get_tensor(key)

    def put(self, key: str, value: Tensor) -> None:
        """A read-only cache keeps nothing new (a miss is computed each time it occurs)."""

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers reopen the shards themselves
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state
