"""The code priors as the last curriculum stage of `pretrain` (prior.in_pretrain): trained once the model
stages finish, loadable by the Synthesizer, resumed and not retrained by `--resume`."""

from __future__ import annotations

from pathlib import Path

from medunifier.generate.prior_stage import pretrain
from medunifier.generate.train_prior import find_prior_dir
from medunifier.train.checkpoint import list_checkpoints
from medunifier.train.loop import train
from medunifier.train.metrics import read_metrics

PRIOR = ["prior.in_pretrain=true", "prior.width=32", "prior.layers=1", "prior.heads=2", "prior.batch_size=8",
         "prior.max_steps=4", "prior.save_every=2", "prior.steps=2", "train.max_steps=3"]


def test_prior_stage_runs_after_the_model_and_resumes(tiny_manifest: Path, tmp_path: Path, small) -> None:
    run = tmp_path / "run"
    # an invocation stopped before the end of the model schedule does not start the prior stage
    partial = pretrain("tiny", tiny_manifest, run, max_steps=2, overrides=small(*PRIOR))
    assert partial.step == 2 and partial.prior is None
    assert not (run / "prior").exists()

    result = pretrain("tiny", tiny_manifest, run, resume=True, overrides=small(*PRIOR))
    assert result.step == 3 and result.prior is not None
    prior_dir = find_prior_dir(run)
    assert prior_dir == run / "prior"
    assert [int(p.name.split("-")[-1]) for p in list_checkpoints(prior_dir)][-1] == 4
    assert [r["step"] for r in read_metrics(prior_dir, "train")][-1] == 4

    # a finished run resumed again: nothing left to train in either stage, nothing rewritten
    before = sorted(p.name for p in list_checkpoints(prior_dir))
    again = pretrain("tiny", tiny_manifest, run, resume=True, overrides=small(*PRIOR))
    assert again.step == 3
    assert sorted(p.name for p in list_checkpoints(prior_dir)) == before


def test_prior_stage_off_by_default(tiny_manifest: Path, tmp_path: Path, small) -> None:
    result = pretrain("tiny", tiny_manifest, tmp_path / "run", overrides=small("train.max_steps=2"))
    assert result.finished and result.prior is None and not (tmp_path / "run" / "prior").exists()


def test_the_training_engine_leaves_the_priors_to_its_caller(tiny_manifest: Path, tmp_path: Path, small) -> None:
    """`train` alone never trains priors, whatever prior.in_pretrain says; it reports the config and whether
    the schedule finished, which is what the caller (`pretrain`) decides on."""
    result = train("tiny", tiny_manifest, tmp_path / "run", overrides=small(*PRIOR))
    assert result.finished and result.config is not None and result.config.prior.in_pretrain
    assert result.prior is None and not (tmp_path / "run" / "prior").exists()


def test_model_checksum_ignores_the_header_key_order(tmp_path: Path) -> None:
    """The same tensors saved twice may get their safetensors header keys in another order: same checksum."""
    import json
    import struct

    from medunifier.generate.train_prior import weights_file_checksum

    data = bytes(range(8))
    entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    headers = [{"__metadata__": {"format": "pt", "medunifier": "0.1.0"}, "w": entry},
               {"w": entry, "__metadata__": {"medunifier": "0.1.0", "format": "pt"}},
               {"w": {**entry, "shape": [1, 2]}, "__metadata__": {"format": "pt"}}]
    sums = []
    for i, header in enumerate(headers):
        folder = tmp_path / str(i)
        folder.mkdir()
        raw = json.dumps(header).encode()
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)
        sums.append(weights_file_checksum(folder))
    assert sums[0] == sums[1] != sums[2]
