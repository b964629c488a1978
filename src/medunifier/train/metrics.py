"""What a run writes about itself: `metrics.jsonl`, optional TensorBoard, `loss_curves.png`, the progress bar.

Each line of `metrics.jsonl` is one JSON object with `kind` ("train" or "val"), `step`, `stage`
and flat numeric fields (`loss`, `loss_itc`, ..., `lr`, `samples_per_s`, codebook usage, ...).
On resume the file is cut back to the checkpoint's step so that it reads like one straight run.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from medunifier.utils import jsonable

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "loss_curves.png"


def new_log_window() -> dict[str, Any]:
    """The sums a log window accumulates on the device until it is logged (one host sync per window)."""
    return {"steps": 0, "samples": 0, "time": 0.0, "losses": defaultdict(float), "metrics": defaultdict(float),
            "counts": defaultdict(int), "grad_norm": None}


def as_floats(values: dict[str, Tensor]) -> dict[str, float]:
    """{name: [] tensor} -> {name: float} (one host sync per value)."""
    return {k: float(v) for k, v in values.items()}


def stack_float64(values: list[Tensor], device: torch.device) -> Tensor:
    """[] tensors on `device` -> one float64 vector [N] (empty when there are none)."""
    if not values:
        return torch.zeros(0, dtype=torch.float64, device=device)
    return torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """Records of a run's metrics.jsonl (optionally only one kind); a torn last line is ignored."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if kind is None or record.get("kind") == kind:
            records.append(record)
    return records


def truncate_metrics(run_dir: str | Path, step: int) -> int:
    """Drop records logged after `step` (written by a run that died after its last checkpoint)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return 0
    records = read_metrics(run_dir)
    kept = [r for r in records if r.get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(path)
    return len(records) - len(kept)


class MetricsLogger:
    """Appends records to metrics.jsonl and mirrors scalars to TensorBoard when it is installed.

    Only the main process should write: pass `enabled=False` on the others.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        self._file = (self.run_dir / METRICS_FILE).open("a", encoding="utf-8")
        if tensorboard:
            self._tb = _tensorboard_writer(self.run_dir / "tensorboard")

    @property
    def tensorboard_enabled(self) -> bool:
        return self._tb is not None

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled or self._file is None:
            return
        clean = jsonable(record, nonfinite_as_str=True)
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self._tb is not None:
            kind, step = clean.get("kind", "train"), clean.get("step", 0)
            for key, value in clean.items():
                if key not in ("step", "kind") and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _tensorboard_writer(log_dir: Path) -> Any:
    """A SummaryWriter when torch's TensorBoard support and the tensorboard package import, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed (optional)
        return None
    return SummaryWriter(log_dir=str(log_dir))


def plot_loss_curves(run_dir: str | Path, out_path: str | Path | None = None) -> Path | None:
    """Training losses (one line per objective, light smoothing) and validation loss against step."""
    train = read_metrics(run_dir, "train")
    val = read_metrics(run_dir, "val")
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for record in train:
        for key, value in record.items():
            if (key == "loss" or key.startswith("loss_")) and isinstance(value, (int, float)):
                series[key].append((record["step"], float(value)))
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for key, points in sorted(series.items()):
        steps, values = zip(*points)
        ax.plot(steps, _ema(values), label=f"train {key}", linewidth=1.6 if key == "loss" else 1.0)
    val_points = [(r["step"], float(r["loss"])) for r in val if isinstance(r.get("loss"), (int, float))]
    if val_points:
        steps, values = zip(*val_points)
        ax.plot(steps, values, "o--", color="black", label="val loss")
    finite = [v for points in series.values() for _, v in points if math.isfinite(v)]
    if finite and min(finite) > 0:
        ax.set_yscale("log")  # the objectives differ by orders of magnitude (VQ terms ~1e-4, ITG ~10)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss")
    ax.set_title(f"{Path(run_dir).name}: losses")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out = Path(out_path) if out_path is not None else Path(run_dir) / CURVES_FILE
    fig.savefig(out)
    plt.close(fig)
    return out


def _ema(values: tuple[float, ...], alpha: float = 0.2) -> list[float]:
    """Exponential moving average; a short series is returned as is."""
    if len(values) < 20:
        return list(values)
    out, running = [], values[0]
    for v in values:
        running = alpha * v + (1 - alpha) * running if math.isfinite(v) else running
        out.append(running)
    return out


def progress_bar(enabled: bool, start: int, total: int) -> Any:
    """The terminal progress bar of the main process (None elsewhere); MEDUNIFIER_NO_PROGRESS=1 hides it.

    Args:
        enabled: this is the main process.
        start: the step the bar starts from (a resumed run's).
        total: the step this invocation stops at.
    """
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="pretrain", unit="step", dynamic_ncols=True,
                disable=os.environ.get("MEDUNIFIER_NO_PROGRESS") == "1", file=sys.stderr)


def update_progress(progress: Any, step: int, record: dict[str, Any]) -> None:
    """Move the bar to `step` and show the losses and throughput of a train log record.

    Args:
        progress: the bar from `progress_bar` (None: nothing to do).
        step: the step just finished.
        record: the log record of the window ending at `step`.
    """
    if progress is None:
        return
    shown = {"loss": record.get("loss")}
    for key in ("loss_itc", "loss_itm", "loss_itg", "loss_tig", "loss_i2i"):
        if key in record:
            shown[key[5:]] = record[key]
    postfix = {k: f"{v:.3f}" for k, v in shown.items() if isinstance(v, float) and math.isfinite(v)}
    postfix["samples/s"] = f"{record['samples_per_s']:.1f}"
    progress.set_postfix(postfix, refresh=False)
    progress.update(step - progress.n)
