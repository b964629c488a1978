"""`medunifier eval ...` commands: with the fake model, and end to end with a small real MedUnifier."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eval_fakes import FakeModel
from typer.testing import CliRunner

from medunifier.cli import app
from shrunk_config import SMALL_MODEL

runner = CliRunner()

# the tiny preset shrunk further, so that an untrained model saves, loads and evaluates in seconds
SMALL = [*SMALL_MODEL, "encoder.num_queries=8", "generator.adapter_blocks=1"]


def test_eval_retrieval_cli_writes_results_and_prints_a_table(
    fake_model: FakeModel, band_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("medunifier.eval.common.load_model", lambda ckpt, device=None: fake_model)
    ckpt = tmp_path / "run"
    result = runner.invoke(app, ["eval", "retrieval", "--ckpt", str(ckpt), "--data", str(band_manifest),
                                 "--classes", "atelectasis,cardiomegaly,edema", "--k", "1,5"])
    assert result.exit_code == 0, result.output
    assert "mAP@5" in result.output and "image to text" in result.output
    saved = json.loads((ckpt / "eval" / "retrieval" / "results.json").read_text())
    assert saved["image_to_text"]["precision_at_k"] == {"1": 1.0, "5": pytest.approx(0.8)}


def test_eval_cli_reports_bad_input_without_a_traceback(tmp_path: Path) -> None:
    result = runner.invoke(app, ["eval", "zeroshot", "--ckpt", str(tmp_path), "--data", str(tmp_path / "x.jsonl"),
                                 "--ensemble", "median"])
    assert result.exit_code == 2 and "--ensemble" in result.output
    result = runner.invoke(app, ["eval", "finetune", "--ckpt", str(tmp_path), "--train", "a", "--val", "b",
                                 "--test", "c", "--mode", "partial"])
    assert result.exit_code == 2 and "--mode" in result.output


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained small MedUnifier saved as a run folder (`<run>/model`)."""
    torch = pytest.importorskip("torch")
    from medunifier.config import load_config
    from medunifier.data.tokenizer import train_tokenizer
    from medunifier.model.medunifier import MedUnifier

    root = tmp_path_factory.mktemp("small_run")
    texts = ["Mild bibasilar atelectasis. No pleural effusion. Mild cardiomegaly. No pneumothorax. "
             "Moderate pulmonary edema. No focal consolidation. Normal lungs. Enlarged heart."] * 20
    train_tokenizer(texts, root / "tokenizer", vocab_size=120, min_frequency=1)
    config = load_config("tiny", [*SMALL, f"text.tokenizer={root / 'tokenizer'}"])
    torch.manual_seed(0)
    MedUnifier(config).save_pretrained(root / "run" / "model")
    return root / "run"


def test_real_model_retrieval_zeroshot_report(small_run: Path, band_manifest: Path, prompt_file: Path) -> None:
    common = ["--ckpt", str(small_run), "--data", str(band_manifest), "--device", "cpu"]
    r = runner.invoke(app, ["eval", "retrieval", *common, "--classes", "atelectasis,cardiomegaly,edema"])
    assert r.exit_code == 0, r.output
    ret = json.loads((small_run / "eval" / "retrieval" / "results.json").read_text())
    assert ret["n"] == 12 and 0 <= ret["text_to_image"]["precision_at_k"]["10"] <= 1
    assert 1 <= ret["image_to_text"]["mean_rank"] <= 12

    r = runner.invoke(app, ["eval", "zeroshot", *common, "--prompts", str(prompt_file), "--ensemble", "max"])
    assert r.exit_code == 0, r.output
    zs = json.loads((small_run / "eval" / "zeroshot" / "results.json").read_text())
    assert zs["n"] == 12 and sum(map(sum, zs["confusion_matrix"])) == 12

    r = runner.invoke(app, ["eval", "report", *common, "--max-length", "6", "--no-meteor", "--limit", "3"])
    assert r.exit_code == 0, r.output
    rep = json.loads((small_run / "eval" / "report" / "results.json").read_text())
    assert rep["n"] == 3 and rep["decoding"]["num_beams"] == 3 and 0 <= rep["nlg"]["BLEU_1"] <= 1
    assert rep["nlg"]["METEOR"] is None and "micro" in rep["clinical_efficacy"] and rep["round_trip_refs"]


def test_real_model_full_finetuning_from_scratch(small_run: Path, split_manifest: Path, tmp_path: Path) -> None:
    m = str(split_manifest)
    r = runner.invoke(app, ["eval", "finetune", "--ckpt", str(small_run), "--train", m, "--val", m, "--test", m,
                            "--fractions", "1.0", "--seeds", "1", "--mode", "full", "--from-scratch", "--epochs", "1",
                            "--batch-size", "16", "--device", "cpu", "--out", str(tmp_path / "ft")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert res["mode"] == "full" and res["from_scratch"] and res["runs"][0]["n_train"] == 30
    assert 0 <= res["per_fraction"]["1.0"]["accuracy"]["mean"] <= 1


@pytest.mark.slow  # a real training run (build, 2 steps, save) and its evaluation: ~15-25 s on 2 busy cores
def test_eval_ablation_cli_with_the_real_trainer(small_run: Path, split_manifest: Path, prompt_file: Path,
                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("medunifier.train.loop")
    monkeypatch.setenv("MEDUNIFIER_NO_PROGRESS", "1")
    tokenizer = small_run.parent / "tokenizer"
    out = tmp_path / "abl"
    r = runner.invoke(app, ["eval", "ablation", "--config", "tiny", "--data", str(split_manifest), "--objectives",
                            "itc+itg", "--seeds", "1", "--steps", "2", "--prompts", str(prompt_file),
                            "--fractions", "1.0", "--out", str(out), "--device", "cpu",
                            *SMALL, f"text.tokenizer={tokenizer}", "train.batch_size=8", "train.log_every=1"])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert list(res["summary"]) == ["itc+itg"] and res["steps"] == 2
    log = [json.loads(x) for x in (out / "itc_itg" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    trained = {k[len("loss_"):] for rec in log if rec.get("kind") == "train" for k in rec if k.startswith("loss_")}
    assert trained == {"itc", "itg"}  # ITM and TIG switched off
    assert (out / "itc_itg" / "seed0" / "model" / "config.json").exists()
    assert 0 <= res["summary"]["itc+itg"]["zs_acc"]["mean"] <= 1
    assert "objective ablation" in r.output
