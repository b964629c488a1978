"""Training data: the validated `--data` source, the DataLoaders of a curriculum stage, and the batch stream
whose position a checkpoint saves.

Data is sharded across processes by our own samplers (`ResumableRandomSampler`, the mixture sampler of a
stage, or `StreamingShardDataset`'s rank split), not by `accelerate.prepare`, so that the exact data
position can be saved and restored.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from medunifier.config import MedUnifierConfig, split_mixture_key
from medunifier.data.manifest import I2I_TASKS, ReadReport, Record, read_manifest
from medunifier.train.curriculum import Stage
from medunifier.utils import launch_rank_world

__all__ = [
    "DATA_REPORT", "SHARD_INDEX", "BatchStream", "DataError", "DataSource", "build_loader", "equalize",
    "resolve_data",
]

SHARD_INDEX = "shards.json"
DATA_REPORT = "data_report.json"  # in the run folder: the manifest records left out, and why


class DataError(ValueError):
    """Training data that cannot be used; raised before any model is built."""


@dataclass
class DataSource:
    """A validated `--data`: a manifest (records read) or a folder of tar shards (index read)."""

    path: Path
    kind: str  # "manifest" | "shards"
    train_records: list[Record] = field(default_factory=list)
    val_records: list[Record] = field(default_factory=list)
    shard_total: int | None = None
    report: ReadReport | None = None  # the manifest records left out, and why


def resolve_data(path: str | Path, report_dir: str | Path | None = None) -> DataSource:
    """Check that `path` is usable training data: a manifest.jsonl, a folder holding one, or shards.

    Args:
        path: the `--data` argument.
        report_dir: where `data_report.json` (every left-out record with its line and reason) is written
            when the manifest has bad records (by the main process only).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path not found: {path}")
    if path.is_dir():
        if (path / SHARD_INDEX).is_file() or any(path.glob("*.tar")):
            from medunifier.data.shards import read_index

            index = read_index(path)
            if not index.get("shards"):
                raise DataError(f"{path}: the shard index lists no shards")
            if index.get("total") == 0:
                raise DataError(f"{path}: the shards hold no samples")
            return DataSource(path, "shards", shard_total=index.get("total"))
        if (path / "manifest.jsonl").is_file():
            path = path / "manifest.jsonl"
        else:
            raise DataError(f"{path} is a folder without manifest.jsonl, {SHARD_INDEX} or .tar shards")
    try:
        records, report = read_manifest(path)
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read manifest {path}: {err}") from None
    lines = report.summary_lines(first=5)
    if lines and report_dir is not None:
        target = Path(report_dir) / DATA_REPORT
        if launch_rank_world()[0] == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(report.to_dict(), indent=1))
        lines.append(f"  the full list: {target}")
    for line in lines:
        print(f"warning: {line}", file=sys.stderr)
    with_image = [r for r in records if r.image is not None]
    train_records = [r for r in with_image if r.split == "train"]
    if not train_records:
        raise DataError(
            f"{path}: no training records (split 'train' with an image) among {len(records)} valid records"
            + (f" ({report.skipped} lines skipped as invalid)" if report.skipped else "")
        )
    val_records = [r for r in with_image if r.split == "val"]
    return DataSource(path, "manifest", train_records=train_records, val_records=val_records, report=report)


def equalize(batch: dict[str, Any], n: int) -> dict[str, Any]:
    """The first `n` samples of a batch (tensors and lists alike)."""
    return {k: v[:n] for k, v in batch.items()}


class BatchStream:
    """Endless batches from a DataLoader, with a data position that can be saved and restored.

    For a map-style dataset the position is the sampler's (epoch, index) computed from the number of
    batches training has consumed (DataLoader workers read ahead); for a streaming dataset it is
    (epoch, batches consumed in the epoch) and restoring re-reads and discards those batches.
    """

    def __init__(self, loader: DataLoader, batch_size: int, seed: int):
        self.loader = loader
        self.sampler = getattr(loader, "sampler", None)
        if not hasattr(self.sampler, "state_dict"):
            self.sampler = None
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0  # streaming datasets only
        self.consumed = 0  # batches taken from the current iterator
        self._it: Iterator[Any] | None = None
        self._skip = 0

    def _start(self) -> None:
        if self.loader.generator is not None:  # worker seeds: a function of the epoch, not of the global RNG
            self.loader.generator.manual_seed(self.seed * 1000 + self.epoch)
        if self.sampler is None and hasattr(self.loader.dataset, "set_epoch"):
            self.loader.dataset.set_epoch(self.epoch)
        self._it = iter(self.loader)
        self.consumed = 0
        while self._skip > 0:
            self._skip -= 1
            next(self._it)
            self.consumed += 1

    def next(self) -> dict[str, Any] | None:
        """The next batch (None when the collator dropped every sample), moving on to new epochs as needed."""
        if self._it is None:
            self._start()
        empty_epochs = 0
        while True:
            try:
                batch = next(self._it)
                break
            except StopIteration:
                # a process's share of a streamed epoch may be smaller than a batch; many in a row is an error
                empty_epochs += self.consumed == 0
                if empty_epochs >= 10:
                    raise DataError("the training data yielded no full batch in 10 epochs in a row: fewer "
                                    "samples than batch_size for this process?") from None
                self.epoch += 1
                self._start()
        self.consumed += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        if self.sampler is not None:
            if self._it is None:
                return {"sampler": self.sampler.state_dict()}
            return {"sampler": self.sampler.state_dict(samples_consumed=self.consumed * self.batch_size)}
        return {"epoch": self.epoch, "batches": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._it = None
        if self.sampler is not None:
            self.sampler.load_state_dict(state["sampler"])
        else:
            self.epoch, self._skip = int(state["epoch"]), int(state["batches"])


def build_loader(config: MedUnifierConfig, source: DataSource, stage: Stage, split: str, tokenizer: Any, *,
                 rank: int, world: int, pin_memory: bool) -> DataLoader | None:
    """The DataLoader of one process for a stage's `split` ("train" or "val"); None when the split is empty.

    Args:
        config: the run's config (`train.*` loader settings, `image.*` preprocessing, `text.max_length`).
        source: the validated `--data`.
        stage: the curriculum stage: its index seeds the order, its mixture samples the train split.
        split: "train" (shuffled, mixture-sampled, full batches only) or "val" (in order).
        tokenizer: the model's tokenizer, for the collator.
        rank: this process's index; it reads its own share of the data.
        world: the number of processes.
        pin_memory: pin host batches (for a CUDA device).
    """
    from medunifier.data.dataset import (
        Collator,
        ManifestDataset,
        ResumableRandomSampler,
        make_mixture_sampler,
    )

    cfg, tc = config, config.train
    collate = Collator(tokenizer, max_length=cfg.text.max_length)
    image_kw = {"image_size": cfg.image.size, "channels": cfg.image.channels,
                "mean": cfg.image.mean, "std": cfg.image.std}
    seed = tc.seed + 1000 * stage.index
    common = {"batch_size": tc.batch_size, "collate_fn": collate, "num_workers": tc.num_workers,
              "pin_memory": pin_memory, "persistent_workers": False}
    if source.kind == "shards":
        from medunifier.data.shards import StreamingShardDataset

        dataset = StreamingShardDataset(source.path, splits=[split], seed=seed,
                                        shuffle_buffer=256 if split == "train" else 0,
                                        rank=rank, world_size=world, **image_kw)
        return DataLoader(dataset, drop_last=split == "train", generator=torch.Generator(), **common)
    records = source.train_records if split == "train" else source.val_records
    if split != "train" or not any(split_mixture_key(k)[0] == "i2i" for k in stage.mixture):
        records = [r for r in records if r.task not in I2I_TASKS]  # they train only under "i2i:" keys
    if not records:
        return None
    dataset = ManifestDataset(records, root=source.path.parent,
                              hash_images=cfg.vision.feature_cache is not None, **image_kw)
    if split == "train" and stage.mixture:
        sampler = make_mixture_sampler(dataset, stage.mixture, seed=seed, num_replicas=world,
                                       rank=rank, batch_size=tc.batch_size)
    else:
        sampler = ResumableRandomSampler(len(dataset), seed=seed, num_replicas=world, rank=rank,
                                         shuffle=split == "train")
        if split == "train" and len(sampler) < tc.batch_size:
            raise DataError(f"the train split has {len(dataset)} samples: fewer than one batch of "
                            f"{tc.batch_size} per process ({world} processes)")
    return DataLoader(dataset, sampler=sampler, drop_last=split == "train", generator=torch.Generator(),
                      **common)
