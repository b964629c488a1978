"""`medunifier data features`: write a frozen backbone's outputs to disk (the writer of
`medunifier.model.feature_cache`).

    medunifier data features --vision DIR --data M --out CACHE [--config C] [--shard-size N] [--dtype float16]

The backbone is the one `VisionEncoder` would build from `vision.pretrained=DIR` with the config's
image size, channels and normalisation (`--config`, overrides such as image.size=128), so its
fingerprint is the one a stage-1 model with the same settings computes. Every process of a `torchrun` launch takes every
world-th record and writes its own shards and index; readers merge the indexes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from medunifier.config import MedUnifierConfig
from medunifier.data.dataset import ManifestDataset
from medunifier.model.feature_cache import CACHE_FILE, FORMAT
from medunifier.model.vision import VisionEncoder
from medunifier.utils import launch_rank_world

__all__ = ["write_feature_cache"]


def _collate(items: list[dict[str, Any] | None]) -> dict[str, Any]:
    kept = [it for it in items if it is not None]
    return {"keys": [it["cache_key"] for it in kept],
            "pixel_values": torch.stack([it["pixel_values"] for it in kept]) if kept else None}


@torch.no_grad()
def write_feature_cache(config: MedUnifierConfig, data: str | Path, out: str | Path, shard_size: int = 4096,
                        dtype: str = "float16", batch_size: int = 128, splits: list[str] | None = None,
                        device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    """Compute the frozen backbone's output for every record with an image and write the cache folder.

    Returns a summary: entries written by this process, shards, seconds, the fingerprint.
    """
    if not config.vision.frozen:
        raise ValueError("a feature cache holds a frozen backbone's outputs: set vision.frozen: true")
    rank, world = launch_rank_world()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vision_config = config.vision.model_copy(update={"feature_cache": None, "cache_features": False})
    encoder = VisionEncoder(vision_config, config.image).to(device).eval()
    store = getattr(torch, dtype)
    meta = {"format": FORMAT, "fingerprint": encoder.fingerprint(), "preprocessing": encoder.preprocessing(),
            "vision": vision_config.model_dump(mode="json"), "dtype": dtype, "world_size": world}
    c = config.image
    dataset = ManifestDataset(data, image_size=c.size, channels=c.channels, mean=c.mean, std=c.std, splits=splits,
                              hash_images=True)
    mine = list(range(rank, len(dataset), world))
    loader = DataLoader(torch.utils.data.Subset(dataset, mine), batch_size=batch_size, collate_fn=_collate)
    for stale in out.glob(f"features-{rank:03d}-*.safetensors"):
        stale.unlink()
    index: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    shards = 0
    start = time.perf_counter()

    def flush() -> None:
        nonlocal shard, shards
        if shard:
            name = f"features-{rank:03d}-{shards:05d}.safetensors"
            save_file(shard, str(out / name))
            index.update({k: name for k in shard})
            shards += 1
            shard = {}

    bar = None
    if progress and os.environ.get("MEDUNIFIER_NO_PROGRESS") != "1":
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), desc=f"features (rank {rank})" if world > 1 else "features", unit="image",
                   file=sys.stderr, dynamic_ncols=True)
    for batch in loader:
        if batch["pixel_values"] is None:
            continue
        features = encoder._frozen_output(batch["pixel_values"].to(device)).to(store).cpu()  # [B, L, Dv]
        if not torch.isfinite(features).all():
            raise ValueError(f"the backbone's outputs overflow {dtype}: write the cache with --dtype float32")
        for key, value in zip(batch["keys"], features):
            shard[key] = value.contiguous()
            if len(shard) >= shard_size:
                flush()
        if bar is not None:
            bar.update(len(batch["keys"]))
    flush()
    if bar is not None:
        bar.close()
    (out / f"index-{rank:03d}.json").write_text(json.dumps(index))
    if rank == 0:
        tmp = out / f".{CACHE_FILE}.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        tmp.replace(out / CACHE_FILE)
    return {"entries": len(index), "shards": shards, "seconds": time.perf_counter() - start,
            "fingerprint": meta["fingerprint"], "skipped": dataset.skipped}
