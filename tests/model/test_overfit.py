"""Overfit one batch of 32 real SynthCXR samples: the objectives fall to at most half their
starting values and the reconstruction sharpens (the save/load round trip is in test_medunifier.py).

A shrunk `tiny` (tests/shrunk_config.py, 32 px) keeps this to seconds; `benchmarks/overfit_tiny.py` runs
the same check on the full `tiny` preset.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medunifier.config import load_config
from medunifier.data.manifest import load_records
from medunifier.data.synthcxr import write_synthcxr
from medunifier.data.tokenizer import train_tokenizer
from medunifier.train.overfit import OBJECTIVES, overfit
from shrunk_config import SMALL_MODEL


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("synth")
    write_synthcxr(root, n=48, size=32, seed=0, workers=1, per_class_5x200=0)
    tokenizer_dir = root / "tokenizer"
    train_tokenizer([r.text for r in load_records(root / "manifest.jsonl")], tokenizer_dir, vocab_size=300)
    return root / "manifest.jsonl", tokenizer_dir


@pytest.fixture(autouse=True)
def _two_threads():
    """The trajectories are chaotic: pin the thread count of CI's two cores (on one thread the reconstruction
    of the all-four run gains 3.2 dB in 200 steps instead of 5.8), whatever earlier tests left set."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _config(tokenizer_dir: Path, *extra: str):
    return load_config("tiny", [*SMALL_MODEL, f"text.tokenizer={tokenizer_dir}", *extra])


@pytest.mark.slow
def test_itc_itg_tig_halve_and_reconstruction_sharpens(synth: tuple[Path, Path]) -> None:
    """All four objectives on one batch: ITC, ITG and TIG at most half their first values after 200 steps,
    and the reconstruction gains 4 dB.

    The learning rate decays to zero so that the check reads a settled model: at a constant rate the
    final PSNR swings by up to 2.5 dB between neighbouring steps and can gain as little as 3.0 dB. Decayed,
    six seeds on two threads gained 5.5-6.6 dB (TIG ratio at most 0.28) and three on one thread 5.7-6.3.
    ITM is trained too but not asserted: on one batch with ITC beside it, it stays near its prior (0.636)
    for about 350 steps at this initialisation before it falls (`benchmarks/overfit_tiny.py` shows the curves)."""
    manifest, tokenizer_dir = synth
    result = overfit(_config(tokenizer_dir), manifest, n=32, steps=200, lr=1e-3, decay=True)
    ratios = result.ratios()
    assert set(ratios) == set(OBJECTIVES)
    assert all(ratios[k] <= 0.5 for k in ("itc", "itg", "tig")), (ratios, result.first, result.last)
    assert result.psnr_db > result.first["psnr"] + 4.0, (result.first["psnr"], result.psnr_db)


@pytest.mark.slow
def test_itm_alone_fits_one_batch(synth: tuple[Path, Path]) -> None:
    """ITM by itself (hard negatives from the untrained ITC projections) halves within 250 steps.

    It sits at its prior (0.636) for about 90 steps and then falls within 20; when it leaves the prior
    varies from run to run (multithreaded reductions are not bit-reproducible), and one run in the full
    suite was still above half at step 150, so the budget has room."""
    manifest, tokenizer_dir = synth
    config = _config(tokenizer_dir, "losses.itc=0", "losses.itg=0", "losses.tig=0")
    result = overfit(config, manifest, n=32, steps=250, lr=1e-3)
    assert set(result.ratios()) == {"itm"}
    assert result.ratios()["itm"] <= 0.5, (result.first, result.last)
