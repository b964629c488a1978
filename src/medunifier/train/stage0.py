"""`medunifier pretrain-vision`: stage 0, the vision backbone that stage 1 freezes.

    medunifier pretrain-vision --data M --out DIR [--config stage0.yaml] [key=value ...] [--resume]

DIR ends up a standard Hugging Face folder (config.json, model.safetensors, preprocessor_config.json)
that `vision.pretrained=DIR` loads; the run itself (checkpoints, metrics, the cached report embeddings,
the heads and `results.json`) lives in DIR/stage0. Accelerate drives the loop as in `pretrain`: one
process, or several under `torchrun` (contrastive negatives gathered across processes); checkpoints
are safetensors and a resumed run continues with the same data order, queue and RNG.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader

from medunifier.config import STAGE0_RUN, Stage0Config
from medunifier.data.augment import apply_parameters, draw_parameters
from medunifier.data.dataset import ManifestDataset
from medunifier.data.findings import FINDINGS
from medunifier.data.manifest import IMAGE_TEXT_TASKS, Record, get_image_root, load_records
from medunifier.model.stage0 import ImageTextContrastiveLoss, ImageTower, NTXentLoss, TextTower, save_backbone
from medunifier.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from medunifier.train.metrics import MetricsLogger
from medunifier.train.optim import WarmupCosineSchedule, parameter_groups
from medunifier.train.precision import native_bf16, resolve_mixed_precision

__all__ = ["Stage0Model", "Stage0Result", "TextBank", "pretrain_vision"]

RUN = STAGE0_RUN


class TextBank:
    """The training reports, deduplicated, with their locked-tower embeddings and label vectors.

    The embeddings are computed once and cached in `RUN/text_embeddings.safetensors`, keyed by a hash of
    the texts and of the text encoder's weights file, so a resumed or repeated run reuses them.
    """

    def __init__(self, texts: list[str], labels: Tensor, embeddings: Tensor | None):
        self.texts = texts
        self.index = {t: i for i, t in enumerate(texts)}
        self.labels = labels  # [N, K]
        self.embeddings = embeddings  # [N, Dt] or None (fine-tuned tower)

    @classmethod
    def build(cls, records: Sequence[Record], tower: TextTower | None, cache: Path, encoder_spec: str,
              say: Any = print) -> TextBank:
        """The distinct texts of `records` (in order) with their label vectors and, for a locked tower, their
        embeddings: read from `cache` when it was written for the same texts and weights, else computed and
        written there."""
        texts, labels = [], []
        seen: set[str] = set()
        for record in records:
            if record.text and record.text not in seen:
                seen.add(record.text)
                texts.append(record.text)
                vec = torch.full((len(FINDINGS),), -1.0)
                for k, name in enumerate(FINDINGS):
                    if record.labels.get(name) in (0, 1):
                        vec[k] = float(record.labels[name])
                labels.append(vec)
        if not texts:
            raise ValueError("objective 'text' needs reports: no training record has text (use objective=image)")
        label_tensor = torch.stack(labels)
        if tower is None or tower.trainable:
            return cls(texts, label_tensor, None)
        digest = hashlib.sha256("\n\x00".join(texts).encode())
        digest.update(f"{encoder_spec}|{tower.max_length}".encode())
        for name, tensor in sorted(tower.encoder.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes()[:4096])  # a cheap weights signature
        key = digest.hexdigest()
        if cache.exists():
            stored = load_file(str(cache))
            meta = json.loads(cache.with_suffix(".json").read_text()) if cache.with_suffix(".json").exists() else {}
            if meta.get("key") == key:
                return cls(texts, label_tensor, stored["embeddings"])
        start = time.perf_counter()
        embeddings = tower.embed_all(texts, progress=True, bf16=native_bf16("cpu"))
        save_file({"embeddings": embeddings.contiguous()}, str(cache))
        cache.with_suffix(".json").write_text(json.dumps({"key": key, "texts": len(texts)}))
        say(f"embedded {len(texts)} distinct reports in {time.perf_counter() - start:.0f} s (cached in {cache})")
        return cls(texts, label_tensor, embeddings)


class Stage0Model(nn.Module):
    """Everything stage 0 trains: the image tower, the loss parameters and (fine-tuned) the text tower."""

    def __init__(self, config: Stage0Config, text_tower: TextTower | None, text_width: int | None = None):
        """text_tower: the text encoder (needed to fine-tune it); a locked tower's cached embeddings need only
        their `text_width`."""
        super().__init__()
        self.config = config
        uses_text = config.objective in ("text", "both")
        width = text_tower.width if text_tower is not None else text_width
        if uses_text and not width:
            raise ValueError("an image-text stage 0 needs the text tower or its embedding width")
        self.tower = ImageTower(config.vision, config.image, width if uses_text else 0, config.embed_dim)
        self.text_tower = text_tower if (uses_text and config.text_tower == "finetune") else None
        self.itc = ImageTextContrastiveLoss(config.temperature, config.soft_targets) if uses_text else None
        self.ntxent = NTXentLoss(config.ssl_temperature) if config.objective in ("image", "both") else None

    def forward(self, batch: dict[str, Any], bank: TextBank | None, queue: Tensor | None) -> dict[str, Tensor]:
        c = self.config
        pixels = batch["pixel_values"]  # [B, C, S, S]
        out: dict[str, Tensor] = {}
        total = pixels.new_zeros(())
        if self.itc is not None:
            images = pixels
            if c.augment_text_objective and c.augment.enabled:
                images = apply_parameters(pixels, draw_parameters(c.augment, pixels.shape[0]))
            image_emb = F.normalize(self.tower.image_proj(self.tower.pooled(images)), dim=-1)  # [B, E]
            keys = batch["text_keys"]  # [B] bank indices
            if self.text_tower is not None:
                raw = self.text_tower(batch["texts"])  # [B, Dt]
            else:
                raw = bank.embeddings[keys]
            text_emb = F.normalize(self.tower.text_proj(raw), dim=-1)  # [B, E]
            queue_args: dict[str, Tensor] = {}
            if queue is not None and queue.numel():
                queue_args = dict(queue_emb=F.normalize(self.tower.text_proj(bank.embeddings[queue]), dim=-1),
                                  queue_keys=queue, queue_labels=bank.labels[queue])
            loss, acc = self.itc(image_emb, text_emb, keys, bank.labels[keys], **queue_args)
            out.update(loss_text=loss, acc_text=acc.detach(), logit_scale=self.itc.logit_scale.detach())
            total = total + loss
        if self.ntxent is not None:
            n = pixels.shape[0]
            views = torch.cat([apply_parameters(pixels, draw_parameters(c.augment, n)),
                               apply_parameters(pixels, draw_parameters(c.augment, n))])  # [2B, C, S, S]
            z = F.normalize(self.tower.ssl_head(self.tower.pooled(views)), dim=-1)
            loss, acc = self.ntxent(z[:n], z[n:])
            out.update(loss_image=loss, acc_image=acc.detach())
            total = total + (c.image_weight if self.itc is not None else 1.0) * loss
        out["loss"] = total
        return out


@dataclass
class Stage0Result:
    out_dir: Path
    step: int
    seconds: float
    interrupted: bool = False


def join_texts_by_image(records: list[Record]) -> list[Record]:
    """One record per image: the texts of all records of the same image, in manifest order, joined by a space.

    A VQA source holds several question-answer pairs per image; read together they describe the image, and
    as separate pairs each would be a false negative of the others in a contrastive batch. Records without
    an image or without text pass unchanged; the first record of an image keeps its id and labels.
    """
    by_image: dict[str, list[Record]] = {}
    out: list[Record] = []
    for record in records:
        if not record.image or not record.text:
            out.append(record)
            continue
        group = by_image.setdefault(record.image, [])
        if not group:
            out.append(record)
        group.append(record)
    joined = {id(group[0]): " ".join(dict.fromkeys(r.text for r in group)) for group in by_image.values()
              if len(group) > 1}
    return [r.model_copy(update={"text": joined[id(r)]}) if id(r) in joined else r for r in out]


def _collate_with_keys(bank: TextBank | None):
    def collate(items: list[dict[str, Any] | None]) -> dict[str, Any] | None:
        kept = [it for it in items if it is not None]
        if not kept:
            return None
        batch = {"ids": [it["id"] for it in kept], "texts": [it["text"] for it in kept],
                 "pixel_values": torch.stack([it["pixel_values"] for it in kept])}
        if bank is not None:
            batch["text_keys"] = torch.tensor([bank.index[it["text"]] for it in kept], dtype=torch.long)
        return batch
    return collate


def pretrain_vision(config: Stage0Config, data: str | Path, out_dir: str | Path, resume: bool = False,
                    progress: bool = True) -> Stage0Result:
    """Run stage 0 on a manifest's train split and write the backbone folder to `out_dir`."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from medunifier.data.dataset import ResumableRandomSampler
    from medunifier.train.distributed import check_accelerator, check_launch, cpu_only_multiprocess

    check_launch()  # FSDP, DeepSpeed and Megatron-LM are refused
    out = Path(out_dir)
    run_dir = out / RUN
    accelerator = Accelerator(cpu=cpu_only_multiprocess(),
                              mixed_precision=resolve_mixed_precision(config.mixed_precision))
    check_accelerator(accelerator)
    rank, world, is_main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process

    def say(message: str) -> None:
        if is_main:
            print(message, file=sys.stderr, flush=True)

    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in (run_dir / "checkpoints").glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        saved = run_dir / "config.json"
        if resume and saved.exists() and json.loads(saved.read_text()) != config.model_dump(mode="json"):
            raise ValueError(f"{saved} differs from this config: resume with the run's own settings "
                             "(or start a new --out)")
        saved.write_text(json.dumps(config.model_dump(mode="json"), indent=1))
    accelerator.wait_for_everyone()

    c = config
    records = [r for r in load_records(data, splits=["train"], image_root=get_image_root())
               if r.task in IMAGE_TEXT_TASKS]
    if c.objective in ("text", "both") and c.texts_per_image == "join":
        records = join_texts_by_image(records)
    dataset = ManifestDataset(records, root=Path(data).parent, image_size=c.image.size, channels=c.image.channels,
                              mean=c.image.mean, std=c.image.std)
    if len(dataset) < c.batch_size * world:
        raise ValueError(f"{len(dataset)} training images for a global batch of {c.batch_size * world}: "
                         "lower batch_size")
    uses_text = c.objective in ("text", "both")
    set_seed(c.seed)
    text_tower = TextTower(c.text_encoder, trainable=c.text_tower == "finetune",
                           max_length=c.text_max_length) if uses_text else None
    bank = None
    if uses_text:
        if is_main:
            bank = TextBank.build(dataset.records, text_tower, run_dir / "text_embeddings.safetensors", c.text_encoder, say)
        accelerator.wait_for_everyone()
        if not is_main:
            bank = TextBank.build(dataset.records, text_tower, run_dir / "text_embeddings.safetensors", c.text_encoder, say)
    model = Stage0Model(c, text_tower)
    optimizer = torch.optim.AdamW(parameter_groups(model, c.weight_decay), lr=c.lr, betas=tuple(c.betas))
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    device = accelerator.device
    if bank is not None:
        bank.labels = bank.labels.to(device)
        if bank.embeddings is not None:
            bank.embeddings = bank.embeddings.to(device)
    scheduler = WarmupCosineSchedule(optimizer, c.lr, c.max_steps, c.warmup_ratio, warmup_start_lr=c.lr / 100)
    sampler = ResumableRandomSampler(len(dataset), seed=c.seed, num_replicas=world, rank=rank)
    # no workers: the sampler's position is exactly what training consumed, so a checkpoint resumes there
    loader = DataLoader(dataset, batch_size=c.batch_size, sampler=sampler, collate_fn=_collate_with_keys(bank),
                        drop_last=True)

    step, samples_seen = 0, 0
    queue = torch.empty(0, dtype=torch.long, device=device)
    use_queue = bank is not None and bank.embeddings is not None and c.queue_size > 0
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        trainer_state, rank_state = load_checkpoint(checkpoint, unwrapped, optimizer, rank=rank)
        step = int(trainer_state["step"])
        samples_seen = int(trainer_state.get("samples_seen", 0))
        scheduler.load_state_dict(trainer_state["scheduler"])
        queue = torch.tensor(trainer_state.get("queue", []), dtype=torch.long, device=device)
        if rank_state is not None:
            sampler.load_state_dict(rank_state["data"])
        say(f"resumed stage 0 from {checkpoint} at step {step}")
    elif resume:
        say(f"no checkpoint in {run_dir}: starting stage 0 from scratch")
    logger = MetricsLogger(run_dir, enabled=is_main, tensorboard=False)

    def save(at: int) -> None:
        state = {"samples_seen": samples_seen, "scheduler": scheduler.state_dict(), "queue": queue.tolist(),
                 "world_size": world}
        save_checkpoint(run_dir, at, unwrapped, optimizer, state,
                        {"data": sampler.state_dict()}, rank=rank, is_main=is_main,
                        barrier=accelerator.wait_for_everyone, keep_last=c.keep_last)

    bar = None
    if progress and is_main and os.environ.get("MEDUNIFIER_NO_PROGRESS") != "1":
        from tqdm.auto import tqdm

        bar = tqdm(total=c.max_steps, initial=step, desc="pretrain-vision", unit="step", dynamic_ncols=True,
                   file=sys.stderr)
    start = time.perf_counter()
    window: dict[str, Tensor] = {}
    window_steps, window_start = 0, time.perf_counter()
    iterator = iter(loader)
    model.train()
    while step < c.max_steps:
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(loader)  # the sampler has moved on to the next epoch
            continue
        if batch is None:
            continue
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        with accelerator.autocast():
            outputs = model(batch, bank, queue if use_queue else None)
        accelerator.backward(outputs["loss"])
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        samples_seen += batch["pixel_values"].shape[0] * world
        if use_queue:  # the global batch's reports join the queue (FIFO)
            queue = torch.cat([accelerator.gather(batch["text_keys"]), queue])[: c.queue_size]
        for key, value in outputs.items():  # summed on the device; read once per log window
            window[key] = window.get(key, 0.0) + value.detach().float()
        window_steps += 1
        if step % c.log_every == 0 or step == c.max_steps:
            record = {"step": step, **{k: float(v) / window_steps for k, v in window.items()},
                      "lr": scheduler.get_last_lr()[0],
                      "samples_per_s": window_steps * c.batch_size * world / (time.perf_counter() - window_start)}
            logger.log(record)
            if bar is not None:
                bar.set_postfix({k: f"{record[k]:.3f}" for k in ("loss", "acc_text", "acc_image") if k in record},
                                refresh=False)
                bar.update(step - bar.n)
            window, window_steps, window_start = {}, 0, time.perf_counter()
        if step % c.save_every == 0 or step == c.max_steps:
            save(step)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    if is_main:
        save_backbone(unwrapped.tower, c.image, out, extra={"objective": c.objective, "steps": step,
                                                             "text_encoder": c.text_encoder if uses_text else None,
                                                             "train_records": len(dataset)})
        heads = {k: v.detach().cpu().contiguous() for k, v in unwrapped.state_dict().items()
                 if not k.startswith("tower.backbone.") and not k.startswith("text_tower.")}
        save_file(heads, str(run_dir / "heads.safetensors"))
    accelerator.wait_for_everyone()
    return Stage0Result(out, step, seconds)


def seconds_per_step(config: Stage0Config, text_width: int = 384, steps: int = 3) -> float:
    """Median wall time of a few stage-0 training steps on random data of the configured sizes (the demo
    sizes its schedule with it). The text side is a random locked bank, as a locked tower's cache would be."""
    from medunifier.train.precision import autocast

    c = config
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Stage0Model(c.model_copy(update={"text_tower": "locked"}), None, text_width)
        n_bank = max(c.batch_size, c.queue_size) + c.batch_size
        bank = TextBank([str(i) for i in range(n_bank)], torch.randint(0, 2, (n_bank, len(FINDINGS))).float(),
                        F.normalize(torch.randn(n_bank, text_width), dim=-1))
        queue = torch.arange(c.batch_size, c.batch_size + c.queue_size)
        batch = {"pixel_values": torch.randn(c.batch_size, c.image.channels, c.image.size, c.image.size),
                 "text_keys": torch.arange(c.batch_size), "texts": bank.texts[: c.batch_size]}
        optimizer = torch.optim.AdamW(parameter_groups(model, c.weight_decay), lr=c.lr)
        times = []
        for _ in range(steps + 1):
            start = time.perf_counter()
            with autocast(c.mixed_precision):
                loss = model(batch, bank, queue if c.queue_size else None)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
    return float(np.median(times[1:]))
