"""The training step reads one small tensor back from the device per step, and the log one per window.

Every host read of a tensor (`item`, `float`, `int`, `bool`, `tolist`, `numpy`) made by the training code
(`medunifier/train/`) is counted, per step and per log window, over a short run with gradient
accumulation. On a GPU each such read waits for the device; the losses and metrics must stay on the device
until the log step, and the only per-step read is the finiteness check before the optimiser step.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from medunifier.train import loop
from medunifier.train.loop import train
from medunifier.train.metrics import read_metrics

READS = ("item", "__float__", "__int__", "__bool__", "tolist", "numpy")
TRAIN_CODE = str(Path(loop.__file__).parent)


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> tuple[Counter, Counter]:
    """Patch the tensor read methods and the Trainer's phases; returns (training-code reads, all reads)
    keyed by phase: ("step", n) for step n and the loop's bookkeeping after it, ("log", n) for its log."""
    mine: Counter = Counter()
    everyone: Counter = Counter()
    phase: dict[str, Any] = {"now": None}

    for name in READS:
        original = getattr(torch.Tensor, name)

        def read(self, *args, __original=original, **kwargs):
            if phase["now"] is not None:
                everyone[phase["now"]] += 1
                if sys._getframe(1).f_code.co_filename.startswith(TRAIN_CODE):
                    mine[phase["now"]] += 1
            return __original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)

    def within(method: str, label: Any, keep: bool = False) -> None:
        original = getattr(loop.Trainer, method)

        def wrapped(self, *args, **kwargs):
            before = phase["now"]
            phase["now"] = label(self)
            try:
                return original(self, *args, **kwargs)
            finally:
                if not keep:
                    phase["now"] = before

        monkeypatch.setattr(loop.Trainer, method, wrapped)

    within("_train_step", lambda t: ("step", t.step + 1), keep=True)  # the run loop's bookkeeping counts too
    within("_log_window", lambda t: ("log", t.step))
    within("save", lambda t: None)
    within("_run_validation", lambda t: None)
    return mine, everyone


def test_one_host_read_per_step_and_one_per_log_window(
    tiny_manifest: Path, tmp_path: Path, small, monkeypatch: pytest.MonkeyPatch
) -> None:
    mine, everyone = _count_reads(monkeypatch)
    run = tmp_path / "run"
    result = train("tiny", tiny_manifest, run, overrides=small(
        "train.max_steps=6", "train.log_every=3", "train.grad_accum=2", "train.batch_size=4"))
    assert result.step == 6
    steps = {n: mine[("step", n)] for n in range(1, 7)}
    logs = {n: mine[("log", n)] for n in (3, 6)}
    # the finiteness check of both micro-batches' losses and the gradient norm: one read per step
    assert steps == dict.fromkeys(range(1, 7), 1), (steps, dict(everyone))
    assert logs == {3: 1, 6: 1}, logs
    assert not any(k[0] == "log" and k[1] not in (3, 6) for k in mine)
    # the window means reach the log unchanged: two records, each with every loss and metric
    records = read_metrics(run, "train")
    assert [r["step"] for r in records] == [3, 6]
    for r in records:
        assert isinstance(r["loss"], float) and isinstance(r["psnr"], float) and isinstance(r["grad_norm"], float)
