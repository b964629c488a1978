"""Refit the generator's decoder on the frozen model's codes: `medunifier generate refine-decoder --ckpt RUN --data M`.

Stage 1 trains the decoder together with everything that makes the codes (the Q-Former, the latent adapters and
the codebooks), under four objectives at once and for a budget sized for understanding. Once stage 1 is over
the codes of every image are fixed, and the decoder, which only maps codes to pixels, can be trained further on
its own, as VQ image models refit their decoders on frozen latents. Nothing that makes the codes changes, so:

- every code map is what it was (the code priors, trained before or after, see the same codes);
- understanding (retrieval, zero-shot, reports, VQA) is untouched: only `generator.decoder.*` weights change;
- reconstructions, edits and text-to-image samples are decoded by the refitted decoder.

Every training image is encoded once to its (top, bottom) codes, grounded on its own report as in TIG
training. The codes are shared with the prior stage's cache (`RUN/prior/codes.safetensors`, keyed by
`codes_checksum`, which leaves the decoder out), so training the priors afterwards does not encode them again.
The decoder then trains on mean squared error against the images (AdamW, warm-up and cosine schedule, gradient
clipping; the batch of step s is a pure function of (seed, s)). It is short (the demo: 600 steps in about 1.5
minutes on 2 CPU cores), so it keeps no checkpoints: a run stopped by a signal leaves the model as it was.

The refitted weights replace `model.safetensors` in the model folder (written to a temporary file first, then
renamed), and `decoder_refinement.json` beside it records each pass: its settings and the validation PSNR
before and after.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from medunifier.data.manifest import Record
from medunifier.generate.train_prior import (
    CODES_NAME,
    MAX_VAL_RECORDS,
    CodeSet,
    batch_indices,
    cached_codes,
    codes_checksum,
    load_pixels,
    model_dir_of,
    prior_dir_for,
)
from medunifier.train.optim import WarmupCosineSchedule, build_optimizer
from medunifier.utils import psnr_normalised

if TYPE_CHECKING:
    from medunifier.model.medunifier import MedUnifier

__all__ = ["RECORD_NAME", "DecoderRefineResult", "DecoderRefineSettings", "refine_decoder", "refinement_passes"]

RECORD_NAME = "decoder_refinement.json"
DECODER_PREFIX = "generator.decoder."
PIXEL_CACHE_BYTES = 1 << 30  # keep the training pixels in memory (float32) below this size
GRAD_CLIP = 1.0


@dataclass(frozen=True)
class DecoderRefineSettings:
    """How the decoder is refitted.

    Args:
        steps: optimiser steps (the demo's 600 raised held-out PSNR by 0.50-0.55 dB on four stage-1 runs).
        batch_size: images per step.
        lr: peak learning rate of the warm-up and cosine schedule.
        warmup_ratio: fraction of the steps spent warming up.
        weight_decay: AdamW weight decay of the matrices and kernels (rank >= 2; biases and norms get none).
        seed: seeds the batch order.
    """

    steps: int = 600
    batch_size: int = 64
    lr: float = 1e-3
    warmup_ratio: float = 0.02
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"decoder refinement needs steps >= 1 (got {self.steps})")
        if self.batch_size < 1:
            raise ValueError(f"decoder refinement needs batch_size >= 1 (got {self.batch_size})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"decoder refinement needs a positive, finite lr (got {self.lr})")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1) (got {self.warmup_ratio})")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0 (got {self.weight_decay})")


@dataclass
class DecoderRefineResult:
    """What one refinement pass did."""

    model_dir: Path
    steps: int  # optimiser steps taken (< settings.steps when a signal stopped it)
    interrupted: bool  # True: stopped by a signal, nothing was written
    train_images: int
    loss: float | None  # mean MSE of the last log window (normalised pixels)
    val_images: int
    val_psnr_before: float | None  # mean per-image PSNR (dB) of the validation split's reconstructions
    val_psnr_after: float | None
    seconds: float


class Pixels:
    """Preprocessed training images of a CodeSet, [C, S, S] each: held in memory when small, else read per batch."""

    def __init__(self, model: MedUnifier, records: Sequence[Record], root: Path, cache_bytes: int = PIXEL_CACHE_BYTES):
        self.records, self.root, self.image = list(records), root, model.config.image
        c = self.image
        self.cache: Tensor | None = None
        if len(self.records) * c.channels * c.size * c.size * 4 <= cache_bytes:
            self.cache = self._load(self.records)

    def _load(self, records: Sequence[Record]) -> Tensor:
        kept, pixels = load_pixels(records, self.root, self.image)
        if pixels is None or len(kept) != len(records):
            raise ValueError(f"{len(records) - len(kept)} image(s) encoded to codes can no longer be read: "
                             "fix or remove them, then run again")
        return pixels

    def __call__(self, index: Tensor) -> Tensor:
        if self.cache is not None:
            return self.cache[index]
        return self._load([self.records[int(i)] for i in index])


def _records_of(codes: CodeSet, records: Sequence[Record]) -> list[Record]:
    by_id = {r.id: r for r in records}
    return [by_id[i] for i in codes.ids]


@torch.no_grad()
def _psnr(model: MedUnifier, codes: CodeSet, pixels: Pixels, batch_size: int = 64) -> float:
    """Mean per-image PSNR of the decoded codes against their images (the demo's reconstruction measure)."""
    gen, values = model.generator, []
    device = next(model.parameters()).device
    for start in range(0, len(codes), batch_size):
        index = torch.arange(start, min(len(codes), start + batch_size))
        images = gen.decode_codes(codes.top[index].to(device), codes.bottom[index].to(device))
        target = pixels(index).to(device)
        values += [float(psnr_normalised(images[j:j + 1], target[j:j + 1], model.config.image.std))
                   for j in range(len(index))]
    return sum(values) / len(values)


def refinement_passes(ckpt: str | Path) -> list[dict[str, Any]]:
    """The refinement passes recorded in the model folder of `ckpt` (run folder or model folder), oldest first."""
    path = model_dir_of(ckpt) / RECORD_NAME
    return json.loads(path.read_text())["passes"] if path.exists() else []


def refine_decoder(
    ckpt: str | Path,
    data: str | Path,
    settings: DecoderRefineSettings = DecoderRefineSettings(),
    *,
    device: str | None = None,
    model: MedUnifier | None = None,
    log: Callable[[str], None] = print,
) -> DecoderRefineResult:
    """Refit the decoder of the run (or model folder) `ckpt` on the codes of the train split of the manifest
    `data`; PSNR is measured on (at most 256 images of) its val split. See the module docstring.

    Raises DataError when `data` is not a manifest or has no train split, ValueError on bad settings.
    """
    from medunifier.model import load_model
    from medunifier.model.saving import save_weights
    from medunifier.train.data import DataError, resolve_data
    from medunifier.train.signals import StopFlag

    source = resolve_data(data)
    if source.kind != "manifest":
        raise DataError("refine-decoder reads a manifest (the codes are cached per record), not shards")
    model_dir = model_dir_of(ckpt)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"no saved model in {ckpt} (looked for {model_dir / 'config.json'})")
    if model is None:
        model = load_model(model_dir, device)
    model.eval()
    model.requires_grad_(False)
    decoder = model.generator.decoder
    decoder.requires_grad_(True)
    dev = next(model.parameters()).device
    root = source.path.parent
    start_time = time.perf_counter()

    cache = prior_dir_for(ckpt) / CODES_NAME
    checksum = codes_checksum(model)
    codes = cached_codes(model, source.train_records, root, cache, checksum, "train", log)
    val_records = source.val_records[:MAX_VAL_RECORDS]
    val_codes = cached_codes(model, val_records, root, cache, checksum, "val", log) if val_records else None
    pixels = Pixels(model, _records_of(codes, source.train_records), root)
    val_pixels = Pixels(model, _records_of(val_codes, val_records), root) if val_codes is not None else None
    before = _psnr(model, val_codes, val_pixels) if val_codes is not None and val_pixels is not None else None

    optimizer = build_optimizer(decoder, settings.lr, settings.weight_decay, (0.9, 0.99))
    schedule = WarmupCosineSchedule(optimizer, settings.lr, settings.steps, settings.warmup_ratio,
                                    min_lr=settings.lr * 0.01)
    log(f"refitting the decoder ({sum(p.numel() for p in decoder.parameters()):,} parameters) on the codes of "
        f"{len(codes)} training images: {settings.steps} steps of batch {min(settings.batch_size, len(codes))}"
        + ("" if before is None else f"; validation PSNR before: {before:.2f} dB"))
    stop = StopFlag()
    stop.install()
    decoder.train()
    step, window, last_loss = 0, torch.zeros((), dtype=torch.float64), None
    log_every = max(1, settings.steps // 10)
    try:
        while step < settings.steps and not stop.requested:
            index = batch_indices(len(codes), settings.batch_size, step, settings.seed)
            images = model.generator.decode_codes(codes.top[index].to(dev), codes.bottom[index].to(dev))
            loss = torch.nn.functional.mse_loss(images, pixels(index).to(dev))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(decoder.parameters(), GRAD_CLIP)
            optimizer.step()
            schedule.step()
            step += 1
            window += loss.detach().double()
            if step % log_every == 0 or step == settings.steps:
                n = (step - 1) % log_every + 1
                last_loss = float(window / n)  # host sync, once per log window
                if not math.isfinite(last_loss):
                    raise RuntimeError(f"non-finite decoder loss at step {step}: nothing was written")
                window.zero_()
                log(f"decoder step {step}/{settings.steps}: mse {last_loss:.5f} "
                    f"({time.perf_counter() - start_time:.0f} s)")
    finally:
        stop.restore()
        decoder.eval()
        model.requires_grad_(False)

    interrupted = step < settings.steps
    after = None
    if interrupted:
        log(f"stopped at decoder step {step}/{settings.steps}: the model in {model_dir} is unchanged")
    else:
        after = _psnr(model, val_codes, val_pixels) if val_codes is not None and val_pixels is not None else None
        save_weights(model, model_dir)
        passes = refinement_passes(model_dir)
        passes.append({"settings": asdict(settings), "data": str(source.path), "train_images": len(codes),
                       "val_images": 0 if val_codes is None else len(val_codes), "loss": last_loss,
                       "val_psnr_before": before, "val_psnr_after": after, "codes_checksum": checksum})
        (model_dir / RECORD_NAME).write_text(json.dumps({"passes": passes}, indent=2))
        log(f"decoder refitted in {time.perf_counter() - start_time:.0f} s"
            + ("" if after is None or before is None else f": validation PSNR {before:.2f} -> {after:.2f} dB")
            + f"; saved to {model_dir}")
    return DecoderRefineResult(model_dir, step, interrupted, len(codes), last_loss,
                               0 if val_codes is None else len(val_codes), before, after,
                               time.perf_counter() - start_time)
