"""`medunifier eval experts`: shared vs task-routed experts with the same budget and seeds.

With fakes: the variants' configs differ in `encoder.experts` only, every variant sees the same seeds,
results.json and the table. With small real models: why the VQA run needs TIG, the VQA run, the generation
metrics, and the CLI end to end on a tiny SynthCXR set with the real trainer.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from eval_fakes import CLASSES, FakeModel, band_image
from rich.console import Console
from typer.testing import CliRunner

from medunifier.cli import app
from medunifier.config import LossWeights, load_config
from medunifier.data.images import save_png
from medunifier.data.manifest import write_manifest
from medunifier.eval.ablation import StudySettings
from medunifier.eval.experts import (
    experts_config,
    paired_differences,
    resolve_eval_data,
    run_experts_ablation,
    step_seconds,
)
from shrunk_config import SMALL_MODEL

SMALL = [*SMALL_MODEL, "generator.adapter_blocks=1", "train.batch_size=8", "train.log_every=1"]
QUIET = Console(quiet=True)


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def changed_keys(a: dict, b: dict) -> set[str]:
    fa, fb = flat(a), flat(b)
    return {k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k)}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 120-word vocabulary: the small models' embeddings and LM head stay tiny (fast save / load)."""
    from medunifier.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    texts = ["Mild bibasilar atelectasis. No pleural effusion. Mild cardiomegaly. No pneumothorax. Moderate "
             "pulmonary edema. No focal consolidation. Is the top band bright? yes no which band top middle bottom"]
    train_tokenizer(texts * 20, out, vocab_size=120, min_frequency=1)
    return out


# ----------------------------------------------------------------------------------------- configs


def test_experts_config_changes_the_experts_and_nothing_else() -> None:
    base = load_config("tiny", SMALL)
    shared = experts_config(base, "shared", seed=3, steps=7, prior_steps=5)
    task = experts_config(base, "task", seed=3, steps=7, prior_steps=5)
    assert changed_keys(shared.to_dict(), task.to_dict()) == {"encoder.experts"}
    assert (shared.encoder.experts, task.encoder.experts) == ("shared", "task")
    for cfg in (shared, task):
        assert cfg.train.seed == 3 and cfg.train.max_steps == 7 and cfg.losses.enabled() == ["itc", "itm", "itg", "tig"]
        assert cfg.prior.seed == 3 and cfg.prior.max_steps == 5 and not cfg.prior.in_pretrain
    assert base.encoder.experts == "shared" and base.train.seed == 0  # the base is not modified
    # objective masking as in the objective ablation (the VQA run)
    vqa = experts_config(base, "task", seed=0, steps=2, objectives=["itg", "tig"])
    assert (vqa.losses.itc, vqa.losses.itm, vqa.losses.itg, vqa.losses.tig) == (0.0, 0.0, 1.0, 1.0)
    # a base with expert attention: the shared variant must drop it (it needs task experts)
    attn = load_config("tiny", [*SMALL, "encoder.experts=task", "encoder.expert_attention=true"])
    diff = changed_keys(experts_config(attn, "shared", 0, 2).to_dict(), experts_config(attn, "task", 0, 2).to_dict())
    assert diff == {"encoder.experts", "encoder.expert_attention"}
    with pytest.raises(ValueError, match="expert variant"):
        experts_config(base, "moe", 0, 2)


def test_eval_data_prefers_the_5x200_set_and_never_the_training_data(split_manifest: Path, tmp_path: Path) -> None:
    assert resolve_eval_data(split_manifest, None) == (split_manifest, "test")
    other = tmp_path / "other.jsonl"
    assert resolve_eval_data(split_manifest, other) == (other, None)
    beside = split_manifest.parent / "manifest_5x200.jsonl"
    beside.write_text(split_manifest.read_text())
    assert resolve_eval_data(split_manifest, None) == (beside, None)
    train_only = tmp_path / "t" / "m.jsonl"
    write_manifest([{"id": "a", "image": "a.png", "text": "x", "split": "train"}], train_only)
    with pytest.raises(ValueError, match="no test split"):
        resolve_eval_data(train_only, None)


def test_step_seconds_prefers_the_trainers_throughput() -> None:
    cfg = load_config("tiny", [*SMALL, "train.grad_accum=2"])  # 16 samples per optimiser step
    t = step_seconds(SimpleNamespace(samples_per_s=32.0), cfg, wall_s=10.0, steps=4)
    assert t["s_per_step"] == pytest.approx(0.5) and t["s_per_step_source"] == "trainer"
    t = step_seconds(None, cfg, wall_s=10.0, steps=4)
    assert t["s_per_step"] == pytest.approx(2.5) and t["s_per_step_source"] == "wall"


# --------------------------------------------------------------------------------- runner with fakes


class ReportingFake(FakeModel):
    def __init__(self, experts: str) -> None:
        super().__init__()
        self.experts = experts

    def parameter_report(self) -> dict[str, int]:
        gen = 500_000 if self.experts == "task" else 0
        return {"total": 2_000_000 + gen, "trainable": 2_000_000 + gen, "encoder": 1_000_000 + gen,
                "encoder.understand_experts": 500_000, "encoder.generate_experts": gen}


def test_runner_trains_each_variant_with_the_same_seeds_and_budget(split_manifest: Path, prompt_file: Path,
                                                                   tmp_path: Path) -> None:
    trained: list[dict] = []
    generated: list[tuple] = []

    def fake_train(config, data, out, max_steps=None, resume=False):
        trained.append({"config": config.to_dict(), "data": Path(data), "out": Path(out), "max_steps": max_steps})
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "experts.txt").write_text(config.encoder.experts)
        return SimpleNamespace(samples_per_s=16.0 if config.encoder.experts == "shared" else 8.0)

    def fake_generation(run_dir, model, data, *, seed, prior_steps, n_generated, **kwargs):
        generated.append((Path(run_dir), seed, prior_steps, n_generated))
        task = model.experts == "task"
        return {"consistency": 0.4 + 0.1 * task + 0.01 * seed, "fid": 50.0 - 5 * task + seed, "fid_domain": 1.0}

    console = Console(record=True, width=250)
    out = tmp_path / "exp"
    study = StudySettings(seeds=[4, 7], steps=3, prompts=prompt_file, overrides=SMALL, train_fn=fake_train,
                          load_fn=lambda run_dir: ReportingFake((run_dir / "experts.txt").read_text()))
    res = run_experts_ablation("tiny", split_manifest, out=out, prior_steps=2, n_generated=10, study=study,
                               generation_fn=fake_generation, console=console)
    # same steps and seeds for both variants, in variant-major order
    assert [(t["config"]["encoder"]["experts"], t["config"]["train"]["seed"], t["max_steps"]) for t in trained] == [
        ("shared", 4, 3), ("shared", 7, 3), ("task", 4, 3), ("task", 7, 3)]
    assert [t["out"] for t in trained][:2] == [out / "shared" / "seed4", out / "shared" / "seed7"]
    assert all(t["data"] == split_manifest for t in trained)
    # the resolved configs of one seed differ in the experts only; other seeds differ in the seeds only
    assert changed_keys(trained[0]["config"], trained[2]["config"]) == {"encoder.experts"}
    assert changed_keys(trained[1]["config"], trained[3]["config"]) == {"encoder.experts"}
    assert changed_keys(trained[0]["config"], trained[1]["config"]) == {"train.seed", "prior.seed"}
    assert res["config_differences"] == {"encoder.experts": {"shared": "shared", "task": "task"}}
    assert [(g[1], g[2], g[3]) for g in generated] == [(4, 2, 10), (7, 2, 10)] * 2

    saved = json.loads((out / "results.json").read_text())
    assert {"task", "config", "data", "eval_data", "steps", "seeds", "variants", "config_differences", "summary",
            "paired_difference", "runs", "notes", "synthesis", "vqa_data"} <= set(saved)
    assert saved["seeds"] == [4, 7] and saved["variants"] == ["shared", "task"] and saved["vqa_data"] is None
    shared, task = saved["summary"]["shared"], saved["summary"]["task"]
    assert shared["i2t_p@1"]["mean"] == 1.0 and shared["zs_acc"]["n"] == 2  # the fake model is perfect
    assert shared["s_per_step"]["mean"] == pytest.approx(0.5) and task["s_per_step"]["mean"] == pytest.approx(1.0)
    assert shared["params_enc_generate_experts"]["mean"] == 0 and task["params_total"]["mean"] == 2_500_000
    assert task["consistency"]["mean"] == pytest.approx(0.555) and task["consistency"]["std"] > 0
    diff = saved["paired_difference"]
    assert diff["consistency"]["mean"] == pytest.approx(0.1) and diff["consistency"]["std"] == pytest.approx(0.0)
    assert diff["fid"]["mean"] == pytest.approx(-5.0) and diff["params_total"]["mean"] == 500_000
    assert "vqa_overall" not in shared and len(saved["runs"]["task"]) == 2

    table = console.export_text()
    for text in ("shared vs task experts: understanding", "shared vs task experts: generation and cost",
                 "I2T P@1", "ZS acc", "consist. %", "FID", "params", "s/step",
                 "task - shared", "2.00M", "2.50M", "+0.50M", "55.5±2.1", "+10.0±0.0", "-5.0±0.0", "100.0±0.0"):
        assert text in table, text
    assert "VQA" not in table


def test_runner_rejects_bad_settings(split_manifest: Path, prompt_file: Path, tmp_path: Path) -> None:
    settings = dict(prompts=prompt_file, overrides=SMALL, train_fn=lambda *a, **k: None,
                    load_fn=lambda run_dir: FakeModel())
    kw = dict(out=tmp_path / "x", study=StudySettings(**settings), console=QUIET)
    with pytest.raises(ValueError, match="variants"):
        run_experts_ablation("tiny", split_manifest, variants=["shared", "shared"], **kw)
    with pytest.raises(ValueError, match="variants"):
        run_experts_ablation("tiny", split_manifest, variants=["moe"], **kw)
    with pytest.raises(ValueError, match=r"StudySettings\.steps must be >= 1"):
        StudySettings(steps=0, **settings)
    with pytest.raises(ValueError, match="prior_steps"):
        run_experts_ablation("tiny", split_manifest, prior_steps=0, **kw)
    with pytest.raises(ValueError, match="objective set"):
        run_experts_ablation("tiny", split_manifest, vqa_data=split_manifest, vqa_objectives=["vqa"], **kw)


def test_paired_difference_uses_the_seeds_both_variants_ran() -> None:
    runs = {"shared": [{"seed": 0, "metrics": {"a": 1.0}}, {"seed": 1, "metrics": {"a": 2.0}}],
            "task": [{"seed": 1, "metrics": {"a": 5.0}}, {"seed": 2, "metrics": {"a": 9.0}}]}
    d = paired_differences(runs)
    assert d["a"]["n"] == 1 and d["a"]["mean"] == 3.0


# ----------------------------------------------------------------------------------- small real models


def test_itg_alone_cannot_tell_the_variants_apart_tig_can(tokenizer_dir: Path) -> None:
    """Why the VQA run trains TIG as well: with ITG only the task model's generation experts never get a
    gradient and both variants compute the same loss and the same gradients from the same init."""
    from medunifier.model.medunifier import MedUnifier

    models = {}
    for experts in ("shared", "task"):
        torch.manual_seed(0)
        models[experts] = MedUnifier(load_config("tiny", [*SMALL, "encoder.dropout=0.0", f"encoder.experts={experts}",
                                                          f"text.tokenizer={tokenizer_dir}"]))
    batch = models["shared"].tokenize(["Is the top band bright? yes", "Which band is bright? top"])
    batch["pixel_values"] = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    batch["ids"] = ["a", "b"]

    def grads(experts: str, weights: LossWeights) -> tuple[float, torch.Tensor]:
        model = models[experts]
        model.zero_grad(set_to_none=True)
        torch.manual_seed(2)
        out = model(batch, loss_weights=weights)
        out.loss.backward()
        return float(out.loss.detach()), model.encoder.layers[0].text_ffn.up.weight.grad.clone()

    itg = LossWeights(itc=0, itm=0, itg=1, tig=0)
    (loss_s, grad_s), (loss_t, grad_t) = grads("shared", itg), grads("task", itg)
    assert loss_s == loss_t and torch.equal(grad_s, grad_t)
    both = LossWeights(itc=0, itm=0, itg=1, tig=1)
    (_, grad_s), (_, grad_t) = grads("shared", both), grads("task", both)
    assert float((grad_s - grad_t).abs().max()) > 1e-6  # the shared feed-forward also carries TIG's gradient


@pytest.fixture
def band_vqa_manifest(tmp_path: Path) -> Path:
    """Band images with closed (yes/no) and open (which band) questions: 6 train and 6 val images."""
    rng = np.random.default_rng(1)
    records = []
    for split, count in (("train", 2), ("val", 2)):
        for c, name in enumerate(CLASSES):
            for i in range(count):
                rid = f"{split}-{name}-{i}"
                save_png(band_image(c, rng), tmp_path / "vqa" / "images" / f"{rid}.png")
                common = {"image": f"images/{rid}.png", "split": split, "task": "vqa", "modality": "cxr"}
                records.append({"id": f"{rid}-c", "question": "Is the top band bright?",
                                "answer": "yes" if c == 0 else "no", "answer_type": "CLOSED", **common})
                records.append({"id": f"{rid}-o", "question": "Which band is bright?",
                                "answer": ("top", "middle", "bottom")[c], "answer_type": "OPEN", **common})
    path = tmp_path / "vqa" / "manifest.jsonl"
    write_manifest(records, path)
    return path


def test_vqa_run_per_variant_and_seed_with_itg_and_tig(band_manifest: Path, band_vqa_manifest: Path,
                                                       prompt_file: Path, tokenizer_dir: Path,
                                                       tmp_path: Path) -> None:
    """Orchestration of the VQA run with real small (untrained) models: what it trains on, with which
    objectives, and that run_vqa scores its val split."""
    from medunifier.model.medunifier import MedUnifier

    trained = []

    def save_untrained(config, data, out, max_steps=None, resume=False):
        trained.append((config.encoder.experts, config.losses.enabled(), Path(data), Path(out).name))
        torch.manual_seed(config.train.seed)
        MedUnifier(config).save_pretrained(Path(out) / "model")

    console = Console(record=True, width=250)
    out = tmp_path / "exp"
    study = StudySettings(seeds=1, steps=2, prompts=prompt_file, device="cpu", train_fn=save_untrained,
                          overrides=[*SMALL, f"text.tokenizer={tokenizer_dir}"])
    res = run_experts_ablation("tiny", band_manifest, out=out, vqa_data=band_vqa_manifest, synthesis=False,
                               study=study, console=console)
    assert trained == [
        ("shared", ["itc", "itm", "itg", "tig"], band_manifest, "seed0"),
        ("shared", ["itg", "tig"], band_vqa_manifest, "seed0_vqa"),
        ("task", ["itc", "itm", "itg", "tig"], band_manifest, "seed0"),
        ("task", ["itg", "tig"], band_vqa_manifest, "seed0_vqa"),
    ]
    vqa = json.loads((out / "task" / "seed0_vqa" / "eval" / "vqa" / "results.json").read_text())
    assert vqa["n"] == 12 and vqa["split"] == "val" and vqa["metrics"]["n_closed"] == 6
    row = res["summary"]["task"]
    assert row["vqa_overall"]["mean"] == pytest.approx(vqa["metrics"]["accuracy"])
    assert 0 <= row["vqa_closed"]["mean"] <= 1 and row["vqa_s_per_step"]["n"] == 1
    assert res["vqa_objectives"] == ["itg", "tig"] and res["synthesis"] is None
    assert res["summary"]["shared"]["params_enc_generate_experts"]["mean"] == 0
    assert row["params_enc_generate_experts"]["mean"] == row["params_enc_understand_experts"]["mean"] > 0
    table = console.export_text()
    assert "VQA all" in table and "VQA closed" in table


def test_generation_metrics_on_a_small_real_run(tokenizer_dir: Path, tmp_path: Path) -> None:
    """Prior training + synthesis metrics on an untrained small model and a tiny SynthCXR set."""
    from medunifier.data.synthcxr import write_synthcxr
    from medunifier.eval.experts import evaluate_generation
    from medunifier.model.medunifier import MedUnifier

    write_synthcxr(tmp_path / "data", n=30, size=32, seed=0, workers=1, per_class_5x200=2)
    small_prior = ["prior.width=32", "prior.layers=1", "prior.heads=2", "prior.steps=2", "prior.batch_size=16"]
    cfg = experts_config(load_config("tiny", [*SMALL, *small_prior, f"text.tokenizer={tokenizer_dir}"]), "task",
                         seed=0, steps=1, prior_steps=2)
    torch.manual_seed(0)
    model = MedUnifier(cfg).eval()
    run = tmp_path / "run"
    model.save_pretrained(run / "model")
    m = evaluate_generation(run, model, tmp_path / "data" / "manifest.jsonl", seed=0, prior_steps=2,
                            n_generated=10, fid=False, device="cpu")
    prior = json.loads((run / "prior" / "prior.json").read_text())
    assert prior["step"] == 2 and prior["finished"]
    saved = json.loads((run / "eval" / "synthesis" / "results.json").read_text())
    assert m["n_generated"] == saved["fid"]["n"]["generated"] == 10  # 1 prompt per finding x 2 samples
    assert m["consistency"] == saved["consistency"]["macro"] and 0 <= m["consistency"] <= 1
    assert m["fid"] is None and m["fid_domain"] == pytest.approx(saved["fid"]["domain"]["generated"])
    assert m["fid_domain"] >= 0 and m["gen_s_per_image"] > 0 and 0 <= m["classifier_val_acc"] <= 1


def test_eval_experts_cli_end_to_end(tokenizer_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two real training runs (build, 2 steps of 4 samples, validate, save) and their evaluation: ~14 s."""
    from medunifier.data.synthcxr import write_synthcxr

    monkeypatch.setenv("MEDUNIFIER_NO_PROGRESS", "1")
    write_synthcxr(tmp_path / "data", n=24, size=32, seed=0, workers=1, per_class_5x200=2)
    out = tmp_path / "exp"
    r = CliRunner().invoke(app, ["eval", "experts", "--config", "tiny", "--data", str(tmp_path / "data" /
                                 "manifest.jsonl"), "--seeds", "1", "--steps", "2", "--no-synthesis", "--out",
                                 str(out), "--device", "cpu", *SMALL, "train.batch_size=4",
                                 f"text.tokenizer={tokenizer_dir}"])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["eval_data"].endswith("manifest_5x200.jsonl") and res["steps"] == 2 and res["seeds"] == [0]
    assert res["config_differences"] == {"encoder.experts": {"shared": "shared", "task": "task"}}
    for variant in ("shared", "task"):
        saved = json.loads((out / variant / "seed0" / "model" / "config.json").read_text())
        assert saved["encoder"]["experts"] == variant and saved["train"]["max_steps"] == 2
        row = res["summary"][variant]
        assert row["s_per_step"]["mean"] > 0 and 0 <= row["zs_acc"]["mean"] <= 1 and "consistency" not in row
    ret = json.loads((out / "task" / "seed0" / "eval" / "retrieval" / "results.json").read_text())
    assert ret["n"] == 10  # the 5x200 set beside the data: 2 per finding
    diff = res["paired_difference"]["params_total"]["mean"]
    assert diff == res["summary"]["task"]["params_enc_generate_experts"]["mean"] > 0
    assert "shared vs task experts" in r.output and "task - shared" in r.output

    bad = CliRunner().invoke(app, ["eval", "experts", "--data", str(tmp_path / "data" / "manifest.jsonl"),
                                   "--steps", "2", "--variants", "shared,moe", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "variants" in bad.output
