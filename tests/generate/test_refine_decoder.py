"""Refitting the decoder on the frozen codes: only the decoder changes, the codes and the priors stay valid,
held-out reconstructions improve, a stopped or failed pass writes nothing, bad settings are refused."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from medunifier.cli import app
from medunifier.config import load_config
from medunifier.data.manifest import load_records
from medunifier.data.synthcxr import write_synthcxr
from medunifier.generate.refine_decoder import DecoderRefineSettings, refine_decoder, refinement_passes
from medunifier.generate.sampling import Synthesizer
from medunifier.generate.train_prior import CODES_NAME, codes_checksum, encode_records, train_prior
from medunifier.model import load_model
from medunifier.model.medunifier import MedUnifier
from shrunk_config import SMALL_MODEL

PRIOR = ["prior.width=32", "prior.layers=1", "prior.heads=2", "prior.batch_size=8", "prior.max_steps=2",
         "prior.save_every=2", "prior.steps=2"]
FAST = DecoderRefineSettings(steps=40, batch_size=8, lr=3e-3)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SynthCXR: 40 images of 32x32 (train / val / test)."""
    root = tmp_path_factory.mktemp("refit")
    write_synthcxr(root / "data", n=40, size=32, seed=0, workers=1, per_class_5x200=1)
    return root / "data" / "manifest.jsonl"


def _run(tmp_path: Path) -> Path:
    """A random small model saved as a run folder (random codes, random decoder)."""
    torch.manual_seed(0)
    MedUnifier(load_config("tiny", [*SMALL_MODEL, *PRIOR])).save_pretrained(tmp_path / "run" / "model")
    return tmp_path / "run"


def _codes(run: Path, manifest: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    model = load_model(run / "model").eval()
    codes = encode_records(model, load_records(manifest, splits=[split]), manifest.parent)
    return codes.top, codes.bottom


def test_only_the_decoder_changes_and_held_out_psnr_rises(data: Path, tmp_path: Path) -> None:
    run = _run(tmp_path)
    before = load_file(str(run / "model" / "model.safetensors"))
    codes_before = _codes(run, data, "val")
    checksum_before = codes_checksum(load_model(run / "model"))

    result = refine_decoder(run, data, FAST, log=lambda _: None)

    assert not result.interrupted and result.steps == FAST.steps and result.val_images > 0
    assert result.val_psnr_after > result.val_psnr_before + 1.0  # a random decoder refitted to the images
    after = load_file(str(run / "model" / "model.safetensors"))
    assert after.keys() == before.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("generator.decoder.") for k in changed)
    assert changed == {k for k in before if k.startswith("generator.decoder.")}  # every decoder tensor trained
    # the same codes, hence the same cache key for the priors
    top, bottom = _codes(run, data, "val")
    assert torch.equal(top, codes_before[0]) and torch.equal(bottom, codes_before[1])
    assert codes_checksum(load_model(run / "model")) == checksum_before
    # the record: one pass with its settings and figures; a second pass appends
    passes = refinement_passes(run)
    assert len(passes) == 1 and passes[0]["settings"]["steps"] == FAST.steps
    assert passes[0]["val_psnr_after"] == pytest.approx(result.val_psnr_after)
    refine_decoder(run, data, DecoderRefineSettings(steps=2, batch_size=8), log=lambda _: None)
    assert len(refinement_passes(run / "model")) == 2


def test_priors_reuse_the_codes_and_stay_valid_across_a_refit(data: Path, tmp_path: Path) -> None:
    run = _run(tmp_path)
    logs: list[str] = []
    refine_decoder(run, data, DecoderRefineSettings(steps=3, batch_size=8), log=logs.append)
    assert any("encoded" in line for line in logs)  # the codes were computed once, here
    assert (run / "prior" / CODES_NAME).exists()
    logs.clear()
    train_prior(run, data, log=logs.append)
    assert not any("encoded" in line for line in logs)  # and read back by the prior stage
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Synthesizer.from_run(run)
    # a prior trained before a refit loads without a warning too: the codes did not change
    refine_decoder(run, data, DecoderRefineSettings(steps=3, batch_size=8), log=lambda _: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Synthesizer.from_run(run)
    # the same run copied to another folder: the same codes checksum, no warning
    copy = tmp_path / "elsewhere" / "copied"
    shutil.copytree(run, copy)
    assert codes_checksum(load_model(copy / "model")) == codes_checksum(load_model(run / "model"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Synthesizer.from_run(copy)
    # other code-making weights: the prior is flagged
    model = load_model(run / "model")
    with torch.no_grad():
        model.generator.quantizer_top._codebook.embed.add_(1.0)
    model.save_pretrained(run / "model")
    with pytest.warns(UserWarning, match="other model weights"):
        Synthesizer.from_run(run)


def test_a_stopped_pass_writes_nothing(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medunifier.train import signals

    run = _run(tmp_path)
    weights = (run / "model" / "model.safetensors").read_bytes()
    monkeypatch.setattr(signals.StopFlag, "requested", property(lambda self: True))
    result = refine_decoder(run, data, FAST, log=lambda _: None)
    assert result.interrupted and result.steps == 0 and result.val_psnr_after is None
    assert (run / "model" / "model.safetensors").read_bytes() == weights
    assert refinement_passes(run) == []


def test_a_failed_write_keeps_the_previous_weights(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medunifier.model import saving

    run = _run(tmp_path)
    weights = (run / "model" / "model.safetensors").read_bytes()

    def full_disk(*args, **kwargs):
        Path(args[1]).write_bytes(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(saving, "save_file", full_disk)
    with pytest.raises(OSError, match="No space"):
        refine_decoder(run, data, DecoderRefineSettings(steps=2, batch_size=8), log=lambda _: None)
    assert (run / "model" / "model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in (run / "model").iterdir()) == ["config.json", "model.safetensors", "tokenizer"]


@pytest.mark.parametrize("bad", [{"steps": 0}, {"batch_size": 0}, {"lr": 0.0}, {"lr": float("nan")},
                                 {"warmup_ratio": 1.0}, {"weight_decay": -1.0}])
def test_bad_settings_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        DecoderRefineSettings(**bad)


def test_cli(data: Path, tmp_path: Path) -> None:
    run = _run(tmp_path)
    runner = CliRunner()
    out = runner.invoke(app, ["generate", "refine-decoder", "--ckpt", str(run), "--data", str(data),
                              "--steps", "4", "--batch-size", "8"])
    assert out.exit_code == 0, out.output
    assert "validation PSNR" in out.output and len(refinement_passes(run)) == 1
    bad = runner.invoke(app, ["generate", "refine-decoder", "--ckpt", str(run), "--data", str(data), "--steps", "0"])
    assert bad.exit_code == 2 and "steps >= 1" in bad.output
    missing = runner.invoke(app, ["generate", "refine-decoder", "--ckpt", str(tmp_path / "nope"), "--data", str(data)])
    assert missing.exit_code == 2 and "no saved model" in missing.output
    assert json.loads((run / "model" / "decoder_refinement.json").read_text())["passes"][0]["settings"]["steps"] == 4
