"""Torch datasets, the batch collator and samplers for training.

`ManifestDataset` turns manifest records into item dicts (image tensor, text, labels); `Collator`
tokenizes a list of items into the batch the model consumes:

    {"ids": list[str], "pixel_values": FloatTensor[B, C, S, S],
     "input_ids": LongTensor[B, T]       [CLS] ... [SEP], right-padded with [PAD],
     "attention_mask": LongTensor[B, T], "prefix_lengths": LongTensor[B] (0 unless vqa),
     "labels": FloatTensor[B, len(FINDINGS)] (1, 0, or -1 for unknown/uncertain),
     "tasks": list[str], "modalities": list[str],
     "cache_keys": list[str] (only from a dataset with `hash_images`: "<id>|<image file SHA-256, 16 digits>")}

For `vqa` items the text is "[CLS] question [SEP] answer [SEP]" and `prefix_lengths` counts the
"[CLS] question [SEP]" tokens, so a generation loss can be restricted to the answer.

An `edit` record (a counterfactual pair: `image` = source, `target_image`, `text` = the target's
report) yields the TARGET image with the target report, so every objective sees a matching image-text
pair (the interleaved use: the report that the edit should produce, grounded on the image it produced).
An image-to-image record (translate / upscale / segment) yields its SOURCE image as `pixel_values` with its
instruction as the text, and its target as `i2i_targets` [B, C, S, S] (normalised like the inputs) or, for
segment, `i2i_masks` [B, 1, S, S] in {0, 1}; both keys are present (zeros where an item has none of its kind)
whenever the batch holds an image-to-image item. Those records are drawn only by "i2i:" mixture keys.

The source image comes along as `source_pixel_values` [B, C, S, S] with `has_source` bool [B] (zeros
where an item has none); these two keys are present only when the batch holds an edit item. The model
does not read them yet: they are there for source-conditioned objectives. The streaming shard dataset
trains an edit record on its target image too but does not carry the source.

Objective routing: a mixture key may carry a prefix, "i2t:report" (report records trained with the
image-to-text objectives only: ITC, ITM, ITG) or "t2i:report" (trained with the text-to-image objective
only: TIG); a plain key trains with every objective of the stage. Because loss weights apply to a whole
forward pass, a mixture with prefixed keys draws whole micro-batches from one objective group (chosen
per block of `batch_size x num_replicas` draws, in the groups' proportions) and the batch says which
under `objectives` (list[str]: "i2t", "t2i" or "all"; see `train.curriculum.Stage.losses_for`).

`MixtureSampler` draws indices so that tasks/sources follow curriculum weights;
`ResumableRandomSampler` is a DistributedSampler-like shuffler whose position can be saved and
restored so that an interrupted run continues at exactly the next sample.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from medunifier.config import split_mixture_key
from medunifier.data.findings import FINDINGS
from medunifier.data.images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image, to_tensor
from medunifier.data.manifest import (
    I2I_TASKS,
    Record,
    UnsafePathError,
    contained_path,
    get_image_root,
    load_records,
)
from medunifier.data.processor import Processor
from medunifier.utils import ChannelStat, denormalise

Item = dict[str, Any]


def labels_vector(labels: Mapping[str, int]) -> torch.Tensor:
    """Record labels -> FloatTensor[len(FINDINGS)]: 1 present, 0 absent, -1 unknown or uncertain."""
    vec = torch.full((len(FINDINGS),), -1.0)
    for i, name in enumerate(FINDINGS):
        value = labels.get(name)
        if value in (0, 1):
            vec[i] = float(value)
    return vec


def make_item(record: Record, pixel_values: torch.Tensor, source_pixel_values: torch.Tensor | None = None,
              objective: str | None = None) -> Item:
    """The item dict shared by the map-style and the streaming datasets (an image-to-image record's text is
    its instruction)."""
    item = {
        "id": record.id,
        "pixel_values": pixel_values,  # (C, S, S)
        "text": record.instruction if record.task in I2I_TASKS else record.text,
        "task": record.task,
        "question": record.question or "",
        "answer": record.answer or "",
        "labels": labels_vector(record.labels),
        "modality": record.modality,
        "source": record.source,
    }
    if source_pixel_values is not None:  # an edit record's source image (C, S, S)
        item["source_pixel_values"] = source_pixel_values
    if objective is not None:  # "i2t" | "t2i" | "all": which objectives train on this item
        item["objective"] = objective
    return item


def trainable(record: Record) -> bool:
    """A record with an image to train on (an edit record needs its target image)."""
    return record.image is not None and (record.task != "edit" or record.target_image is not None)


def warn_skipped(path: str | Path, reason: str) -> None:
    print(f"warning: skipped {path}: {reason}", file=sys.stderr, flush=True)


def filter_records(records: Sequence[Record], splits: Sequence[str] | None = None,
                   tasks: Sequence[str] | None = None) -> list[Record]:
    split_set = None if splits is None else set(splits)
    task_set = None if tasks is None else set(tasks)
    return [r for r in records
            if (split_set is None or r.split in split_set) and (task_set is None or r.task in task_set)]


class ManifestDataset(Dataset):
    """Map-style dataset over a manifest (or a list of records whose paths are relative to `root`).

    Records without an image (and edit records without a target image) are left out (reported once).
    Image paths must stay inside `image_root` (default: the one set by `set_image_root`, else `root`); one
    that leaves it is treated like an unreadable image.
    An image that cannot be read makes `__getitem__` return None after one warning; `Collator` drops
    such items and `skipped` counts them (per process: each DataLoader worker keeps its own count).
    An index may be an int or, from a `MixtureSampler` with objective keys, (int, objective).
    """

    def __init__(self, manifest: str | Path | Sequence[Record], root: str | Path | None = None,
                 image_size: int = 64, channels: int = 3, mean: ChannelStat = 0.5, std: ChannelStat = 0.5,
                 splits: Sequence[str] | None = None, tasks: Sequence[str] | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, image_root: str | Path | None = None,
                 hash_images: bool = False):
        image_root = image_root if image_root is not None else get_image_root()
        if isinstance(manifest, (str, Path)):
            records = load_records(manifest, image_root=image_root)
            root = Path(manifest).parent if root is None else root
        else:
            records = list(manifest)
        self.root = Path(root) if root is not None else Path(".")
        # fixed here so that DataLoader workers, which may not share the process-wide setting, check the same
        self.image_root = Path(image_root) if image_root is not None else self.root
        records = filter_records(records, splits, tasks)
        self.records = [r for r in records if trainable(r)]
        if len(self.records) < len(records):
            print(f"warning: left out {len(records) - len(self.records)} records without an image (or edit "
                  "records without a target image)", file=sys.stderr, flush=True)
        self.image_size, self.channels, self.mean, self.std = image_size, channels, mean, std
        self.max_pixels = max_pixels
        self.hash_images = hash_images  # items carry `cache_key` (record id | image file hash), see feature caches
        self._skipped: set[str] = set()

    def __len__(self) -> int:
        return len(self.records)

    @property
    def skipped(self) -> int:
        """Distinct records whose image could not be read (in this process)."""
        return len(self._skipped)

    @property
    def skipped_ids(self) -> list[str]:
        return sorted(self._skipped)

    def _pixels(self, record: Record, relative: str) -> torch.Tensor | None:
        path = self.root / relative
        try:
            array = load_image(contained_path(self.root, relative, self.image_root), self.max_pixels)
        except (ImageLoadError, UnsafePathError) as err:
            if record.id not in self._skipped:
                self._skipped.add(record.id)
                warn_skipped(path, err.reason if isinstance(err, ImageLoadError) else str(err))
            return None
        return to_tensor(array, self.image_size, self.channels, self.mean, self.std)

    def _target(self, record: Record) -> torch.Tensor | None:
        """An image-to-image record's target: the normalised target image (C, S, S), or the mask (1, S, S) in
        {0, 1} (non-zero pixels inside, resized to S then cut at one half)."""
        if record.task != "segment":
            return self._pixels(record, record.target_image)
        mask = self._pixels(record, record.mask)
        if mask is None:
            return None
        return (denormalise(mask, self.mean, self.std)[:1] > 0.5).float()

    def __getitem__(self, index: int | tuple[int, str]) -> Item | None:
        index, objective = index if isinstance(index, tuple) else (index, None)
        record = self.records[index]
        pixel_values = self._pixels(record, record.training_image())
        if pixel_values is None:
            return None
        source_pixel_values = None
        if record.task == "edit":  # trains on the target; the source rides along
            source_pixel_values = self._pixels(record, record.image)
            if source_pixel_values is None:
                return None
        item = make_item(record, pixel_values, source_pixel_values, objective)
        if record.task in I2I_TASKS:  # the source is pixel_values; the target image or mask rides along
            target = self._target(record)
            if target is None:
                return None
            item["i2i_mask" if record.task == "segment" else "i2i_target"] = target
        if self.hash_images:
            path = contained_path(self.root, record.training_image(), self.image_root)  # checked in _pixels
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            item["cache_key"] = f"{record.id}|{digest}"
        return item


class Collator:
    """Items -> the training batch (see the module docstring). Returns None if every item was dropped."""

    def __init__(self, tokenizer: Any, max_length: int = 95, pad_to_max_length: bool = False):
        self.processor = Processor(tokenizer, max_length=max_length)  # the prompt layout (and the length check)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_to_max_length = pad_to_max_length
        ids = self.processor.special
        self.pad_id, self.cls_id, self.sep_id = ids["pad"], ids["cls"], ids["sep"]
        self.dropped = 0

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.processor.token_ids(texts)

    def encode_text(self, content: list[int]) -> list[int]:
        """[CLS] content [SEP] within max_length (`Processor.encode_text`)."""
        return self.processor.encode_text(content)

    def encode_qa(self, question: list[int], answer: list[int]) -> tuple[list[int], int]:
        """[CLS] question [SEP] answer [SEP] and the prefix length (`Processor.encode_qa`)."""
        return self.processor.encode_qa(question, answer)

    def __call__(self, items: Sequence[Item | None]) -> dict[str, Any] | None:
        kept = [it for it in items if it is not None and it.get("pixel_values") is not None]
        if len(kept) < len(items):
            self.dropped += len(items) - len(kept)
            named = [it["id"] for it in items if it is not None and it.get("pixel_values") is None]
            print(f"warning: dropped {len(items) - len(kept)} unreadable samples from a batch"
                  + (f" ({', '.join(named)})" if named else ""), file=sys.stderr, flush=True)
        if not kept:
            return None
        is_qa = [it["task"] == "vqa" and bool(it.get("question")) for it in kept]
        plain = self._tokenize([it["text"] for it, qa in zip(kept, is_qa) if not qa])
        questions = self._tokenize([it["question"] for it, qa in zip(kept, is_qa) if qa])
        answers = self._tokenize([it["answer"] for it, qa in zip(kept, is_qa) if qa])
        sequences, prefix_lengths = [], []
        plain_iter, qa_iter = iter(plain), iter(zip(questions, answers))
        for qa in is_qa:
            if qa:
                seq, prefix = self.encode_qa(*next(qa_iter))
            else:
                seq, prefix = self.encode_text(next(plain_iter)), 0
            sequences.append(seq)
            prefix_lengths.append(prefix)

        width = self.max_length if self.pad_to_max_length else max(len(s) for s in sequences)
        input_ids = torch.full((len(kept), width), self.pad_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(kept), width), dtype=torch.long)  # (B, T)
        for row, seq in enumerate(sequences):
            input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, : len(seq)] = 1
        batch = {
            "ids": [it["id"] for it in kept],
            "pixel_values": torch.stack([it["pixel_values"] for it in kept]),  # (B, C, S, S)
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "prefix_lengths": torch.tensor(prefix_lengths, dtype=torch.long),  # (B,)
            "labels": torch.stack([it["labels"] for it in kept]),  # (B, len(FINDINGS))
            "tasks": [it["task"] for it in kept],
            "modalities": [it["modality"] for it in kept],
        }
        if any("source_pixel_values" in it for it in kept):  # edit items: their source images
            has_source = torch.tensor(["source_pixel_values" in it for it in kept])  # (B,)
            batch["source_pixel_values"] = torch.stack([
                it.get("source_pixel_values", torch.zeros_like(it["pixel_values"])) for it in kept])  # (B, C, S, S)
            batch["has_source"] = has_source
        if any("i2i_target" in it or "i2i_mask" in it for it in kept):  # image-to-image items: their targets
            pixels = batch["pixel_values"]
            batch["i2i_targets"] = torch.stack([it.get("i2i_target", torch.zeros_like(it["pixel_values"]))
                                                for it in kept])  # (B, C, S, S), zeros for segment items
            batch["i2i_masks"] = torch.stack([it.get("i2i_mask", pixels.new_zeros(1, *pixels.shape[2:]))
                                              for it in kept])  # (B, 1, S, S) in {0, 1}, zeros unless segment
        if all("cache_key" in it for it in kept):  # feature-cache keys (record id | image file hash)
            batch["cache_keys"] = [it["cache_key"] for it in kept]
        if any("objective" in it for it in kept):
            batch["objectives"] = [it.get("objective", "all") for it in kept]
        return batch


# ------------------------------------------------------------------------------------------ samplers


class _PositionedSampler(Sampler[int]):
    """Epoch + position bookkeeping shared by the resumable samplers.

    `position` counts the indices this rank has handed out in the current epoch. A DataLoader
    with workers reads ahead of training, so when saving a checkpoint pass the number of samples
    training really consumed since the current iteration began: `state_dict(samples_consumed=k)`.
    """

    def __init__(self, seed: int, num_replicas: int, rank: int):
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need 0 <= rank < num_replicas, got rank={rank}, num_replicas={num_replicas}")
        self.seed, self.num_replicas, self.rank = seed, num_replicas, rank
        self.epoch, self.position = 0, 0
        self._iter_epoch, self._iter_start = 0, 0

    def _epoch_length(self) -> int | None:  # indices per rank per epoch; None = endless
        raise NotImplementedError

    def _rank_indices(self, epoch: int) -> Iterator[int]:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Go to `epoch` (DistributedSampler's API). Setting the current epoch keeps the position, so a
        loop that calls set_epoch(e) after `load_state_dict` still resumes mid-epoch."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def __iter__(self) -> Iterator[int]:
        epoch, start = self.epoch, self.position
        self._iter_epoch, self._iter_start = epoch, start
        for offset, index in enumerate(itertools.islice(self._rank_indices(epoch), start, self._epoch_length())):
            self.position = start + offset + 1
            yield index
        self.epoch, self.position = epoch + 1, 0

    def state_dict(self, samples_consumed: int | None = None) -> dict[str, int]:
        """{'epoch', 'position', ...}; `samples_consumed` (this rank, since iter() began) overrides read-ahead."""
        epoch, position = self.epoch, self.position
        if samples_consumed is not None:
            epoch, position = self._iter_epoch, self._iter_start + samples_consumed
            length = self._epoch_length()
            if length is not None and position >= length:
                epoch, position = epoch + 1, 0
        return {"epoch": epoch, "position": position, "seed": self.seed, "num_replicas": self.num_replicas,
                "rank": self.rank}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"sampler seed {self.seed} differs from the saved seed {state['seed']}")
        position = int(state["position"])
        saved_replicas = int(state.get("num_replicas", self.num_replicas))
        if saved_replicas != self.num_replicas:
            # every rank had handed out `position` indices: the first position * replicas of the
            # epoch's global order; resume from there (up to num_replicas - 1 samples repeat)
            position = position * saved_replicas // self.num_replicas
        self.epoch, self.position = int(state["epoch"]), position


class ResumableRandomSampler(_PositionedSampler):
    """A shuffled order per (seed, epoch), split across ranks like DistributedSampler, resumable.

    Rank r takes every num_replicas-th index of the epoch's permutation starting at r. Without
    `drop_last` the permutation is padded by repeating its start so that all ranks get equally many.
    """

    def __init__(self, n: int, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 shuffle: bool = True, drop_last: bool = False):
        super().__init__(seed, num_replicas, rank)
        if n < 1:
            raise ValueError("ResumableRandomSampler needs at least one sample")
        self.n, self.shuffle, self.drop_last = n, shuffle, drop_last
        if drop_last:
            self.num_samples = n // num_replicas
        else:
            self.num_samples = math.ceil(n / num_replicas)
        if self.num_samples == 0:
            raise ValueError(f"{n} samples cannot be split over {num_replicas} replicas with drop_last")
        self.total_size = self.num_samples * num_replicas

    def __len__(self) -> int:
        return self.num_samples

    def _epoch_length(self) -> int:
        return self.num_samples

    def global_order(self, epoch: int) -> torch.Tensor:
        """The epoch's permutation of 0..n-1, padded or cut to total_size (LongTensor[total_size])."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        if self.total_size > self.n:
            order = order.repeat(math.ceil(self.total_size / self.n))
        return order[: self.total_size]

    def _rank_indices(self, epoch: int) -> Iterator[int]:
        return iter(self.global_order(epoch)[self.rank :: self.num_replicas].tolist())

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if "n" in state and int(state["n"]) != self.n:
            raise ValueError(f"sampler was saved for {state['n']} samples, this dataset has {self.n}")
        super().load_state_dict(state)

    def state_dict(self, samples_consumed: int | None = None) -> dict[str, int]:
        return {**super().state_dict(samples_consumed), "n": self.n}


def mixture_groups(records: Sequence[Record], mixture: Mapping[str, float]) -> dict[str, list[int]]:
    """Record indices matching each mixture key (a key, less its objective prefix, matches a record's task
    or its source). Image-to-image records (I2I_TASKS) belong only to "i2i:" keys and those keys only to them:
    a source key such as "synthcxr" does not draw them."""
    groups: dict[str, list[int]] = {key: [] for key in mixture}
    names = {key: split_mixture_key(key) for key in mixture}
    for i, r in enumerate(records):
        for key, (group, name) in names.items():
            if (r.task == name or r.source == name) and (group == "i2i") == (r.task in I2I_TASKS):
                groups[key].append(i)
    return groups


class MixtureSampler(_PositionedSampler):
    """Indices whose task/source proportions follow `mixture` weights (a curriculum stage's data mix).

    Each draw picks a key with probability weight / sum(weights), then the next record of that
    key's group in a per-group shuffled cycle (every record of a group is seen before any repeats).
    `num_samples=None` is endless. The global stream depends only on (seed, epoch); rank r takes
    every num_replicas-th draw. A record matching several keys can be drawn through each.

    With objective keys ("i2t:report", "t2i:report"; see the module docstring) the draws come in blocks
    of `batch_size x num_replicas` (one micro-batch on every rank) that all belong to one objective group
    ("i2t", "t2i", or "all" for the plain keys): the group of each block is the one furthest behind its
    share (a deterministic weighted round robin, so the groups' proportions hold to within one block),
    the key inside the group is drawn per sample. Such a sampler yields (index, group) pairs.
    """

    def __init__(self, records: Sequence[Record], mixture: Mapping[str, float], seed: int = 0,
                 num_samples: int | None = None, num_replicas: int = 1, rank: int = 0, chunk: int = 4096,
                 batch_size: int = 1):
        super().__init__(seed, num_replicas, rank)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not mixture:
            raise ValueError("mixture is empty")
        negative = {k: w for k, w in mixture.items() if w < 0}
        if negative:
            raise ValueError(f"mixture weights must be >= 0, got {negative}")
        mixture = {k: float(w) for k, w in mixture.items() if w > 0}
        if not mixture:
            raise ValueError("every mixture weight is 0")
        groups = mixture_groups(records, mixture)
        empty = [k for k, idx in groups.items() if not idx]
        if empty:
            tasks = sorted({r.task for r in records})
            sources = sorted({r.source for r in records})
            raise ValueError(f"mixture keys {empty} match no record (tasks: {tasks}, sources: {sources})")
        self.keys = list(groups)
        self.groups = [torch.tensor(groups[k], dtype=torch.long) for k in self.keys]
        self.weights = torch.tensor([mixture[k] for k in self.keys], dtype=torch.double)
        self.weights /= self.weights.sum()
        self.num_samples, self.chunk = num_samples, chunk
        # objective groups: None when every key is plain (one group, per-sample draws, plain int indices)
        objectives = [split_mixture_key(k)[0] or "all" for k in self.keys]
        self.objectives = objectives if any(o != "all" for o in objectives) else None
        self.block = batch_size * num_replicas
        self.batch_size = batch_size

    def __len__(self) -> int:
        if self.num_samples is None:
            raise TypeError("an endless MixtureSampler has no length")
        return self.num_samples

    def _epoch_length(self) -> int | None:
        return self.num_samples

    def global_stream(self, epoch: int) -> Iterator[int] | Iterator[tuple[int, str]]:
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        cycles: list[list[int]] = [[] for _ in self.groups]
        pointers = [0] * len(self.groups)

        def next_of(c: int) -> int:
            if pointers[c] >= len(cycles[c]):
                group = self.groups[c]
                cycles[c] = group[torch.randperm(len(group), generator=g)].tolist()
                pointers[c] = 0
            pointers[c] += 1
            return cycles[c][pointers[c] - 1]

        if self.objectives is None:
            while True:
                for c in torch.multinomial(self.weights, self.chunk, replacement=True, generator=g).tolist():
                    yield next_of(c)
        names = sorted(set(self.objectives))
        members = [torch.tensor([i for i, o in enumerate(self.objectives) if o == name]) for name in names]
        shares = [float(self.weights[m].sum()) for m in members]
        credit = [0.0] * len(names)
        while True:
            credit = [c + s for c, s in zip(credit, shares)]
            j = max(range(len(names)), key=lambda i: credit[i])  # the group furthest behind its share
            credit[j] -= 1.0
            keys = members[j][torch.multinomial(self.weights[members[j]], self.block, replacement=True, generator=g)]
            for c in keys.tolist():
                yield next_of(c), names[j]

    def _rank_indices(self, epoch: int) -> Iterator[int]:
        return itertools.islice(self.global_stream(epoch), self.rank, None, self.num_replicas)

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        super().load_state_dict(state)
        if self.objectives is not None:  # resume at a micro-batch boundary: batches stay one objective group
            self.position -= self.position % self.batch_size


def make_mixture_sampler(records: Sequence[Record] | ManifestDataset, mixture: Mapping[str, float], seed: int = 0,
                         num_samples: int | None = None, num_replicas: int = 1, rank: int = 0,
                         batch_size: int = 1) -> MixtureSampler:
    """A MixtureSampler over a dataset's records (indices match the dataset's); `batch_size` is the
    per-process micro-batch (it matters only for objective keys such as "t2i:report")."""
    if isinstance(records, ManifestDataset):
        records = records.records
    return MixtureSampler(records, mixture, seed=seed, num_samples=num_samples, num_replicas=num_replicas, rank=rank,
                          batch_size=batch_size)
