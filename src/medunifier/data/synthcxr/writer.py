"""Making SynthCXR datasets: chunks of each stream run in worker processes (`ChunkJob`), in memory
(`synthesize`) or written as PNGs, manifests and a summary (`write_synthcxr`).

Every image draws from its own seeds, so the output does not depend on how the streams are chunked or on
the number of workers.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from multiprocessing import get_context
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np

from medunifier.data.findings import COMPETITION_FINDINGS, FINDINGS
from medunifier.data.images import save_png
from medunifier.data.manifest import write_manifest
from medunifier.data.synthcxr.i2i import I2I_SCALES, generate_i2i, i2i_records
from medunifier.data.synthcxr.pairs import generate_pair
from medunifier.data.synthcxr.render import IMAGE_KINDS, MASK_FINDINGS, generate_sample
from medunifier.data.synthcxr.sampling import (
    EVAL_STREAM,
    I2I_STREAM,
    MAIN_STREAM,
    PAIR_FINDINGS,
    PAIR_STREAM,
    SynthConfig,
    eval_finding,
    round4,
)

__all__ = ["GENERATOR_VERSION", "ChunkJob", "synthesize", "write_synthcxr"]

GENERATOR_VERSION = 1  # stamped into synthcxr.json; raised whenever the same seed would draw other images

_T = TypeVar("_T")


class ChunkJob(NamedTuple):
    """What one worker makes: images [start, end) of one stream.

    Args:
        seed: the dataset seed.
        size: the image side in pixels.
        config: the generator's knobs.
        stream: `MAIN_STREAM`, `EVAL_STREAM`, `PAIR_STREAM` or `I2I_STREAM`.
        start: the first index of the chunk.
        end: one past its last index.
        per_class: images per finding of the 5x200 set (`EVAL_STREAM` only).
        out: the dataset folder the PNGs go under (writing jobs only).
        folder: the PNGs' folder, relative to `out` ("images", "images_5x200", ...).
    """

    seed: int
    size: int
    config: SynthConfig
    stream: int
    start: int
    end: int
    per_class: int = 1
    out: str = ""
    folder: str = ""


def _write_i2i(job: ChunkJob) -> list[dict[str, Any]]:
    """Write phantoms [start, end) of the image-to-image stream (images, low-res copies, masks); their records."""
    out, folder = Path(job.out), job.folder
    records = []
    for index in range(job.start, job.end):
        sample = generate_i2i(job.seed, index, job.size, job.config)
        paths = {kind: f"{folder}/{index:06d}_{kind}.png" for kind in IMAGE_KINDS}
        paths |= {f"x{k}": f"{folder}/{index:06d}_x{k}.png" for k in I2I_SCALES}
        paths |= {f"mask_{n}": f"{folder}/{index:06d}_mask_{n}.png" for n in MASK_FINDINGS if n in sample.masks}
        for kind in IMAGE_KINDS:
            save_png(sample.images[kind], out / paths[kind])
        for k in I2I_SCALES:
            save_png(sample.lowres[k], out / paths[f"x{k}"])
        for name in MASK_FINDINGS:
            if name in sample.masks:
                save_png(sample.masks[name].astype(np.uint8) * 255, out / paths[f"mask_{name}"])
        records += i2i_records(sample, paths)
    return records


def _write_pairs(job: ChunkJob) -> list[dict[str, Any]]:
    """Write pairs [start, end) (source, target and region PNGs); their three records each."""
    out, folder = Path(job.out), job.folder
    records = []
    for index in range(job.start, job.end):
        pair = generate_pair(job.seed, index, job.size, job.config)
        paths = {k: f"{folder}/{index:06d}_{k}.png" for k in ("source", "target", "region")}
        save_png(pair.source_image, out / paths["source"])
        save_png(pair.target_image, out / paths["target"])
        save_png(pair.region.astype(np.uint8) * 255, out / paths["region"])
        pair.source_record["image"] = paths["source"]
        pair.target_record["image"] = paths["target"]
        pair.edit_record.update(image=paths["source"], target_image=paths["target"], edit_region=paths["region"])
        records += [pair.source_record, pair.target_record, pair.edit_record]
    return records


def _samples(job: ChunkJob) -> Iterator[tuple[int, np.ndarray, dict[str, Any]]]:
    """(index, image, record) for each image of a main or 5x200 chunk, one at a time."""
    for index in range(job.start, job.end):
        only = eval_finding(index, job.per_class) if job.stream == EVAL_STREAM else None
        yield index, *generate_sample(job.seed, index, job.size, job.config, stream=job.stream, only=only)


def _write_chunk(job: ChunkJob) -> list[dict[str, Any]]:
    """Worker: generate the chunk, write its PNGs under `job.out`, return its records (with image paths)."""
    if job.stream == PAIR_STREAM:
        return _write_pairs(job)
    if job.stream == I2I_STREAM:
        return _write_i2i(job)
    records = []
    for index, image, record in _samples(job):
        relative = f"{job.folder}/{index:06d}.png"
        save_png(image, Path(job.out) / relative)
        record["image"] = relative
        records.append(record)
    return records


def _chunk_arrays(job: ChunkJob) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Worker: the chunk's uint8 images (end - start, S, S) and records, in memory."""
    images, records = [], []
    for _, image, record in _samples(job):
        images.append(image)
        records.append(record)
    return np.stack(images) if images else np.zeros((0, job.size, job.size), np.uint8), records


def _chunks(n: int, workers: int) -> list[tuple[int, int]]:
    """[start, end) ranges covering 0..n-1: about four a worker, at most 256 images each."""
    step = max(1, min(256, math.ceil(n / max(1, 4 * workers))))
    return [(s, min(n, s + step)) for s in range(0, n, step)]


def _map(fn: Callable[[ChunkJob], _T], jobs: list[ChunkJob], workers: int) -> list[_T]:
    """`fn` over `jobs` in order, in a process pool when there is more than one worker and job."""
    if workers <= 1 or len(jobs) <= 1:
        return [fn(job) for job in jobs]
    with get_context().Pool(min(workers, len(jobs))) as pool:
        return list(pool.imap(fn, jobs))


def synthesize(n: int, size: int = 64, seed: int = 0, config: SynthConfig | None = None, workers: int = 1,
               stream: int = MAIN_STREAM, per_class: int = 200) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """In-memory SynthCXR: uint8 images (n, size, size) and their records (no files written).

    With `stream=EVAL_STREAM`, n should be 5 * per_class (the 5x200 construction).
    """
    cfg = config or SynthConfig()
    jobs = [ChunkJob(seed, size, cfg, stream, s, e, per_class) for s, e in _chunks(n, workers)]
    parts = _map(_chunk_arrays, jobs, workers)
    images = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, size, size), np.uint8)
    return images, [r for p in parts for r in p[1]]


def write_synthcxr(out: str | Path, n: int, size: int = 128, seed: int = 0, workers: int | None = None,
                   config: SynthConfig | None = None, per_class_5x200: int = 200, pairs: int = 0,
                   i2i: int = 0) -> dict[str, Any]:
    """Write SynthCXR to `out`: images/, manifest.jsonl, images_5x200/, manifest_5x200.jsonl, synthcxr.json.

    With `pairs` > 0, images_pairs/ holds that many counterfactual pairs (`generate_pair`: source, target
    and the region PNG) and manifest.jsonl gains three records per pair after the main set: the source and
    the target as ordinary "report" records, and an "edit" record (image = source, target_image = target,
    text = the target's report, instruction, pair_id, edit_region). A pair's records share its split.

    With `i2i` > 0, images_i2i/ holds that many image-to-image phantoms (`generate_i2i`: radiograph,
    soft-tissue and bone images, x2 and x4 low-resolution copies, finding masks) and manifest.jsonl gains
    their "translate" (radiograph -> soft_tissue / bone), "upscale" (x2 / x4 -> radiograph) and "segment"
    (radiograph -> the mask of "heart" and of each present mask finding) records, each with an instruction.
    Returns a summary (counts, prevalence). The same arguments give byte-identical files whatever
    `workers` is.
    """
    if n < 0 or per_class_5x200 < 0 or pairs < 0 or i2i < 0 or size < 16:
        raise ValueError("n, per_class_5x200, pairs and i2i must be >= 0 and size >= 16")
    if i2i and size % max(I2I_SCALES):
        raise ValueError(f"image-to-image pairs need a size divisible by {max(I2I_SCALES)} (the x4 low-res copy), "
                         f"got {size}")
    cfg = config or SynthConfig()
    workers = workers or os.cpu_count() or 1
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    n_eval = len(COMPETITION_FINDINGS) * per_class_5x200
    jobs: list[ChunkJob] = []
    for stream, count, folder, per_class in ((MAIN_STREAM, n, "images", 1),
                                             (EVAL_STREAM, n_eval, "images_5x200", per_class_5x200),
                                             (PAIR_STREAM, pairs, "images_pairs", 1),
                                             (I2I_STREAM, i2i, "images_i2i", 1)):
        jobs += [ChunkJob(seed, size, cfg, stream, s, e, per_class, str(out), folder)
                 for s, e in _chunks(count, workers)]
    if n_eval:
        (out / "images_5x200").mkdir(parents=True, exist_ok=True)
    parts = _map(_write_chunk, jobs, workers)
    by_stream: dict[int, list[dict[str, Any]]] = {MAIN_STREAM: [], EVAL_STREAM: [], PAIR_STREAM: [], I2I_STREAM: []}
    for job, part in zip(jobs, parts):
        by_stream[job.stream] += part
    main, evals, pair_records = by_stream[MAIN_STREAM], by_stream[EVAL_STREAM], by_stream[PAIR_STREAM]
    write_manifest(main + pair_records + by_stream[I2I_STREAM], out / "manifest.jsonl")
    if n_eval:
        write_manifest(evals, out / "manifest_5x200.jsonl")
    summary = {
        "generator": "synthcxr",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "size": size,
        "n": n,
        "per_class_5x200": per_class_5x200,
        "splits": {s: sum(r["split"] == s for r in main) for s in ("train", "val", "test")},
        "prevalence": {name: round4(np.mean([r["labels"][name] for r in main])) if main else 0.0
                       for name in FINDINGS},
        "pairs": pairs,
        "pair_findings": {name: sum(r["edit_finding"]["name"] == name for r in pair_records if r["task"] == "edit")
                          for name in PAIR_FINDINGS},
        "i2i": i2i,
        "i2i_tasks": {task: sum(r["task"] == task for r in by_stream[I2I_STREAM])
                      for task in ("translate", "upscale", "segment")},
        "config": cfg.to_json(),
    }
    (out / "synthcxr.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
