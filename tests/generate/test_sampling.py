"""Training the priors of a run (resume), the Synthesizer (seeded, edits keep what they should), the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from medunifier.cli import app
from medunifier.config import ConfigError, load_config
from medunifier.data.synthcxr import write_synthcxr
from medunifier.generate.sampling import Synthesizer
from medunifier.generate.train_prior import batch_indices, find_prior_dir, train_prior
from medunifier.model.medunifier import MedUnifier

SMALL_MODEL = [
    "image.size=32", "vision.backbone=vit", "vision.hidden_size=32", "vision.num_layers=1", "vision.num_heads=2",
    "vision.intermediate_size=64", "vision.patch_size=8", "encoder.hidden_size=32", "encoder.num_layers=1",
    "encoder.num_heads=2", "encoder.intermediate_size=64", "encoder.num_queries=4",
    "encoder.max_position_embeddings=96", "encoder.embed_dim=16", "encoder.dropout=0.0", "text.max_length=80",
    "generator.top_size=4", "generator.bottom_size=8", "generator.codebook_size=16", "generator.codebook_dim=8",
    "generator.adapter_hidden=16", "generator.adapter_blocks=1", "generator.decoder_channels=8",
    "generator.kmeans_init=false",
    # a prior small enough for tests; dropout 0 keeps the resume comparison about the RNG, not luck
    "prior.width=32", "prior.layers=1", "prior.heads=2", "prior.dropout=0.0", "prior.batch_size=8",
    "prior.max_steps=4", "prior.save_every=2", "prior.steps=3", "prior.guidance=2.0",
]  # fmt: skip


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SynthCXR (24 images of 32x32 + 2 per finding in the 5x200 set), a random small model, a 4-step prior."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("gen")
    write_synthcxr(root / "data", n=24, size=32, seed=0, workers=1, per_class_5x200=2)
    torch.manual_seed(0)
    MedUnifier(load_config("tiny", SMALL_MODEL)).save_pretrained(root / "run" / "model")
    train_prior(root / "run", root / "data" / "manifest.jsonl", log=lambda _: None)
    torch.set_num_threads(threads)
    return root


@pytest.fixture(scope="module")
def synth(small_run: Path) -> Synthesizer:
    return Synthesizer.from_run(small_run / "run")


def test_prior_files_and_metadata(small_run: Path) -> None:
    prior_dir = find_prior_dir(small_run / "run")
    assert prior_dir == small_run / "run" / "prior"
    assert find_prior_dir(small_run / "run" / "model") == prior_dir  # serve passes the model folder
    meta = json.loads((prior_dir / "prior.json").read_text())
    assert meta["step"] == 4 and meta["finished"] and meta["config"]["codebook_size"] == 16
    assert meta["config"]["text_width"] == 32 and meta["settings"]["width"] == 32
    kinds = [json.loads(line)["kind"] for line in (prior_dir / "metrics.jsonl").read_text().splitlines()]
    assert "train" in kinds and "val" in kinds


def test_batch_indices_cover_an_epoch_without_repeats() -> None:
    batches = [batch_indices(10, 3, s, seed=1) for s in range(3)]  # 3 batches per epoch, one sample dropped
    seen = torch.cat(batches)
    assert len(set(seen.tolist())) == 9
    assert torch.equal(batch_indices(10, 3, 4, seed=1), batch_indices(10, 3, 4, seed=1))
    assert not torch.equal(batch_indices(10, 3, 3, seed=1), batch_indices(10, 3, 0, seed=1))  # new epoch order


def test_train_prior_resume_matches_a_straight_run(small_run: Path, tmp_path: Path) -> None:
    data = small_run / "data" / "manifest.jsonl"
    for name in ("straight", "pieces"):
        shutil.copytree(small_run / "run" / "model", tmp_path / name / "model")
    quiet = {"log": lambda _: None}
    train_prior(tmp_path / "straight", data, **quiet)
    first = train_prior(tmp_path / "pieces", data, max_steps=3, **quiet)
    assert first.step == 3 and not first.interrupted
    with pytest.raises(ConfigError, match="--resume"):
        train_prior(tmp_path / "pieces", data, **quiet)
    second = train_prior(tmp_path / "pieces", data, resume=True, **quiet)
    assert second.step == 4
    a = load_file(str(tmp_path / "straight" / "prior" / "prior.safetensors"))
    b = load_file(str(tmp_path / "pieces" / "prior" / "prior.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    # and the codes were encoded once: the resumed run reused the cache written by the first piece
    assert (tmp_path / "pieces" / "prior" / "codes.safetensors").exists()


def test_same_seed_same_images(synth: Synthesizer) -> None:
    texts = ["FINDINGS: Large left pleural effusion. IMPRESSION: Effusion.", "Moderate cardiomegaly."]
    a = synth.generate(texts, n=2, seed=7)
    b = synth.generate(texts, n=2, seed=7)
    c = synth.generate(texts, n=2, seed=8)
    assert len(a) == 4 and a[0].shape == (32, 32) and a[0].dtype == np.uint8
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    top_a, bottom_a = synth.sample_codes(texts, 2, seed=7)
    top_c, bottom_c = synth.sample_codes(texts, 2, seed=8)
    assert not (torch.equal(top_a, top_c) and torch.equal(bottom_a, bottom_c))
    assert len(c) == 4


def test_edit_keeps_codes_outside_the_region(synth: Synthesizer, small_run: Path) -> None:
    pixels = synth.preprocess([small_run / "data" / "images" / f"{i:06d}.png" for i in range(3)])
    top, bottom = synth.encode(pixels)
    region = torch.zeros(32, 32, dtype=torch.bool)
    region[16:, :16] = True  # lower-left quadrant of the image
    texts = ["Large right pleural effusion."] * 3
    new_top, new_bottom, m_top, m_bottom = synth.edit_codes(top, bottom, texts, strength=0.5, region=region, seed=3)
    inside_top = torch.zeros(4, 4, dtype=torch.bool)
    inside_top[2:, :2] = True
    inside_bottom = torch.zeros(8, 8, dtype=torch.bool)
    inside_bottom[4:, :4] = True
    assert not (m_top & ~inside_top).any() and not (m_bottom & ~inside_bottom).any()
    assert (m_top.flatten(1).sum(1) == 2).all() and (m_bottom.flatten(1).sum(1) == 8).all()  # half of 4 and 16
    assert torch.equal(new_top[~m_top], top[~m_top]) and torch.equal(new_bottom[~m_bottom], bottom[~m_bottom])
    again = synth.edit_codes(top, bottom, texts, strength=0.5, region=region, seed=3)
    assert torch.equal(again[0], new_top) and torch.equal(again[1], new_bottom)
    unchanged = synth.edit_codes(top, bottom, texts, strength=0.0, region=region, seed=3)
    assert torch.equal(unchanged[0], top) and torch.equal(unchanged[1], bottom)
    everything = synth.edit_codes(top, bottom, texts, strength=1.0, seed=3)
    assert everything[2].all() and everything[3].all()


def test_edit_image_and_reconstruct(synth: Synthesizer, small_run: Path, tmp_path: Path) -> None:
    source = small_run / "data" / "images" / "000002.png"
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = 255
    edited, diff = synth.edit_image(source, "Cardiomegaly.", strength=1.0, mask=mask, seed=1)
    recon = synth.reconstruct(source)
    assert edited.shape == diff.shape == recon.shape == (32, 32)
    assert np.array_equal(diff, np.abs(edited.astype(int) - recon.astype(int)).astype(np.uint8))
    same, _ = synth.edit_image(source, "Cardiomegaly.", strength=1.0, mask=mask, seed=1)
    assert np.array_equal(same, edited)


def test_service_protocol(synth: Synthesizer, small_run: Path) -> None:
    from medunifier.serve.api import ImageGenerator, load_generator

    assert isinstance(synth, ImageGenerator)
    images = synth.synthesize(["Left effusion."], 3, guidance=1.5, steps=2, seed=0)
    assert images.shape == (3, 1, 32, 32)
    edited = synth.edit(images[:1], ["Cardiomegaly."], strength=0.5, guidance=1.5, steps=2, seed=0)
    assert edited.shape == (1, 1, 32, 32)
    generator, reason = load_generator(synth.model, small_run / "run" / "model")
    assert generator is not None, reason


def test_cli_generate_image_dicom_edit_reconstruct(small_run: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    run = str(small_run / "run")
    out = tmp_path / "gen"
    result = runner.invoke(app, ["generate", "image", "Small right pleural effusion.", "--ckpt", run, "--n", "2",
                                 "--seed", "5", "--out", str(out), "--dicom"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["prompt.json", "sample_000.dcm", "sample_000.png",
                                                     "sample_001.dcm", "sample_001.png"]
    ds = [pydicom.dcmread(out / f"sample_00{i}.dcm") for i in range(2)]
    assert "DERIVED" in ds[0].ImageType and ds[0].ConversionType == "SYN" and "SYNTHETIC" in ds[0].ImageComments
    assert ds[0].SeriesInstanceUID == ds[1].SeriesInstanceUID and ds[0].SOPInstanceUID != ds[1].SOPInstanceUID
    again = tmp_path / "again"
    runner.invoke(app, ["generate", "image", "Small right pleural effusion.", "--ckpt", run, "--n", "2", "--seed",
                        "5", "--out", str(again)])
    assert (out / "sample_001.png").read_bytes() == (again / "sample_001.png").read_bytes()

    source = small_run / "data" / "images" / "000003.png"
    edited = tmp_path / "edit.png"
    result = runner.invoke(app, ["generate", "edit", str(source), "Cardiomegaly.", "--ckpt", run, "--strength",
                                 "0.5", "--out", str(edited)])
    assert result.exit_code == 0, result.output
    assert edited.exists() and (tmp_path / "edit_diff.png").exists()
    recon = tmp_path / "recon.png"
    result = runner.invoke(app, ["generate", "reconstruct", str(source), "--ckpt", run, "--out", str(recon)])
    assert result.exit_code == 0 and "PSNR" in result.output and recon.exists()
    shutil.copytree(small_run / "run" / "model", tmp_path / "bare" / "model")  # a run without a prior
    result = runner.invoke(app, ["generate", "image", "x", "--ckpt", str(tmp_path / "bare"), "--n", "1"])
    assert result.exit_code == 2 and "no trained image prior" in result.output


def test_eval_synthesis_cli_end_to_end(small_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "synthesis"
    result = CliRunner().invoke(app, [
        "eval", "synthesis", "--ckpt", str(small_run / "run"), "--data", str(small_run / "data" / "manifest.jsonl"),
        "--out", str(out), "--prompts-per-finding", "2", "--samples-per-prompt", "2", "--edits-per-finding", "1",
        "--no-fid",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    r = json.loads((out / "results.json").read_text())
    assert r["consistency"]["n"] == 20 and 0.0 <= r["consistency"]["macro"] <= 1.0
    assert set(r["fid"]["domain"]) >= {"generated", "real_vs_real", "random_codes", "reconstruction"}
    assert r["fid"]["domain"]["real_vs_real"] >= 0 and "inception" not in r["fid"]
    assert r["edits"]["n"] >= 1 and 0.0 <= r["edits"]["ssim_outside_reconstruction"] <= 1.0
    assert set(r["targets"]) == {"consistency_macro>=0.70", "fid_closer_to_real_than_random",
                                 "edit_flip_rate>=0.70", "edit_ssim_outside>=0.8"}


def test_demo_section_html(small_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import medunifier.eval.synthesis as synthesis
    from medunifier.demo_generation import demo_generation_section, train_demo_priors

    assert train_demo_priors(small_run / "run", small_run / "data" / "manifest.jsonl", minutes=0.1) == (
        small_run / "run" / "prior")  # a finished prior is reused, not retrained
    full = synthesis.evaluate_synthesis

    def small(*args, **kwargs):
        kwargs.update(prompts_per_finding=1, samples_per_prompt=2, edits_per_finding=1, classifier_epochs=1, fid=False)
        return full(*args, **kwargs)

    monkeypatch.setattr(synthesis, "evaluate_synthesis", small)
    html, metrics = demo_generation_section(small_run / "run", small_run / "data")
    assert html.count("<img src='data:image/png;base64,") >= 5 + 2 + 1  # a row per finding, recon rows, an edit
    for title in ("Text-to-image generation", "Finding consistency", "Fréchet distance", "Counterfactual edits"):
        assert title in html
    assert metrics["consistency"]["n"] == 10 and "targets" in metrics
    assert (small_run / "run" / "eval" / "synthesis" / "results.json").exists()


def test_demo_prior_runs_its_fixed_step_count(small_run: Path, tmp_path: Path) -> None:
    import shutil

    from medunifier.demo_generation import train_demo_priors

    run = tmp_path / "run"
    shutil.copytree(small_run / "run" / "model", run / "model")
    prior = train_demo_priors(run, small_run / "data" / "manifest.jsonl", steps=3)
    meta = json.loads((prior / "prior.json").read_text())
    assert meta["finished"] and meta["step"] == meta["total_steps"] == 3
    with pytest.raises(ValueError, match="either steps or minutes"):
        train_demo_priors(run, small_run / "data" / "manifest.jsonl", steps=3, minutes=1.0)
