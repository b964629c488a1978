"""The evaluators end to end on band images and a fake model whose scores can be worked out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from eval_fakes import CLASSES, REPORTS, FakeModel, make_band_manifest
from rich.console import Console

from medunifier.config import load_config
from medunifier.eval.ablation import StudySettings, ablation_config, parse_objectives, run_ablation
from medunifier.eval.common import assign_class, infer_classes, load_split
from medunifier.eval.finetune import run_finetune, stratified_subset
from medunifier.eval.report import run_report
from medunifier.eval.retrieval import run_retrieval
from medunifier.eval.zeroshot import load_prompts, run_zeroshot

QUIET = Console(quiet=True)


# ------------------------------------------------------------------------------------------ retrieval


def test_retrieval_on_band_images(fake_model: FakeModel, band_manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "ret"
    res = run_retrieval(fake_model, band_manifest, out, classes=CLASSES, console=QUIET)
    assert res["n"] == 12 and res["class_counts"] == {c: 4 for c in CLASSES}
    i2t, t2i = res["image_to_text"], res["text_to_image"]
    # 4 identical same-class reports share the top 4 of every image's list: P@1 = 1, P@5 = 4/5, P@10 = 4/10
    assert i2t["precision_at_k"] == {1: pytest.approx(1.0), 5: pytest.approx(0.8), 10: pytest.approx(0.4)}
    assert t2i["precision_at_k"] == {1: pytest.approx(1.0), 5: pytest.approx(0.8), 10: pytest.approx(0.4)}
    # tied reports are ranked by index, so the k-th image of a class finds its own report at rank k
    assert i2t["recall_at_k"][1] == pytest.approx(0.25) and i2t["mean_rank"] == pytest.approx(2.5)
    assert 1 <= t2i["mean_rank"] <= 4 and t2i["recall_at_k"][5] == 1.0
    saved = json.loads((out / "results.json").read_text())
    assert saved["image_to_text"]["precision_at_k"]["5"] == pytest.approx(0.8)


def test_retrieval_drops_records_without_exactly_one_class(fake_model: FakeModel, tmp_path: Path) -> None:
    path = make_band_manifest(tmp_path, per_class=2)
    lines = path.read_text().splitlines()
    rec = json.loads(lines[0])
    rec["labels"]["edema"] = 1  # two positives: ambiguous
    lines[0] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")
    res = run_retrieval(fake_model, path, None, classes=CLASSES, ks=(1,), console=QUIET)
    assert res["n"] == 5 and res["dropped"] == 1


def test_class_assignment_rules() -> None:
    assert assign_class({"a": 1, "b": 0}, ["a", "b"]) == 0
    assert assign_class({"a": 1, "b": 1}, ["a", "b"]) is None
    assert assign_class({"pneumonia": 0, "no_finding": 1}, ["normal", "pneumonia"]) == 0
    assert assign_class({"pneumonia": 1}, ["normal", "pneumonia"]) == 1
    assert assign_class({}, ["a", "b"]) is None


# ------------------------------------------------------------------------------------------ zero-shot


def test_load_prompts_expands_combinations_deterministically(prompt_file: Path) -> None:
    p = load_prompts(prompt_file)
    # atelectasis: 2 severities x 2 subtypes x 1 location = 4 = max_prompts, kept whole
    assert sorted(p["atelectasis"]) == sorted([
        "atelectasis at the base", "linear atelectasis at the base",
        "mild atelectasis at the base", "mild linear atelectasis at the base",
    ])
    assert p["cardiomegaly"] == ["cardiomegaly", "enlarged cardiac silhouette"]
    # edema: 2 x 1 x 2 = 4 combinations; 3 kept by a seeded sample
    three = load_prompts(prompt_file, seed=1, max_prompts=3)["edema"]
    assert len(three) == 3 and set(three) <= {"edema", "edema bilaterally", "mild edema", "mild edema bilaterally"}
    assert load_prompts(prompt_file, seed=1, max_prompts=3)["edema"] == three
    assert any(load_prompts(prompt_file, seed=s, max_prompts=3)["edema"] != three for s in range(2, 8))


def test_shipped_prompt_sets_load() -> None:
    chexpert = load_prompts("chexpert5")
    assert list(chexpert) == ["atelectasis", "cardiomegaly", "consolidation", "edema", "pleural_effusion"]
    assert all(5 <= len(v) <= 20 for v in chexpert.values())
    assert all("atelectasis" in p for p in chexpert["atelectasis"])
    assert list(load_prompts("pneumonia")) == ["normal", "pneumonia"]
    with pytest.raises(FileNotFoundError, match="shipped"):
        load_prompts("no-such-set")


def test_zeroshot_on_band_images(fake_model: FakeModel, band_manifest: Path, prompt_file: Path,
                                 tmp_path: Path) -> None:
    res = run_zeroshot(fake_model, band_manifest, prompt_file, tmp_path / "zs", ensemble="mean", console=QUIET)
    assert res["accuracy"] == 1.0 and res["macro_f1"] == 1.0 and res["auroc"] == 1.0
    assert res["num_prompts"] == {"atelectasis": 4, "cardiomegaly": 2, "edema": 4}
    saved = json.loads((tmp_path / "zs" / "prompts.json").read_text())
    assert saved["prompts"]["cardiomegaly"] == ["cardiomegaly", "enlarged cardiac silhouette"]


def test_zeroshot_mean_resists_a_generic_prompt_that_max_does_not(fake_model: FakeModel, band_manifest: Path) -> None:
    # a prompt naming no class embeds along the constant direction, which query 1 of every image matches
    # exactly (similarity 1): under "max" the class owning it wins everywhere; "mean" halves its pull
    prompts = {"atelectasis": ["atelectasis"], "cardiomegaly": ["cardiomegaly", "an unrelated sentence"],
               "edema": ["edema", "edema and cardiomegaly"]}
    mean = run_zeroshot(fake_model, band_manifest, prompts, ensemble="mean", console=QUIET)
    mx = run_zeroshot(fake_model, band_manifest, prompts, ensemble="max", console=QUIET)
    assert mean["accuracy"] == 1.0
    assert mx["confusion_matrix"] == [[0, 4, 0], [0, 4, 0], [0, 4, 0]]
    assert mx["accuracy"] == pytest.approx(1 / 3)


# ------------------------------------------------------------------------------------------ fine-tuning


def test_stratified_subset_keeps_every_class() -> None:
    y = np.array([0] * 10 + [1] * 100)
    idx = stratified_subset(y, 0.1, seed=0)
    assert (y[idx] == 0).sum() == 1 and (y[idx] == 1).sum() == 10
    assert np.array_equal(idx, stratified_subset(y, 0.1, seed=0))
    assert not np.array_equal(idx, stratified_subset(y, 0.1, seed=1))
    assert len(stratified_subset(y, 1.0, seed=3)) == 110


def test_linear_probe_multiclass(fake_model: FakeModel, split_manifest: Path, tmp_path: Path) -> None:
    res = run_finetune(fake_model, split_manifest, split_manifest, split_manifest, tmp_path / "lp",
                       fractions=(0.1, 1.0), seeds=2, mode="linear", console=QUIET)
    assert res["classes"] == list(CLASSES) and res["primary_metric"] == "accuracy"
    assert res["data"]["train"]["n"] == 30 and res["data"]["test"]["n"] == 12
    full = res["per_fraction"]["1.0"]
    assert full["accuracy"]["mean"] == 1.0 and full["accuracy"]["n"] == 2
    assert res["per_fraction"]["0.1"]["n_train"] == [3, 3]  # one image per class
    assert (tmp_path / "lp" / "results.json").exists()


def test_linear_probe_binary_and_from_scratch(fake_model: FakeModel, split_manifest: Path) -> None:
    classes = ["normal", "cardiomegaly"]  # atelectasis and edema images count as normal
    res = run_finetune(fake_model, split_manifest, split_manifest, split_manifest, None, fractions=(1.0,), seeds=1,
                       classes=classes, console=QUIET)
    assert res["primary_metric"] == "auroc" and res["data"]["train"]["class_counts"] == {"normal": 20,
                                                                                       "cardiomegaly": 10}
    assert res["per_fraction"]["1.0"]["auroc"]["mean"] == 1.0
    scratch = run_finetune(fake_model, split_manifest, split_manifest, split_manifest, None, fractions=(1.0,),
                           seeds=1, classes=classes, from_scratch=True, console=QUIET)
    assert scratch["from_scratch"] and scratch["per_fraction"]["1.0"]["auroc"]["n"] == 1


def test_without_a_validation_manifest_a_stratified_holdout_of_train_selects(fake_model: FakeModel,
                                                                            split_manifest: Path) -> None:
    res = run_finetune(fake_model, split_manifest, None, split_manifest, None, fractions=(1.0,), seeds=1,
                       mode="linear", holdout=0.2, console=QUIET)
    data = res["data"]
    assert data["val"]["n"] == 6 and data["train"]["n"] == 24  # 2 of each class's 10 held out, 8 kept
    assert data["val"]["class_counts"] == {c: 2 for c in CLASSES} and "0.2 of train" in data["val"]["path"]
    assert res["runs"][0]["n_train"] == 24 and data["test"]["n"] == 12
    with pytest.raises(ValueError, match="holdout"):
        run_finetune(fake_model, split_manifest, None, split_manifest, None, holdout=1.0, console=QUIET)


def test_full_finetuning_runs_and_learns(fake_model: FakeModel, split_manifest: Path) -> None:
    before = fake_model.proj.weight.detach().clone()
    res = run_finetune(fake_model, split_manifest, split_manifest, split_manifest, None, fractions=(1.0,), seeds=1,
                       mode="full", epochs=3, lr=0.05, batch_size=8, console=QUIET)
    run = res["runs"][0]
    assert len(run["history"]) == 3 and run["history"][-1]["train_loss"] < run["history"][0]["train_loss"]
    assert res["per_fraction"]["1.0"]["accuracy"]["mean"] >= 0.5
    assert np.allclose(before, fake_model.proj.weight.detach())  # the caller's model is left untouched


def test_split_rules(split_manifest: Path, band_manifest: Path) -> None:
    records, _ = load_split(split_manifest, "val")
    assert {r.split for r in records} == {"val"} and len(records) == 12
    whole, _ = load_split(band_manifest, "train")  # a single-split manifest is used whole
    assert len(whole) == 12
    assert infer_classes(records) == ["atelectasis", "cardiomegaly", "edema"]


# ------------------------------------------------------------------------------------ report generation


def test_report_evaluation(fake_model: FakeModel, band_manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "rep"
    res = run_report(fake_model, band_manifest, out, meteor=False, batch_size=5, console=QUIET)
    assert fake_model.last_generate_kwargs["num_beams"] == 3
    assert fake_model.last_generate_kwargs["max_length"] == 95
    assert fake_model.last_generate_kwargs["no_repeat_ngram_size"] == 3
    assert res["n"] == 12
    assert res["nlg"]["BLEU_4"] == pytest.approx(1.0, abs=1e-6) and res["nlg"]["ROUGE_L"] == pytest.approx(1.0)
    ce = res["clinical_efficacy"]
    assert ce["micro"]["f1"] == 1.0 and ce["per_finding"]["edema"]["support"] == 4
    # findings that neither side mentions are left out of the macro mean
    assert ce["macro"]["f1"] == 1.0 and "consolidation" not in ce["macro_findings"]
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 12 and preds[0]["generated"] == REPORTS[CLASSES[0]]


# ------------------------------------------------------------------------------------------- ablation


def test_ablation_config_masks_objectives() -> None:
    base = load_config("tiny")
    cfg = ablation_config(base, parse_objectives("itc+itm"), seed=2, steps=7)
    assert (cfg.losses.itc, cfg.losses.itm, cfg.losses.itg, cfg.losses.tig) == (1.0, 1.0, 0.0, 0.0)
    assert cfg.train.seed == 2 and cfg.train.max_steps == 7
    assert base.losses.itg == 1.0  # the base config is not modified
    assert parse_objectives("all") == ["itc", "itm", "itg", "tig"]
    with pytest.raises(ValueError, match="objective set"):
        parse_objectives("itc+foo")


def test_ablation_trains_each_set_and_seed(split_manifest: Path, prompt_file: Path, tmp_path: Path) -> None:
    calls = []

    def fake_train(config, data, out, max_steps=None, resume=False):
        calls.append((config.losses.enabled(), config.train.seed, max_steps, Path(out)))
        Path(out).mkdir(parents=True, exist_ok=True)

    console = Console(record=True, width=200)
    study = StudySettings(seeds=2, steps=5, prompts=prompt_file, train_fn=fake_train,
                          load_fn=lambda run_dir: FakeModel().eval())
    res = run_ablation("tiny", split_manifest, tmp_path / "abl", objectives=["itc", "itc+itm+tig"], fractions=(1.0,),
                       study=study, console=console)
    assert [(c[0], c[1], c[2]) for c in calls] == [
        (["itc"], 0, 5), (["itc"], 1, 5), (["itc", "itm", "tig"], 0, 5), (["itc", "itm", "tig"], 1, 5)]
    assert calls[0][3] == tmp_path / "abl" / "itc" / "seed0"
    row = res["summary"]["itc+itm+tig"]
    assert row["i2t_p@1"]["mean"] == 1.0 and row["i2t_p@1"]["n"] == 2
    assert row["zs_acc"]["mean"] == 1.0 and row["lp_100%_accuracy"]["mean"] == 1.0
    assert (tmp_path / "abl" / "results.json").exists()
    table = console.export_text()
    assert "itc+itm+tig" in table and "100.0±0.0" in table and "T2I P@10" in table and "LP 100% accuracy" in table


def test_reference_round_trip_gives_references_the_decoders_spacing() -> None:
    from types import SimpleNamespace

    from medunifier.data.tokenizer import load_tokenizer
    from medunifier.eval.metrics import nlg_metrics
    from medunifier.eval.report import tokenizer_round_trip

    tok = load_tokenizer("minilm")
    model = SimpleNamespace(tokenizer=tok, tokenize=lambda texts: tok(texts, padding=True, return_tensors="pt"))
    ref = "FINDINGS: Left-sided PICC, tip in the SVC. Heart size 2.5 cm."
    generated = tok.decode(tok(ref)["input_ids"], skip_special_tokens=True)  # a model that copies the reference
    assert generated != ref.lower()  # "left - sided", "2. 5": WordPiece decoding spaces differ from the raw text
    raw = nlg_metrics([ref], [generated], meteor=False)
    trip = nlg_metrics(tokenizer_round_trip(model, [ref]), [generated], meteor=False)
    assert trip["BLEU_4"] == pytest.approx(1.0, abs=1e-6) and raw["BLEU_4"] < 0.9


def test_ablation_never_evaluates_on_its_training_data(prompt_file: Path, tmp_path: Path) -> None:
    train_only = make_band_manifest(tmp_path / "t", per_class=0, splits={"train": 2})
    study = StudySettings(seeds=1, steps=1, prompts=prompt_file, train_fn=lambda *a, **k: None,
                          load_fn=lambda run_dir: FakeModel())
    with pytest.raises(ValueError, match="no test split"):
        run_ablation("tiny", train_only, tmp_path / "a", objectives=["itc"], study=study, console=QUIET)
    # train + test but no val: retrieval and zero-shot run, the linear probe is left out with a note
    no_val = make_band_manifest(tmp_path / "n", per_class=0, splits={"train": 2, "test": 2})
    res = run_ablation("tiny", no_val, tmp_path / "b", objectives=["itc"], study=study, console=QUIET)
    assert "lp_100%_accuracy" not in res["summary"]["itc"] and "linear probe left out" in res["notes"][0]
    assert res["summary"]["itc"]["zs_acc"]["mean"] == 1.0


def test_figure_formats_reals_and_keeps_counts_and_missing_values() -> None:
    import numpy as np

    from medunifier.eval.common import figure

    assert figure(None) == "-" and figure(3) == "3" and figure(np.int64(7)) == "7"
    assert figure(0.12345) == "0.123" and figure(np.float32(2.5), 2) == "2.50" and figure("cnn") == "cnn"


def test_finish_run_notes_the_checkpoint_writes_only_with_an_out_folder_and_prints(tmp_path) -> None:
    import json

    from rich.console import Console

    from medunifier.eval.common import finish_run

    printed: list[dict] = []
    results = finish_run({"score": 0.5}, tmp_path / "run", None, lambda r, c: printed.append(dict(r)), Console())
    assert results == {"score": 0.5, "ckpt": str(tmp_path / "run")} and printed == [results]
    assert not (tmp_path / "results.json").exists()
    finish_run({"score": 0.25}, "run", tmp_path, lambda r, c: None, Console())
    assert json.loads((tmp_path / "results.json").read_text()) == {"score": 0.25, "ckpt": "run"}
