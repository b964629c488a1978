"""The pre-training loop: Hugging Face Accelerate, curriculum stages, exact resume.

`train(config, data, out)` validates the config and the data before building anything, then runs
the stages of the curriculum (one stage when the config has none). The same code runs on a CPU,
one GPU, or several processes (`torchrun --nproc_per_node N -m medunifier.cli pretrain ...`):
Accelerate wraps the model (DDP) and the optimiser and handles mixed precision and gradient
accumulation; the model all-gathers its contrastive features itself.

Data is sharded across processes by our own samplers (`train.data`), not by `accelerator.prepare`,
so that the exact data position can be saved and restored (`train.resume`). `train.batch_size` is the
micro-batch of one process; one optimiser step sees `batch_size x processes x grad_accum` samples.

Steps and schedules: `train.max_steps` (or the sum of the stages' steps) defines the learning-rate
schedule and the curriculum; `max_steps=` only says where this invocation stops, so a run cut in
two pieces (`--max-steps 20`, then `--resume`) follows exactly the same trajectory as a straight one.
"""

from __future__ import annotations

import math
import shutil
import signal
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from medunifier.config import ConfigError, MedUnifierConfig, load_config, save_config
from medunifier.data.augment import augment_batch
from medunifier.train.checkpoint import capture_rng_state, latest_checkpoint, save_checkpoint
from medunifier.train.compute import configure_compute
from medunifier.train.curriculum import Stage, resolve_stages, stage_at, total_steps, validate_stages
from medunifier.train.data import BatchStream, DataError, DataSource, build_loader, equalize, resolve_data
from medunifier.train.distributed import (
    check_accelerator,
    check_launch,
    cpu_only_multiprocess,
    write_rank_summary,
)
from medunifier.train.metrics import (
    MetricsLogger,
    as_floats,
    new_log_window,
    plot_loss_curves,
    progress_bar,
    stack_float64,
    update_progress,
)
from medunifier.train.optim import WarmupCosineSchedule, build_optimizer
from medunifier.train.precision import resolve_mixed_precision
from medunifier.train.resume import check_resumable, choose_checkpoint, restore_run
from medunifier.train.signals import StopFlag
from medunifier.train.teacher import ItcTeacherTargets
from medunifier.utils import launch_rank_world

__all__ = [
    "DataError", "NonFiniteLossError", "TrainResult", "Trainer", "build_model", "resolve_data", "train",
]

MAX_VAL_BATCHES = 50  # validation reads at most this many batches per process


class NonFiniteLossError(RuntimeError):
    """A NaN/inf loss or gradient norm stopped the run; the last good state was checkpointed."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    stage: str
    interrupted: bool = False
    checkpoint: Path | None = None
    model_dir: Path | None = None
    skipped_steps: int = 0
    dropped_samples: int = 0
    samples_per_s: float = 0.0
    is_main: bool = True  # False on the other processes of a multi-process run
    finished: bool = False  # the whole schedule is done (not stopped early by max_steps or a signal)
    config: MedUnifierConfig | None = None  # the validated config the run trained with
    prior: Any = None  # the PriorTrainResult when the caller ran the prior stage (see generate.prior_stage)


def build_model(config: MedUnifierConfig) -> nn.Module:
    """The model a run trains (a function so that tests can substitute it)."""
    from medunifier.model.medunifier import MedUnifier

    return MedUnifier(config)


# ------------------------------------------------------------------------------------------ trainer


class Trainer:
    """One invocation of a run: builds everything, trains stage after stage, saves, logs."""

    def __init__(
        self,
        config: MedUnifierConfig,
        source: DataSource,
        run_dir: Path,
        stages: list[Stage],
        max_steps: int,
        resume_from: Path | None,
        schedule_changed: bool = False,
    ):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, set_seed

        self.config, self.source, self.run_dir, self.stages = config, source, run_dir, stages
        self.tc = config.train
        self.stop_at = max_steps
        self.precision = resolve_mixed_precision(self.tc.mixed_precision)
        # unused parameters are normal: a zero loss weight skips an objective, a stage freezes modules
        self.accelerator = Accelerator(
            cpu=cpu_only_multiprocess(),
            mixed_precision=self.precision,
            gradient_accumulation_steps=self.tc.grad_accum,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        acc = self.accelerator
        check_accelerator(acc)  # FSDP / DeepSpeed asked for by an Accelerate state or config: refused
        self.rank, self.world = acc.process_index, acc.num_processes
        self.is_main = acc.is_main_process
        if self.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, run_dir / "config.yaml")
            for stale in (run_dir / "checkpoints").glob(".tmp-*"):  # left by a crash mid-save
                shutil.rmtree(stale, ignore_errors=True)
        acc.wait_for_everyone()

        set_seed(self.tc.seed)  # identical initialisation on every process
        model = build_model(config)
        model.set_trainable(None)  # the optimiser holds every parameter any stage may train
        configure_compute(model, self.tc)  # train.gradient_checkpointing, train.compile
        optimizer = build_optimizer(model, self.tc.lr, self.tc.weight_decay, tuple(self.tc.betas),
                                    self.tc.lr_scale)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.tokenizer = self.unwrapped.tokenizer
        self.teacher: ItcTeacherTargets | None = None  # stage 0 as ITC's teacher (itc_distill)
        if config.itc_distill > 0:
            with acc.main_process_first():  # the main process writes the text-embedding cache first
                self.teacher = ItcTeacherTargets.build(config, source.train_records, run_dir, self._say).to(acc.device)

        self.step = 0
        self.skipped_steps = 0
        self.dropped_samples = 0
        self.samples_seen = 0
        self.first_ids: list[str] = []
        self.stage_index = 0
        self.stream: BatchStream | None = None
        self.scheduler: WarmupCosineSchedule | None = None
        self.last_saved: int | None = None
        self.last_val: int | None = None
        # a resumed run's data position and scheduler state, taken up when its stage starts
        self._saved_data: dict[str, Any] | None = None
        self._saved_sched: dict[str, Any] | None = None
        self.resumed_from = resume_from
        if resume_from is not None:
            restored = restore_run(resume_from, self.unwrapped, self.optimizer, scaler=acc.scaler, stages=stages,
                                   rank=self.rank, world=self.world, seed=self.tc.seed,
                                   schedule_changed=schedule_changed, run_dir=run_dir, is_main=self.is_main)
            self.step, self.skipped_steps = restored.step, restored.skipped_steps
            self.dropped_samples, self.samples_seen = restored.dropped_samples, restored.samples_seen
            self._saved_data, self._saved_sched = restored.data, restored.scheduler
            self.last_saved = self.last_val = self.step
        else:
            set_seed(self.tc.seed + self.rank)  # dropout and ITM negatives differ across processes
        self.logger = MetricsLogger(run_dir, enabled=self.is_main)
        self.stop = StopFlag()
        self.progress: Any = None

    def _say(self, message: str, err: bool = False) -> None:
        """Print without breaking the progress bar."""
        if self.progress is not None:
            self.progress.write(message, file=sys.stderr if err else sys.stdout)
        else:
            print(message, file=sys.stderr if err else sys.stdout, flush=True)

    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    # ------------------------------------------------------------------------------------- data

    def _loader(self, stage: Stage, split: str) -> DataLoader | None:
        """This process's DataLoader of a stage's split (None when the split is empty)."""
        return build_loader(self.config, self.source, stage, split, self.tokenizer, rank=self.rank,
                            world=self.world, pin_memory=self.accelerator.device.type == "cuda")

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        device = self.accelerator.device
        return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}

    def _agree(self, values: list[float], op: str) -> list[float]:
        """One small collective: the min or max of each value over processes (no-op on one process)."""
        if self.world == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX)
        return t.tolist()

    def _next_batch(self) -> dict[str, Any]:
        """The next micro-batch, cut to the same size on every process (unreadable images were dropped)."""
        assert self.stream is not None
        empty = 0
        while True:
            batch = self.stream.next()
            n_local = 0 if batch is None else len(batch["ids"])
            self.dropped_samples += self.tc.batch_size - n_local
            (n,) = self._agree([float(n_local)], "min")
            if n > 0:
                batch = equalize(batch, int(n)) if n < n_local else batch
                if len(self.first_ids) < 64:  # which samples this process saw first (ranks/rank-N.json)
                    self.first_ids.extend(batch["ids"][: 64 - len(self.first_ids)])
                batch = self._to_device(batch)
                if self.teacher is not None:
                    model = self.unwrapped
                    batch = self.teacher.annotate(batch, model.vision, model.cache_keys(batch) if
                                                  model.uses_feature_cache else None)
                return batch
            empty += 1
            if empty >= 100:
                raise DataError("100 batches in a row had no readable image: check the image paths")

    # ------------------------------------------------------------------------------- stage set-up

    def _enter_stage(self, stage: Stage, stage_step: int) -> None:
        self.stage_index = stage.index
        self.unwrapped.set_trainable(stage.train_modules)
        self.scheduler = WarmupCosineSchedule(
            self.optimizer, peak_lr=stage.lr, total_steps=stage.steps, warmup_ratio=self.tc.warmup_ratio,
            warmup_start_lr=self.tc.warmup_start_lr, min_lr=self.tc.min_lr,
        )
        if self._saved_sched is not None:
            self.scheduler.load_state_dict(self._saved_sched)
        elif stage_step:
            self.scheduler.set_step(stage_step)
        loader = self._loader(stage, "train")
        self.stream = BatchStream(loader, self.tc.batch_size, seed=self.tc.seed + 1000 * stage.index + self.rank)
        if self._saved_data is not None:
            self.stream.load_state_dict(self._saved_data)
        self._saved_data = self._saved_sched = None
        if self.is_main:
            trainable = sum(p.numel() for p in self.unwrapped.parameters() if p.requires_grad)
            self._say(f"stage {stage.index + 1}/{len(self.stages)} '{stage.name}': steps {stage.start}-{stage.end}, "
                  f"lr {stage.lr:g}, losses {stage.losses.model_dump()}, mixture {stage.mixture or 'all'}, "
                  f"trainable {trainable:,} parameters" + (f", from step {self.step}" if stage_step else ""))

    # ------------------------------------------------------------------------------------- saving

    def save(self, step: int, rng_state: Any = None, data_state: dict[str, Any] | None = None) -> Path:
        stage_now = stage_at(self.stages, step)[0]
        in_stage = stage_now == self.stage_index and self.stream is not None
        acc = self.accelerator
        trainer_state = {
            "stage_index": stage_now,
            "stage_name": self.stages[stage_now].name if stage_now < len(self.stages) else "done",
            "stages": [[s.name, s.steps] for s in self.stages],
            "scheduler": self.scheduler.state_dict() if in_stage and self.scheduler else None,
            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
            "skipped_steps": self.skipped_steps,
            "dropped_samples": self.dropped_samples,
            "samples_seen": self.samples_seen,
            "world_size": self.world,
            "config_name": self.config.name,
            "time": time.time(),
        }
        if in_stage and data_state is None:
            data_state = self.stream.state_dict()
        rank_state = {"stage_index": stage_now, "data": data_state if in_stage else None}
        path = save_checkpoint(
            self.run_dir, step, self.unwrapped, self.optimizer, trainer_state, rank_state, rng_state,
            rank=self.rank, is_main=self.is_main, barrier=acc.wait_for_everyone, keep_last=self.tc.keep_last,
        )
        self.last_saved = step
        return path

    # ------------------------------------------------------------------------------------ training

    def _train_step(self, stage: Stage) -> dict[str, Any]:
        """One optimiser step over grad_accum micro-batches; returns what happened.

        Losses, metrics and the gradient norm stay on the device (detached; sums in float64), and the step
        reads back one small tensor only: whether each micro-batch's loss and the gradient norm are finite,
        checked after the last backward pass and before the optimiser step. When one is not, every
        micro-batch of the step has still been read and back-propagated; the gradients are thrown away
        and the step is reported as non-finite.
        """
        acc, tc = self.accelerator, self.tc
        loss_sums: dict[str, Tensor] = {}
        metric_sums: dict[str, Tensor | float] = {}
        micro_counts: dict[str, int] = defaultdict(int)
        checks: list[Tensor] = []  # [] bool: each micro-batch's loss is finite, then the gradient norm is
        micro_values: list[dict[str, Tensor]] = []
        micro_ids: list[list[str]] = []
        samples = 0
        grad_norm: Tensor | None = None
        check_norm = self.precision != "fp16"  # fp16 overflows are the grad scaler's job
        for _ in range(tc.grad_accum):
            batch = augment_batch(self._next_batch(), tc.augment)  # unchanged unless train.augment.enabled
            samples += len(batch["ids"])
            with acc.accumulate(self.model):
                # objective-routed mixtures ("t2i:report"): this micro-batch's group decides the weights
                out = self.model(batch, loss_weights=stage.losses_for(batch.get("objectives")))
                values = {"loss": out.loss.detach(), **{f"loss_{k}": v.detach() for k, v in out.losses.items()}}
                checks.append(torch.isfinite(values["loss"]))
                micro_values.append(values)
                micro_ids.append(batch["ids"])
                acc.backward(out.loss)
                if acc.sync_gradients:
                    max_norm = tc.grad_clip if tc.grad_clip is not None else float("inf")
                    if check_norm:
                        grad_norm = acc.clip_grad_norm_(self.model.parameters(), max_norm)
                        if grad_norm is not None:
                            checks.append(torch.isfinite(grad_norm))
                    failed = self._failed_checks(checks)
                    if any(failed):
                        self.unwrapped.zero_grad(set_to_none=True)
                        first = failed.index(True)
                        micro = min(first, len(micro_values) - 1)
                        outcome = {"finite": False, "ids": micro_ids[micro], "losses": as_floats(micro_values[micro]),
                                   "micro": micro, "samples": samples}
                        if first == len(micro_values):  # the losses were finite, the gradient norm is not
                            outcome["grad_norm"] = float(grad_norm)
                        return outcome
                    if not check_norm:
                        grad_norm = acc.clip_grad_norm_(self.model.parameters(), max_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            for k, v in values.items():
                loss_sums[k] = loss_sums.get(k, 0.0) + v.double()
                micro_counts[k] += 1
            for k, v in out.metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + (v.detach().double() if isinstance(v, Tensor) else v)
                micro_counts[k] += 1
        # means over the micro-batches that had each key (objective-routed micro-batches skip some losses)
        losses = {k: v / micro_counts[k] for k, v in loss_sums.items()}
        metrics = {k: v / micro_counts[k] for k, v in metric_sums.items()}
        return {"finite": True, "losses": losses, "metrics": metrics, "samples": samples, "grad_norm": grad_norm}

    def _failed_checks(self, checks: list[Tensor]) -> list[bool]:
        """Which finiteness checks failed on any process. The training step's one host-device sync."""
        failed = (~torch.stack(checks)).to(torch.float32)
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        return [bool(x) for x in failed.tolist()]  # host-device sync: once per step

    @torch.no_grad()
    def validate(self, stage: Stage) -> dict[str, float]:
        """Mean losses on the val split (model.eval(), no grad, a fixed RNG: comparable across steps)."""
        loader = self._loader(stage, "val")
        if loader is None:
            return {}
        model = self.unwrapped
        model.eval()
        sums: dict[str, Tensor] = {}  # float64 on the device: read once, after the last batch
        batches = 0
        devices = [self.accelerator.device.index or 0] if self.accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.tc.seed)
            iterator = iter(loader)
            for _ in range(MAX_VAL_BATCHES):
                batch = next(iterator, None)
                n_local = 0 if batch is None else len(batch["ids"])
                (n,) = self._agree([float(n_local)], "min")
                if n == 0:
                    break
                batch = self._to_device(equalize(batch, int(n)))
                with self.accelerator.autocast():
                    out = model(batch, loss_weights=stage.losses)
                for k, v in {"loss": out.loss, **{f"loss_{k}": v for k, v in out.losses.items()}}.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().double()
                batches += 1
        model.train()
        if batches == 0:
            return {}
        keys = sorted(sums)
        totals = torch.stack([sums[k] / batches for k in keys])
        if self.world > 1:
            totals = self.accelerator.reduce(totals, reduction="mean")
        return dict(zip(keys, totals.tolist()))

    def _log_window(self, window: dict[str, Any], stage: Stage, lr: float) -> dict[str, Any]:
        """The log record of a window of steps: means of its device-side sums, read back in one transfer."""
        device = self.accelerator.device
        keys = sorted(window["losses"])
        metric_keys = sorted(window["metrics"])
        # a key is averaged over the steps that had it (objective-routed stages skip some losses per step)
        counts = {k: max(1, window["counts"][k]) for k in [*keys, *metric_keys]}
        losses = stack_float64([window["losses"][k] / counts[k] for k in keys], device)
        samples, seconds = float(window["samples"]), window["time"]
        if self.world > 1:
            t = torch.cat([losses, torch.tensor([samples, seconds], dtype=torch.float64, device=device)])
            t = self.accelerator.reduce(t, reduction="sum")
            t[: len(keys)] /= self.world
            t[-1] /= self.world  # mean wall time of a process
            losses = t
        metrics = {k: window["metrics"][k] / counts[k] for k in metric_keys}
        on_device = [k for k in metric_keys if isinstance(metrics[k], Tensor)]
        extra = [metrics[k] for k in on_device]
        if window["grad_norm"] is not None:
            extra.append(window["grad_norm"])
        fetched = torch.cat([losses, stack_float64(extra, device)]).tolist()  # host-device sync: once per log window
        if self.world > 1:
            samples, seconds = fetched[len(keys)], fetched[len(keys) + 1]
            fetched = fetched[: len(keys)] + fetched[len(keys) + 2:]
        metrics.update(zip(on_device, fetched[len(keys): len(keys) + len(on_device)]))
        record = {"kind": "train", "step": self.step, "stage": stage.name, "lr": lr}
        record.update(dict(zip(keys, fetched[: len(keys)])))
        record["samples_per_s"] = samples / max(seconds, 1e-9)
        record.update(metrics)
        if window["grad_norm"] is not None:
            record["grad_norm"] = fetched[-1]
        record["skipped_steps"] = self.skipped_steps
        record["dropped_samples"] = self.dropped_samples
        record["samples_seen"] = self.samples_seen
        return record

    def run(self) -> TrainResult:
        acc, tc = self.accelerator, self.tc
        total = total_steps(self.stages)
        progress = self.progress = progress_bar(self.is_main, self.step, self.stop_at)
        throughput: list[float] = []
        result = TrainResult(self.run_dir, self.step, "", is_main=self.is_main)
        self.stop.install()
        try:
            self.model.train()
            while self.step < self.stop_at:
                stage_idx, stage_step = stage_at(self.stages, self.step)
                stage = self.stages[stage_idx]
                self._enter_stage(stage, stage_step)
                window = new_log_window()
                while self.step < min(stage.end, self.stop_at):
                    (stop,) = self._agree([1.0 if self.stop.requested else 0.0], "max")
                    if stop:
                        result.interrupted = True
                        break
                    lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
                    data_before = self.stream.state_dict()
                    rng_before = capture_rng_state()
                    t0 = time.perf_counter()
                    outcome = self._train_step(stage)
                    if not outcome["finite"]:
                        self._nonfinite(stage, outcome, data_before, rng_before)
                    self.scheduler.step()
                    self.step += 1
                    dt = time.perf_counter() - t0
                    self.samples_seen += outcome["samples"] * self.world
                    window["steps"] += 1 if outcome["finite"] else 0
                    window["samples"] += outcome["samples"]
                    window["time"] += dt
                    if outcome["finite"]:
                        for k, v in outcome["losses"].items():
                            window["losses"][k] += v
                            window["counts"][k] += 1
                        for k, v in outcome["metrics"].items():
                            window["metrics"][k] += v
                            window["counts"][k] += 1
                        window["grad_norm"] = outcome["grad_norm"]
                    if self.step % tc.log_every == 0:
                        record = self._log_window(window, stage, lr)
                        throughput.append(record["samples_per_s"])
                        self.logger.log(record)
                        update_progress(progress, self.step, record)
                        window = new_log_window()
                    elif progress is not None:
                        progress.update(self.step - progress.n)
                    if self.step % tc.val_every == 0:
                        self._run_validation(stage)
                    if self.step == stage.end and self.step < total:
                        self.save(self.step)  # stage boundary
                    elif self.step % tc.save_every == 0:
                        self.save(self.step)
                if result.interrupted:
                    break
            final_stage = self.stages[min(stage_at(self.stages, self.step)[0], len(self.stages) - 1)]
            if self.last_saved != self.step:
                result.checkpoint = self.save(self.step)
            else:
                result.checkpoint = latest_checkpoint(self.run_dir)
            if not result.interrupted:
                if self.last_val != self.step:
                    self._run_validation(final_stage)
                if self.is_main:
                    result.model_dir = self.unwrapped.save_pretrained(self.run_dir / "model")
            if self.world > 1:
                write_rank_summary(self.run_dir, self.rank, self.world, self.step, self.unwrapped,
                                   dropped_samples=self.dropped_samples, first_ids=self.first_ids)
            acc.wait_for_everyone()
            result.stage = final_stage.name
        finally:
            self.stop.restore()
            if progress is not None:
                progress.close()
                self.progress = None
            self.logger.close()
            if self.is_main:
                plot_loss_curves(self.run_dir)
        result.step = self.step
        result.skipped_steps = self.skipped_steps
        result.dropped_samples = self.dropped_samples
        result.samples_per_s = sum(throughput[1:] or throughput) / max(1, len(throughput[1:] or throughput))
        if result.interrupted and self.is_main:
            print(f"stopped by {signal.Signals(self.stop.signal).name} at step {self.step}; "
                  f"checkpoint {result.checkpoint}; continue with --resume")
        return result

    def _run_validation(self, stage: Stage) -> None:
        val = self.validate(stage)
        self.last_val = self.step
        if val:
            self.logger.log({"kind": "val", "step": self.step, "stage": stage.name, **val})
            if self.is_main:
                self._say(f"step {self.step} val " + " ".join(f"{k}={v:.4f}" for k, v in val.items()))

    def _nonfinite(self, stage: Stage, outcome: dict[str, Any], data_before: Any, rng_before: Any) -> None:
        what = "gradient norm" if "grad_norm" in outcome else "loss"
        detail = (f"non-finite {what} at step {self.step + 1} (stage '{stage.name}', micro-batch "
                  f"{outcome['micro']}); losses {outcome['losses']}"
                  + (f", grad_norm {outcome['grad_norm']}" if "grad_norm" in outcome else "")
                  + f"; batch ids {outcome['ids']}")
        if self.tc.skip_nonfinite:
            self.skipped_steps += 1
            self._say(f"warning: skipped {detail}", err=True)
            return
        path = self.save(self.step, rng_state=rng_before, data_state=data_before)
        raise NonFiniteLossError(f"{detail}. Saved the last good state as {path}; set train.skip_nonfinite=true "
                                 "to skip such steps, or lower train.lr")


# -------------------------------------------------------------------------------------- entry point


def train(
    config: str | Path | MedUnifierConfig,
    data: str | Path,
    out: str | Path,
    max_steps: int | None = None,
    resume: bool = False,
    overrides: list[str] | None = None,
    resume_from: str | Path | None = None,
) -> TrainResult:
    """Pre-train MedUnifier on `data` (manifest or shards) into the run folder `out`.

    `config` is a preset name, a YAML path or a config object; `overrides` are `key=value` strings.
    `max_steps` stops this invocation early (the schedule still spans the config's steps);
    `resume` continues from the newest intact checkpoint in `out` (a damaged newer one is moved aside to
    `step-N.damaged`); `resume_from` names the checkpoint folder to continue from instead. Everything that
    can be checked without the model (config, data path, curriculum against the data, the run folder,
    the checkpoint) is checked first, and before them the launch: FSDP, DeepSpeed and Megatron-LM are refused
    (`train.distributed`).
    """
    check_launch()
    if isinstance(config, MedUnifierConfig):
        cfg = config
        if overrides:
            from medunifier.config import apply_overrides, config_from_dict

            cfg = config_from_dict(apply_overrides(config.to_dict(), overrides), "<config + overrides>")
    else:
        cfg = load_config(config, overrides)
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"max_steps must be >= 1, got {max_steps}")
    stages = resolve_stages(cfg)
    source = resolve_data(data, report_dir=out)
    if source.kind == "shards" and any(s.mixture for s in stages):
        raise ConfigError("curriculum mixtures need a manifest: shards are read as a stream in file order")
    world = launch_rank_world()[1]
    n_train = len(source.train_records)
    if source.kind == "manifest" and not all(s.mixture for s in stages) and math.ceil(n_train / world) < \
            cfg.train.batch_size:
        raise DataError(f"{source.path}: the train split has {n_train} samples, fewer than one batch of "
                        f"{cfg.train.batch_size} for each of {world} process(es): lower train.batch_size")
    from medunifier.model.medunifier import MedUnifier

    validate_stages(stages, source.train_records, getattr(MedUnifier, "MODULE_PREFIXES", None))

    run_dir = Path(out)
    resume_from = choose_checkpoint(run_dir, resume, resume_from)
    total = total_steps(stages)
    schedule_changed = resume_from is not None and check_resumable(resume_from, stages)
    stop_at = total if max_steps is None else min(max_steps, total)
    trainer = Trainer(cfg, source, run_dir, stages, stop_at, resume_from, schedule_changed)
    result = trainer.run()
    result.config = cfg
    result.finished = not result.interrupted and result.step >= total
    return result

