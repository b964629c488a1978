"""Manifests as WebDataset tar shards, read back in streaming mode across ranks and workers.

Layout of `out_dir`: `shard-000000.tar`, `shard-000001.tar`, ... and `shards.json` (names,
counts, total). Each sample is two tar members sharing a key: `KEY.png` (the image file's bytes
exactly as stored; the extension follows the source file, e.g. `.jpg` or `.dcm`) and `KEY.json`
(the manifest record). Keys are zero-padded sample numbers, so record ids with dots or slashes
are safe. Plain `tarfile` writes and reads them; any WebDataset reader can read them too.

`StreamingShardDataset` gives each (rank, DataLoader worker) pair, a "consumer", whole shards
where the shard count allows and splits the leftover shards sample by sample (sample number
modulo the number of consumers), so every sample is read exactly once per epoch.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from medunifier.data.dataset import Item, make_item, warn_skipped
from medunifier.data.images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image_bytes, to_tensor
from medunifier.data.manifest import Record, load_records
from medunifier.utils import ChannelStat, launch_rank_world

INDEX_NAME = "shards.json"


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.tar"


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed mtime: shards are reproducible
    tar.addfile(info, io.BytesIO(data))


class _ShardWriter:
    """Opens shard after shard (each written to a temp name and renamed when complete)."""

    def __init__(self, out_dir: Path, shard_size: int):
        self.out_dir, self.shard_size = out_dir, shard_size
        self.paths: list[Path] = []
        self.counts: list[int] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None

    def add(self, key: str, image_ext: str, image: bytes, record: dict[str, Any]) -> None:
        if self._tar is None:
            path = self.out_dir / shard_name(len(self.paths))
            self._tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            self._tar = tarfile.open(self._tmp, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115 (closed in close())
            self.paths.append(path)
            self.counts.append(0)
        _add_member(self._tar, f"{key}.{image_ext}", image)
        _add_member(self._tar, f"{key}.json", json.dumps(record, ensure_ascii=False).encode("utf-8"))
        self.counts[-1] += 1
        if self.counts[-1] == self.shard_size:
            self.close()

    def close(self) -> None:
        if self._tar is not None and self._tmp is not None:
            self._tar.close()
            self._tmp.replace(self.paths[-1])
            self._tar, self._tmp = None, None


def write_shards(manifest: str | Path, out_dir: str | Path, shard_size: int = 1000,
                 splits: Sequence[str] | None = None) -> list[Path]:
    """Write the manifest's records that have a readable image file as tar shards + `shards.json`.

    Records without an image or whose file is missing are reported and left out (listed in the
    index under "skipped"); image bytes are not decoded here, so a corrupt file is only caught
    when read (the streaming dataset skips it with a warning).
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    manifest, out_dir = Path(manifest), Path(out_dir)
    records = load_records(manifest, splits=splits)
    root = manifest.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out_dir, shard_size)
    skipped: list[str] = []
    try:
        for record in records:
            image = record.training_image()  # an edit record's target (it goes with the target report)
            path = None if image is None else root / image
            if path is None:
                skipped.append(f"{record.id}: no image")
                continue
            try:
                data = path.read_bytes()
            except OSError as err:
                warn_skipped(path, err.strerror or str(err))
                skipped.append(f"{record.id}: {path}: {err.strerror or err}")
                continue
            ext = path.suffix.lower().lstrip(".") or "png"
            writer.add(f"{sum(writer.counts):09d}", ext, data, record.model_dump())
    finally:
        writer.close()
    index = {
        "format": "webdataset",
        "shards": [{"name": p.name, "count": c} for p, c in zip(writer.paths, writer.counts)],
        "total": sum(writer.counts),
        "shard_size": shard_size,
        "manifest": str(manifest),
        "skipped": skipped,
    }
    tmp = out_dir / f".{INDEX_NAME}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out_dir / INDEX_NAME)
    return list(writer.paths)


def read_index(shard_dir: str | Path) -> dict[str, Any]:
    """`shards.json`, or an index built from the `*.tar` files found (counts unknown) when it is absent."""
    shard_dir = Path(shard_dir)
    index_path = shard_dir / INDEX_NAME
    if index_path.is_file():
        return json.loads(index_path.read_text(encoding="utf-8"))
    tars = sorted(shard_dir.glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"no {INDEX_NAME} and no .tar shards in {shard_dir}")
    return {"shards": [{"name": p.name, "count": None} for p in tars], "total": None}


def iter_shard_samples(path: str | Path, expected: int | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of a tar shard, members grouped by key in order.

    A truncated or corrupt shard ends its stream with a warning instead of failing the epoch (the
    partly read sample is dropped). Python's tarfile ends silently when a shard is cut exactly at
    a member boundary, so with `expected` (the index's count) a short shard is reported too.
    """
    key: str | None = None
    parts: dict[str, bytes] = {}
    count = 0
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot:
                    continue
                member_key = f"{folder}/{stem}" if folder else stem
                if member_key != key and parts:
                    count += 1
                    yield key, parts  # type: ignore[misc]
                    parts = {}
                key = member_key
                handle = tar.extractfile(member)
                parts[ext.lower()] = handle.read() if handle is not None else b""
    except (tarfile.TarError, OSError, EOFError) as err:
        warn_skipped(path, f"shard unreadable after key {key} ({type(err).__name__}: {err})")
        return
    if parts and key is not None:
        count += 1
        yield key, parts
    if expected is not None and count < expected:
        warn_skipped(path, f"shard unreadable: it ended after {count} of {expected} samples (truncated?)")


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None or world_size is not None:
        rank, world_size = rank or 0, world_size or 1
    else:
        rank, world_size = launch_rank_world()
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


class StreamingShardDataset(IterableDataset):
    """Iterate tar shards once per epoch, split across ranks and DataLoader workers.

    Yields the same item dicts as `ManifestDataset`. With `shuffle_buffer > 0`, the shard order
    is shuffled per (seed, epoch) and samples pass through a shuffle buffer of that size. Call
    `set_epoch(e)` before each epoch: non-persistent DataLoader workers copy the dataset from the
    main process every epoch, so only `set_epoch` changes their order. Inside one process (no
    workers, or persistent workers, which never see a later `set_epoch`) each pass also moves to
    the next epoch by itself. Ranks may
    see slightly different sample counts when shards are uneven; a training loop should count
    steps, not exhaust the stream in lock-step.
    """

    def __init__(self, shard_dir: str | Path, image_size: int = 64, channels: int = 3, mean: ChannelStat = 0.5,
                 std: ChannelStat = 0.5, splits: Sequence[str] | None = None, tasks: Sequence[str] | None = None,
                 seed: int = 0, shuffle_buffer: int = 0, rank: int | None = None, world_size: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        super().__init__()
        self.shard_dir = Path(shard_dir)
        self.index = read_index(self.shard_dir)
        self.shards = [self.shard_dir / s["name"] for s in self.index["shards"]]
        self.shard_counts = {path: s.get("count") for path, s in zip(self.shards, self.index["shards"])}
        self.image_size, self.channels, self.mean, self.std = image_size, channels, mean, std
        self.splits = None if splits is None else set(splits)
        self.tasks = None if tasks is None else set(tasks)
        self.seed, self.shuffle_buffer, self.epoch = seed, shuffle_buffer, 0
        self._passes = 0  # passes since the last set_epoch, in this process
        self.rank, self.world_size = rank, world_size
        self.max_pixels = max_pixels
        self.skipped = 0

    @property
    def num_samples(self) -> int | None:
        """Samples in all shards (all ranks, before split/task filtering); None without an index."""
        return self.index.get("total")

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._passes = epoch, 0

    def consumer(self) -> tuple[int, int]:
        """(this consumer's number, number of consumers) over ranks x DataLoader workers."""
        rank, world = _rank_and_world(self.rank, self.world_size)
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return rank * workers + worker, world * workers

    def _owned_samples(self, me: int, consumers: int, epoch: int) -> Iterator[tuple[str, dict[str, bytes]]]:
        shards = list(self.shards)
        if self.shuffle_buffer > 0:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(shards)  # same order in every consumer
        whole = len(shards) // consumers * consumers
        for path in shards[me:whole:consumers]:
            yield from iter_shard_samples(path, self.shard_counts[path])
        leftover = (sample for path in shards[whole:] for sample in iter_shard_samples(path, self.shard_counts[path]))
        for number, sample in enumerate(leftover):
            if number % consumers == me:
                yield sample

    def _shuffled(self, samples: Iterator[Any], me: int, epoch: int) -> Iterator[Any]:
        if self.shuffle_buffer <= 1:
            yield from samples
            return
        rng = random.Random((self.seed * 1_000_003 + epoch) * 65_537 + me)
        buffer: list[Any] = []
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            slot = rng.randrange(len(buffer))
            yield buffer[slot]
            buffer[slot] = sample
        rng.shuffle(buffer)
        yield from buffer

    def _records(self, me: int, consumers: int, epoch: int) -> Iterator[tuple[Record, str, bytes]]:
        for key, parts in self._owned_samples(me, consumers, epoch):
            if "json" not in parts:
                warn_skipped(f"{key}", "sample has no .json record")
                continue
            try:
                record = Record.model_validate(json.loads(parts["json"]))
            except ValueError as err:  # JSONDecodeError and pydantic's ValidationError are ValueErrors
                warn_skipped(f"{key}.json", f"not a valid record ({str(err).splitlines()[0]})")
                self.skipped += 1
                continue
            if (self.splits is not None and record.split not in self.splits) or (
                self.tasks is not None and record.task not in self.tasks
            ):
                continue
            image_ext = next((ext for ext in parts if ext != "json"), None)
            if image_ext is None:
                warn_skipped(f"{key} ({record.id})", "sample has no image member")
                self.skipped += 1
                continue
            yield record, f"{key}.{image_ext}", parts[image_ext]

    def __iter__(self) -> Iterator[Item]:
        me, consumers = self.consumer()
        epoch = self.epoch + self._passes
        self._passes += 1
        for record, name, data in self._shuffled(self._records(me, consumers, epoch), me, epoch):
            try:
                array = load_image_bytes(data, name=name, max_pixels=self.max_pixels)
            except ImageLoadError as err:
                warn_skipped(f"{name} ({record.id})", err.reason)
                self.skipped += 1
                continue
            yield make_item(record, to_tensor(array, self.image_size, self.channels, self.mean, self.std))
