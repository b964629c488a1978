"""Train the text-conditioned code priors of a run: `medunifier generate train-prior --ckpt RUN --data M`.

The MedUnifier model is frozen. Every training image is encoded once to its (top, bottom) code maps,
grounded on its own report as in TIG training, and the codes are cached in `RUN/prior/codes.safetensors`
(keyed by `codes_checksum`, which covers every weight but the decoder's, and by the record ids, so a resumed
or repeated run reuses them). The priors condition on the encoder's text-only features of the report; they are
cached in memory when small (`TEXT_CACHE_BYTES`), otherwise recomputed per batch with the frozen encoder.

Training: AdamW + warm-up/cosine schedule (the training engine's `build_optimizer`,
`WarmupCosineSchedule`), gradient clipping, condition dropout inside the priors' losses. The batch of
step s is a pure function of (seed, s) (a per-epoch permutation), and checkpoints are the engine's atomic
safetensors + JSON folders with the RNG states, so `--resume` continues exactly where the run stopped.

    RUN/prior/
        prior.safetensors   final prior weights (HierarchicalPrior.state_dict())
        prior.json          {"config": PriorConfig fields, "settings": ..., "model_checksum", "codes_checksum",
                            "step", ...}
        codes.safetensors   cached codes + token ids of the training (and validation) records
        codes.json          what the cache was computed from
        checkpoints/        step-NNNNNN/ folders (model = the prior), keep-last 2
        metrics.jsonl       train / val losses
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from medunifier.config import MedUnifierConfig, PriorConfigModel
from medunifier.data.images import ImageLoadError, load_image, to_tensor
from medunifier.data.manifest import Record
from medunifier.generate.priors import HierarchicalPrior, PriorConfig
from medunifier.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from medunifier.train.metrics import MetricsLogger, truncate_metrics
from medunifier.train.optim import WarmupCosineSchedule, build_optimizer

if TYPE_CHECKING:
    from medunifier.model.medunifier import MedUnifier

PRIOR_DIR = "prior"
WEIGHTS_NAME = "prior.safetensors"
CONFIG_NAME = "prior.json"
CODES_NAME = "codes.safetensors"
TEXT_CACHE_BYTES = 1 << 30  # cache text features in memory (fp16) below this size
MAX_VAL_RECORDS = 256
GRAD_CLIP = 1.0
LOG_EVERY = 10


# ----------------------------------------------------------------------------------------- locations


def model_dir_of(ckpt: str | Path) -> Path:
    """The saved model folder of a run folder (`RUN/model`) or the folder itself."""
    ckpt = Path(ckpt)
    return ckpt / "model" if (ckpt / "model" / "config.json").exists() else ckpt


def prior_dir_for(ckpt: str | Path) -> Path:
    """Where the priors of `ckpt` are written: `RUN/prior` (run folder) or `MODEL/prior` (bare model folder)."""
    return Path(ckpt) / PRIOR_DIR


def find_prior_dir(ckpt: str | Path) -> Path:
    """The folder holding a trained prior for a run folder, its `model/`, or a prior folder itself."""
    ckpt = Path(ckpt)
    candidates = [ckpt, ckpt / PRIOR_DIR]
    if (ckpt / "config.json").exists():  # a model folder: RUN/model -> RUN/prior
        candidates.append(ckpt.parent / PRIOR_DIR)
    for c in candidates:
        if (c / WEIGHTS_NAME).is_file() and (c / CONFIG_NAME).is_file():
            return c
    raise FileNotFoundError(
        f"no trained image prior for {ckpt} (looked for {WEIGHTS_NAME} in "
        + ", ".join(str(c) for c in candidates)
        + "): train one with `medunifier generate train-prior --ckpt RUN --data MANIFEST`"
    )


def weights_file_checksum(model_dir: str | Path) -> str:
    """sha256 identifying the frozen model a prior was trained on: its tensors, not the file's bytes.

    safetensors may write its JSON header's keys in a different order each time the same weights are
    saved (its metadata is a hash map), so the header is hashed in canonical (sorted) form, then the data.
    """
    digest = hashlib.sha256()
    with (Path(model_dir) / "model.safetensors").open("rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(header_len))
        digest.update(json.dumps(header, sort_keys=True).encode())
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# Weights that play no part in making the codes: the decoder only maps codes to pixels, and refitting it
# (`medunifier generate refine-decoder`) leaves every code map as it was.
NOT_IN_CODES = ("generator.decoder.",)
# Config sections that decide the codes besides the tensors (preprocessing, heads, norms), and the fields in
# them that only say where weights or caches were read from: a copied or moved run keeps its checksum.
CODE_SECTIONS = ("image", "vision", "encoder", "generator")
LOCATION_FIELDS = ("pretrained", "text_pretrained", "feature_cache", "cache_features", "ignore_weights")


def codes_checksum(model: MedUnifier) -> str:
    """sha256 of everything that decides a model's codes: the image, vision, encoder and generator settings (not
    where their weights came from), the tokenizer's vocabulary and every tensor but the decoder's.

    The code cache and the priors are keyed by it, so a refitted decoder keeps both valid, and so does a copy
    of the run in another folder.
    """
    config = model.config.to_dict()
    sections = {name: {k: v for k, v in config[name].items() if k not in LOCATION_FIELDS} for name in CODE_SECTIONS}
    digest = hashlib.sha256(json.dumps(sections, sort_keys=True, default=str).encode())
    digest.update(json.dumps(sorted(model.tokenizer.get_vocab().items())).encode())
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith(NOT_IN_CODES):
            continue
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------- config


def prior_config(model_config: MedUnifierConfig, settings: PriorConfigModel | None = None) -> PriorConfig:
    """The prior's architecture for a model: code sizes from its generator, text width from its encoder."""
    s = settings or model_config.prior
    g = model_config.generator
    sizes = {g.level_codebook("top")[0], g.level_codebook("bottom")[0]}
    if len(sizes) > 1:
        raise ValueError(f"the code priors read both levels with one vocabulary, but the generator's codebooks have "
                         f"{sorted(sizes)} entries: give generator.top_codebook_size and bottom_codebook_size one value")
    return PriorConfig(
        kind=s.kind, codebook_size=sizes.pop(), top_size=g.top_size, bottom_size=g.bottom_size,
        text_width=model_config.encoder.hidden_size, width=s.width, layers=s.layers, heads=s.heads,
        mlp_ratio=s.mlp_ratio, dropout=s.dropout, cond_dropout=s.cond_dropout, steps=s.steps,
    )  # fmt: skip


def prior_settings(model_config: MedUnifierConfig, overrides: Sequence[str] | None = None) -> PriorConfigModel:
    """The model config's `prior` section with `key=value` overrides (`width=128` or `prior.width=128`)."""
    from medunifier.config import ConfigError, parse_override

    data = model_config.prior.model_dump()
    for item in overrides or []:
        path, value = parse_override(item)
        if path[0] == "prior":
            path = path[1:]
        if len(path) != 1 or path[0] not in data:
            raise ConfigError(f"prior override '{item}': unknown key (known: {', '.join(sorted(data))})")
        data[path[0]] = value
    try:
        return PriorConfigModel.model_validate(data)
    except Exception as err:  # pydantic ValidationError: say which override broke it
        raise ConfigError(f"invalid prior settings: {err}") from None


def save_prior(prior: HierarchicalPrior, prior_dir: str | Path, meta: dict[str, Any]) -> Path:
    """Write prior.safetensors + prior.json atomically (temp files, then rename)."""
    prior_dir = Path(prior_dir)
    prior_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in prior.state_dict().items()}
    tmp_w = prior_dir / f".{WEIGHTS_NAME}.tmp{os.getpid()}"
    tmp_c = prior_dir / f".{CONFIG_NAME}.tmp{os.getpid()}"
    save_file(state, str(tmp_w), metadata={"format": "pt", "medunifier": "prior"})
    tmp_c.write_text(json.dumps({"config": asdict(prior.config), **meta}, indent=2))
    os.replace(tmp_w, prior_dir / WEIGHTS_NAME)
    os.replace(tmp_c, prior_dir / CONFIG_NAME)
    return prior_dir / WEIGHTS_NAME


def load_prior(ckpt: str | Path, device: str | torch.device = "cpu") -> tuple[HierarchicalPrior, dict[str, Any]]:
    """A trained prior (eval mode) and its metadata, from a run folder, model folder or prior folder."""
    prior_dir = find_prior_dir(ckpt)
    meta = json.loads((prior_dir / CONFIG_NAME).read_text())
    prior = HierarchicalPrior(PriorConfig(**meta["config"]))
    prior.load_state_dict(load_file(str(prior_dir / WEIGHTS_NAME)), strict=True)
    return prior.to(device).eval(), meta


# ------------------------------------------------------------------------------------------ codes


@dataclass
class CodeSet:
    """Codes and report tokens of N records: top [N, t, t], bottom [N, b, b], input_ids/attention_mask [N, T]."""

    ids: list[str]
    top: Tensor
    bottom: Tensor
    input_ids: Tensor
    attention_mask: Tensor
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.ids)


def load_pixels(records: Sequence[Record], root: Path, image_config: Any) -> tuple[list[int], Tensor | None]:
    """Preprocessed pixels [B, C, S, S] of the readable records, and their positions in `records`."""
    kept, tensors = [], []
    for i, record in enumerate(records):
        try:
            arr = load_image(record.image_path(root))
        except ImageLoadError as err:
            print(f"warning: skipped {err}")
            continue
        c = image_config
        tensors.append(to_tensor(arr, c.size, c.channels, c.mean, c.std))
        kept.append(i)
    return kept, (torch.stack(tensors) if tensors else None)


@torch.no_grad()
def encode_records(model: MedUnifier, records: Sequence[Record], root: str | Path, batch_size: int = 64) -> CodeSet:
    """Encode every readable record's image to codes with the frozen model, grounded on its report."""
    device = next(model.parameters()).device
    tokens = {k: v.cpu() for k, v in model.tokenize([r.text for r in records]).items()}  # padded to the longest
    ids, tops, bottoms, rows = [], [], [], []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        kept, pixels = load_pixels(chunk, Path(root), model.config.image)
        if pixels is None:
            continue
        index = torch.tensor([start + k for k in kept])
        top, bottom = model.encode_codes(
            pixels.to(device), tokens["input_ids"][index].to(device), tokens["attention_mask"][index].to(device)
        )
        tops.append(top.cpu())
        bottoms.append(bottom.cpu())
        rows.append(index)
        ids += [chunk[k].id for k in kept]
    if not ids:
        raise ValueError("none of the records has a readable image")
    index = torch.cat(rows)
    return CodeSet(
        ids=ids,
        top=torch.cat(tops).long(),
        bottom=torch.cat(bottoms).long(),
        input_ids=tokens["input_ids"][index].cpu().long(),
        attention_mask=tokens["attention_mask"][index].cpu().bool(),
        skipped=len(records) - len(ids),
    )


def _records_key(records: Sequence[Record]) -> str:
    return hashlib.sha256("\n".join(f"{r.id}\t{r.image}\t{r.text}" for r in records).encode()).hexdigest()


def cached_codes(
    model: MedUnifier, records: Sequence[Record], root: Path, cache: Path, model_checksum: str, name: str,
    log: Callable[[str], None] = print,
) -> CodeSet:
    """Codes of `records` from the cache file when it matches (model weights and records), else encoded now."""
    key = {"model_checksum": model_checksum, "records": _records_key(records), "n": len(records)}
    meta_path = cache.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if cache.exists() and meta.get(name) == key:
        t = load_file(str(cache))
        ids = meta[f"{name}_ids"]
        return CodeSet(ids, t[f"{name}/top"].long(), t[f"{name}/bottom"].long(), t[f"{name}/input_ids"].long(),
                       t[f"{name}/attention_mask"].bool(), skipped=len(records) - len(ids))
    start = time.perf_counter()
    codes = encode_records(model, records, root)
    log(f"encoded {len(codes)} {name} images to codes in {time.perf_counter() - start:.1f} s"
        + (f" ({codes.skipped} unreadable, skipped)" if codes.skipped else ""))
    tensors = load_file(str(cache)) if cache.exists() else {}
    tensors = {k: v for k, v in tensors.items() if not k.startswith(f"{name}/")}
    tensors.update({
        f"{name}/top": codes.top.to(torch.int32), f"{name}/bottom": codes.bottom.to(torch.int32),
        f"{name}/input_ids": codes.input_ids.to(torch.int32), f"{name}/attention_mask": codes.attention_mask.to(torch.uint8),
    })  # fmt: skip
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp))
    os.replace(tmp, cache)
    meta.update({name: key, f"{name}_ids": codes.ids})
    meta_path.write_text(json.dumps(meta))
    return codes


class TextFeatures:
    """Text-only encoder features of a CodeSet's reports: cached in memory (fp16) when small, else on demand."""

    def __init__(self, model: MedUnifier, codes: CodeSet, batch_size: int = 128, cache_bytes: int = TEXT_CACHE_BYTES):
        self.model = model
        self.codes = codes
        self.device = next(model.parameters()).device
        n, length = codes.input_ids.shape
        self.cache: Tensor | None = None
        if n * length * model.config.encoder.hidden_size * 2 <= cache_bytes:
            parts = [self._compute(torch.arange(s, min(n, s + batch_size))).half().cpu() for s in range(0, n, batch_size)]
            self.cache = torch.cat(parts)

    @torch.no_grad()
    def _compute(self, index: Tensor) -> Tensor:
        ids = self.codes.input_ids[index].to(self.device)
        mask = self.codes.attention_mask[index].to(self.device)
        return self.model.text_states(ids, mask.long(), role="generate")  # [B, T, H] (task experts: generation)

    def __call__(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """(states [B, T_b, H] float32, mask bool [B, T_b]) trimmed to the batch's longest report."""
        mask = self.codes.attention_mask[index]
        length = int(mask.sum(1).max())
        if self.cache is not None:
            states = self.cache[index, :length].to(self.device).float()
        else:
            states = self._compute(index)[:, :length].float()
        return states, mask[:, :length].to(self.device)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> Tensor:
    """Sample indices of optimiser step `step`: a seeded permutation per epoch, the last partial batch dropped."""
    batch_size = min(batch_size, n)
    per_epoch = n // batch_size
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[i * batch_size : (i + 1) * batch_size]


# --------------------------------------------------------------------------------------- training


@dataclass
class PriorTrainResult:
    prior_dir: Path
    step: int
    total_steps: int
    interrupted: bool = False
    checkpoint: Path | None = None
    loss: float | None = None
    val_loss: float | None = None
    samples_per_s: float = 0.0
    seconds: float = 0.0


@torch.no_grad()
def validation_loss(prior: HierarchicalPrior, codes: CodeSet, text: TextFeatures, batch_size: int) -> dict[str, float]:
    """Mean teacher-forced loss on held-out codes, with a fixed masking seed (training RNG untouched)."""
    was_training = prior.training
    prior.eval()
    totals = {"loss": 0.0, "top": 0.0, "bottom": 0.0}
    device = next(prior.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        for start in range(0, len(codes), batch_size):
            index = torch.arange(start, min(len(codes), start + batch_size))
            states, mask = text(index)
            out = prior.loss(codes.top[index].to(device), codes.bottom[index].to(device), states, mask)
            for k in totals:
                totals[k] += float(out[k]) * len(index)
    prior.train(was_training)
    return {k: v / len(codes) for k, v in totals.items()}


def train_prior(
    ckpt: str | Path,
    data: str | Path,
    *,
    settings: PriorConfigModel | None = None,
    overrides: Sequence[str] | None = None,
    max_steps: int | None = None,
    resume: bool = False,
    time_limit_s: float | None = None,
    device: str | None = None,
    model: MedUnifier | None = None,
    text_features: TextFeatures | None = None,
    log: Callable[[str], None] = print,
) -> PriorTrainResult:
    """Train the priors of the run `ckpt` on the train split of the manifest `data`.

    settings: the prior section (default: the model config's `prior`, with `overrides` applied).
    `settings.max_steps` spans the schedule; `max_steps` only says where this invocation stops, and
    `time_limit_s` stops it (with a checkpoint) once exceeded. `resume` continues the latest checkpoint.
    `model` (the loaded frozen model) and `text_features` (of the train codes) skip loading / recomputing them.
    """
    from medunifier.config import ConfigError
    from medunifier.model import load_model
    from medunifier.train.data import DataError, resolve_data
    from medunifier.train.signals import StopFlag

    source = resolve_data(data)
    if source.kind != "manifest":
        raise DataError("train-prior reads a manifest (the codes are cached per record), not shards")
    model_dir = model_dir_of(ckpt)
    if model is None:
        model = load_model(model_dir, device)
    model.eval()
    model.requires_grad_(False)
    dev = next(model.parameters()).device
    settings = settings or prior_settings(model.config, overrides)
    config = prior_config(model.config, settings)
    total = settings.max_steps
    stop_at = total if max_steps is None else min(max_steps, total)

    prior_dir = prior_dir_for(ckpt)
    existing = list_checkpoints(prior_dir)
    resume_from = latest_checkpoint(prior_dir) if resume else None
    if existing and not resume:
        raise ConfigError(f"{prior_dir} already holds prior checkpoints (latest {existing[-1].name}): pass "
                          "--resume to continue, or delete the folder to start again")
    checksum = weights_file_checksum(model_dir) if (model_dir / "model.safetensors").exists() else "unsaved"
    code_sum = codes_checksum(model)
    root = source.path.parent
    codes = cached_codes(model, source.train_records, root, prior_dir / CODES_NAME, code_sum, "train", log)
    val_records = source.val_records[:MAX_VAL_RECORDS]
    val_codes = cached_codes(model, val_records, root, prior_dir / CODES_NAME, code_sum, "val", log) if val_records else None
    reuse = text_features is not None and text_features.codes.ids == codes.ids
    text = text_features if reuse else TextFeatures(model, codes)
    val_text = TextFeatures(model, val_codes) if val_codes is not None else None

    torch.manual_seed(settings.seed)
    prior = HierarchicalPrior(config).to(dev)
    prior.train()
    optimizer = build_optimizer(prior, settings.lr, settings.weight_decay, (0.9, 0.95))
    schedule = WarmupCosineSchedule(optimizer, settings.lr, total, settings.warmup_ratio, min(1e-5, settings.lr))
    meta = {"settings": settings.model_dump(), "model_checksum": checksum, "codes_checksum": code_sum,
            "data": str(source.path),
            "train_records": len(codes), "total_steps": total}
    step = 0
    if resume_from is not None:
        state, _ = load_checkpoint(resume_from, prior, optimizer)
        same_model = (state.get("codes_checksum") == code_sum if "codes_checksum" in state
                      else state.get("model_checksum") == checksum)
        if state.get("settings") != settings.model_dump() or not same_model:
            raise ConfigError(f"{resume_from} was trained with other prior settings or another model: "
                              "resume with the same ones, or start a new prior folder")
        schedule.load_state_dict(state["scheduler"])
        step = int(state["step"])
        truncate_metrics(prior_dir, step)
        log(f"resumed the prior from {resume_from} (step {step})")
    elif resume:
        log(f"warning: --resume given but {prior_dir} has no checkpoint: starting a new prior")

    prior_dir.mkdir(parents=True, exist_ok=True)
    logger = MetricsLogger(prior_dir, tensorboard=False)
    stop = StopFlag()
    stop.install()
    start_time = time.perf_counter()
    # float64 sums on the device, read once per log window
    window: dict[str, Any] = {"loss": 0.0, "top": 0.0, "bottom": 0.0, "n": 0}
    last_loss, interrupted, checkpoint = None, False, None
    start_step = step

    def save(at: int) -> Path:
        return save_checkpoint(prior_dir, at, prior, optimizer, {"scheduler": schedule.state_dict(), **meta},
                               {"step": at}, keep_last=2)

    try:
        log(f"training the {config.kind} prior ({sum(p.numel() for p in prior.parameters()):,} parameters) on "
            f"{len(codes)} code maps: steps {step}-{stop_at} of {total}, batch {settings.batch_size}")
        while step < stop_at:
            index = batch_indices(len(codes), settings.batch_size, step, settings.seed)
            states, mask = text(index)
            out = prior.loss(codes.top[index].to(dev), codes.bottom[index].to(dev), states, mask)
            if not torch.isfinite(out["loss"]):  # host-device sync: the step's one
                raise RuntimeError(f"non-finite prior loss at step {step}: {float(out['loss'])}")
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(prior.parameters(), GRAD_CLIP)
            optimizer.step()
            schedule.step()
            step += 1
            for k in ("loss", "top", "bottom"):
                window[k] = window[k] + out[k].detach().double()
            window["n"] += 1
            over_time = time_limit_s is not None and time.perf_counter() - start_time > time_limit_s
            if step % LOG_EVERY == 0 or step == stop_at or stop.requested or over_time:
                n = window.pop("n")
                elapsed = time.perf_counter() - start_time
                means = torch.stack([window[k] / n for k in ("loss", "top", "bottom")]).tolist()  # one sync
                record = {"kind": "train", "step": step, "lr": schedule.get_last_lr()[0],
                          **dict(zip(("loss", "top", "bottom"), means)),
                          "samples_per_s": (step - start_step) * settings.batch_size / max(elapsed, 1e-9)}
                logger.log(record)
                last_loss = record["loss"]
                window = {"loss": 0.0, "top": 0.0, "bottom": 0.0, "n": 0}
            if step % settings.save_every == 0 and step < stop_at:
                checkpoint = save(step)
            if stop.requested or over_time:
                interrupted = step < total
                log(f"stopping the prior at step {step}" + (" (time limit)" if over_time else ""))
                break
        checkpoint = save(step)
    finally:
        stop.restore()
        logger.close()

    seconds = time.perf_counter() - start_time
    result = PriorTrainResult(prior_dir, step, total, interrupted, checkpoint, last_loss,
                              samples_per_s=(step - start_step) * settings.batch_size / max(seconds, 1e-9),
                              seconds=seconds)
    if val_codes is not None and val_text is not None:
        val = validation_loss(prior, val_codes, val_text, settings.batch_size)
        result.val_loss = val["loss"]
        _append_metrics(prior_dir, {"kind": "val", "step": step, **val})
    prior.eval()
    save_prior(prior, prior_dir, {**meta, "step": step, "finished": step >= total, "loss": last_loss,
                                  "val_loss": result.val_loss})
    log(f"prior at step {step}/{total}: train loss {last_loss if last_loss is None else round(last_loss, 4)}, "
        f"val loss {result.val_loss if result.val_loss is None else round(result.val_loss, 4)}; saved to "
        f"{prior_dir / WEIGHTS_NAME}")
    return result


def _append_metrics(prior_dir: Path, record: dict[str, Any]) -> None:
    logger = MetricsLogger(prior_dir, tensorboard=False)
    logger.log(record)
    logger.close()


def steps_for_budget(seconds_per_step: float, budget_s: float, minimum: int = 50) -> int:
    """How many prior steps fit in a wall-clock budget (used by the demo)."""
    return max(minimum, math.floor(budget_s / max(seconds_per_step, 1e-6)))
