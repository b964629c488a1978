"""Fixtures for the training-engine tests: a shrunk `tiny` config that trains in ~0.1 s per step."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from shrunk_config import SMALL_MODEL

# the `tiny` preset made smaller still: 32 px images, 2-layer width-64 vision and encoder, 8 queries,
# a 32 x 16 codebook; batch 8, a log line and a metrics record every step
SMALL = [
    *SMALL_MODEL,
    "encoder.num_queries=8",
    "generator.adapter_blocks=1",
    "train.batch_size=8",
    "train.lr=1e-3",
    "train.warmup_start_lr=1e-4",
    "train.log_every=1",
    "train.val_every=1000",
    "train.save_every=1000",
    "train.keep_last=2",
]


@pytest.fixture(autouse=True)
def _quiet_single_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No progress bar; one intra-op thread (these tiny ops run several times faster on a busy machine)."""
    monkeypatch.setenv("MEDUNIFIER_NO_PROGRESS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# a ~150-word WordPiece vocabulary instead of MiniLM's 30k: the LM head dominated the step time
VOCAB_TEXTS = [
    "FINDINGS: Sample {i}. There is cardiomegaly. The lungs are clear. IMPRESSION: No acute cardiopulmonary "
    "process. Atelectasis, consolidation, edema, pleural effusion, pneumothorax, nodule, support devices.",
    "Is there a pleural effusion? yes. Is the heart enlarged? no. Which side is the pneumothorax on? "
    "the left side, the right side.",
]


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medunifier.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    texts = [t.format(i=i) for t in VOCAB_TEXTS for i in range(20)]
    train_tokenizer(texts, out, vocab_size=200, min_frequency=1)
    return out


@pytest.fixture
def small(small_tokenizer: Path) -> Callable[..., list[str]]:
    """small(*extra): SMALL plus test-specific overrides (later ones win)."""
    return lambda *extra: [*SMALL, f"text.tokenizer={small_tokenizer}", *extra]


@pytest.fixture
def child_env() -> dict[str, str]:
    """Environment for a child `python -m medunifier.cli`: one thread, no progress bar."""
    env = dict(os.environ)
    env.update(MEDUNIFIER_NO_PROGRESS="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 SynthCXR images at 32 px with their reports (the stage-0 and ITC-teacher tests)."""
    from medunifier.data.synthcxr import write_synthcxr

    root = tmp_path_factory.mktemp("synth")
    write_synthcxr(root, n=40, size=32, seed=3, workers=1, per_class_5x200=0)
    return root / "manifest.jsonl"
