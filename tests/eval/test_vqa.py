"""VQA evaluation: answer normalisation, metrics worked by hand, candidate scoring against a slow reference,
padding-independent decoding in the training layout, and `medunifier eval vqa` / `medunifier ask` on real
VQA-RAD questions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from medunifier.cli import app
from medunifier.eval.vqa_answering import (
    _greedy_answers,
    answer_questions,
    image_pmi,
    rank_answers,
    score_candidates,
)
from medunifier.eval.vqa_scoring import (
    candidate_pool,
    closed_candidates,
    is_closed,
    normalize_answer,
    open_answer_pool,
    vqa_metrics,
)
from shrunk_config import SMALL_MODEL

runner = CliRunner()
SMALL = [*SMALL_MODEL, "encoder.dropout=0.0"]


# ----------------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize(("text", "expected"), [
    ("The Left  Lung.", "left lung"),
    ("Yes!", "yes"),
    ("Two", "2"),
    ("twenty-one", "20 1"),  # hyphen -> space, then each number word; not a compound-number parser
    ("patient's right", "patients right"),
    ("2.5 cm", "2.5 cm"),
    ("An MRI, T2-weighted", "mri t2 weighted"),
    ("x-ray", "x ray"),
    ("  ", ""),
    (None, ""),
])
def test_normalize_answer(text, expected) -> None:
    assert normalize_answer(text) == expected


def test_is_closed_uses_answer_type_then_yes_no() -> None:
    assert is_closed({"answer": "left", "answer_type": "CLOSED "})  # VQA-RAD has a few with a trailing space
    assert not is_closed({"answer": "yes", "answer_type": "OPEN"})  # the field wins over the answer
    assert is_closed({"answer": "No."}) and not is_closed({"answer": "left lung"})


def test_vqa_metrics_worked_by_hand() -> None:
    #  #  closed  reference          prediction               modality organ   correct  token recall (open)
    #  1  yes     "Yes"              "yes."                   ct       head    yes
    #  2  yes     "no"               "yes"                    ct       head    no
    #  3  yes     "left"             "Left"                   cxr      chest   yes
    #  4  no      "the left lung"    "left lung"              ct       -       yes      2/2 = 1
    #  5  no      "two nodules"      "2 masses"               cxr      chest   no       {2} of {2, nodules} = 1/2
    #  6  no      "pleural effusion" "effusion on the right"  cxr      chest   no       {effusion} = 1/2
    # overall 3/6; closed 2/3; open 1/3; open recall (1 + 1/2 + 1/2) / 3 = 2/3
    # ct  (1, 2, 4): accuracy 2/3, closed 1/2, open 1/1, recall 1
    # cxr (3, 5, 6): accuracy 1/3, closed 1/1, open 0/2, recall (1/2 + 1/2) / 2 = 1/2
    # organ head (1, 2): 1/2, closed 1/2, no open; chest = cxr; unknown (4): open 1/1
    preds = ["yes.", "yes", "Left", "left lung", "2 masses", "effusion on the right"]
    refs = ["Yes", "no", "left", "the left lung", "two nodules", "pleural effusion"]
    closed = [True, True, True, False, False, False]
    groups = {"modality": ["ct", "ct", "cxr", "ct", "cxr", "cxr"], "organ": ["head", "head", "chest", None, "chest", "chest"]}
    m = vqa_metrics(preds, refs, closed, groups)
    assert (m["n"], m["n_closed"], m["n_open"]) == (6, 3, 3)
    assert m["accuracy"] == pytest.approx(3 / 6) and m["closed_accuracy"] == pytest.approx(2 / 3)
    assert m["open_accuracy"] == pytest.approx(1 / 3) and m["open_token_recall"] == pytest.approx(2 / 3)
    ct, cxr = m["groups"]["modality"]["ct"], m["groups"]["modality"]["cxr"]
    assert (ct["n"], ct["accuracy"], ct["closed_accuracy"], ct["open_accuracy"], ct["open_token_recall"]) == \
        (3, pytest.approx(2 / 3), 0.5, 1.0, 1.0)
    assert (cxr["n"], cxr["accuracy"], cxr["closed_accuracy"], cxr["open_accuracy"], cxr["open_token_recall"]) == \
        (3, pytest.approx(1 / 3), 1.0, 0.0, 0.5)
    organ = m["groups"]["organ"]
    assert set(organ) == {"head", "chest", "unknown"}
    assert organ["head"]["closed_accuracy"] == 0.5 and organ["head"]["open_accuracy"] is None
    assert organ["unknown"]["n_open"] == 1 and organ["unknown"]["open_accuracy"] == 1.0
    assert organ["chest"] == cxr
    with pytest.raises(ValueError, match="closed flags"):
        vqa_metrics(preds, refs, closed[:5])


def test_closed_candidates_rule() -> None:
    train = [
        {"answer": "Left", "answer_type": "CLOSED", "question_type": "POS"},
        {"answer": "right", "answer_type": "CLOSED", "question_type": "POS"},
        {"answer": "left side", "answer_type": "CLOSED", "question_type": "POS"},
        {"answer": "CT", "answer_type": "CLOSED", "question_type": "MODALITY"},
        {"answer": "MRI", "answer_type": "CLOSED", "question_type": "MODALITY"},
        {"answer": "yes", "answer_type": "CLOSED", "question_type": "PRES"},
        {"answer": "lung", "answer_type": "OPEN", "question_type": "ORGAN"},  # open answers are not options
    ]
    pool = candidate_pool(train)
    assert pool["POS"] == ["left", "left side", "right"] and "lung" not in pool["*"]
    # a choice question: the named options ("left" inside "left side" is dropped)
    assert closed_candidates("Is the mass on the left side or right?", "POS", pool) == ["left side", "right"]
    # options of another question type are found through the pool of all closed answers
    assert closed_candidates("Is this a CT or an MRI?", "PLANE", pool) == ["ct", "mri"]
    # no "or", or fewer than two options named: yes/no
    assert closed_candidates("Is the mass on the left?", "POS", pool) == ["yes", "no"]
    assert closed_candidates("Is there fluid or air?", "PRES", pool) == ["yes", "no"]
    assert closed_candidates("Is this a CT or an MRI?", None, None) == ["yes", "no"]


# ------------------------------------------------------------------------------------- a small model


@pytest.fixture(scope="module")
def model():
    from medunifier.config import load_config
    from medunifier.model.medunifier import MedUnifier

    torch.manual_seed(0)
    m = MedUnifier(load_config("tiny", SMALL)).eval()
    with torch.no_grad():  # a random LM bias makes candidate scores differ clearly (not a near-uniform tie)
        m.encoder.lm_head.bias.normal_(0.0, 2.0, generator=torch.Generator().manual_seed(1))
    return m


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(2))


def slow_candidate_logprob(model, pixel_values, question: str, answer: str, **encoder_kwargs) -> float:
    """Sum of log p over the answer tokens and the closing [SEP] of "[DEC] q [SEP] a [SEP]", one unpadded pass."""
    tok, sp = model.tokenizer, model.special
    q = tok(question, add_special_tokens=False)["input_ids"]
    a = tok(answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[sp["dec"], *q, sp["sep"], *a, sp["sep"]]])
    prefix = len(q) + 2
    out = model.encoder(input_ids=ids, image_embeds=model.image_features(pixel_values), mode="prefix",
                        prefix_lengths=torch.tensor([prefix]), **encoder_kwargs)
    logp = F.log_softmax(model.encoder.lm_logits(out.text_states[0]).float(), dim=-1)  # [T, V]
    return float(sum(logp[t - 1, ids[0, t]] for t in range(prefix, ids.shape[1])))


@torch.no_grad()
def test_likelihood_scoring_matches_a_slow_per_candidate_loop(model, pixels) -> None:
    questions = ["Is there a pleural effusion?", "Where is the lesion located in this abdominal CT scan?"]
    candidates = [["yes", "no"], ["left kidney", "liver", "both sides of the abdomen"]]
    scores = score_candidates(model, pixels, questions, candidates, batch_size=3)  # chunks split the pairs
    slow = [[slow_candidate_logprob(model, pixels[i : i + 1], q, a) for a in candidates[i]]
            for i, q in enumerate(questions)]
    for got, want in zip(scores, slow):
        assert got == pytest.approx(want, abs=1e-4)
    best = [opts[max(range(len(opts)), key=s.__getitem__)] for opts, s in zip(candidates, slow)]
    assert answer_questions(model, pixels, questions, candidates) == best
    assert len({round(s, 3) for s in slow[1]}) == 3  # the choice was not a tie


@torch.no_grad()
def test_image_pmi_subtracts_the_mean_likelihood_over_the_reference_images(model, pixels) -> None:
    """score - log mean_k p(a | q, I_k), worked by hand from the slow per-candidate loop; the calibrated answer
    can differ from the raw one; the question's own image as the only reference leaves nothing (all zeros)."""
    questions = ["Is there a pleural effusion?", "Is the heart enlarged?"]
    candidates = [["yes", "no"], ["yes", "no", "maybe not"]]
    refs = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    ref_embeds = model.image_features(refs)
    raw = score_candidates(model, pixels, questions, candidates)
    calibrated = image_pmi(model, raw, questions, candidates, ref_embeds)
    for i, q in enumerate(questions):
        for j, a in enumerate(candidates[i]):
            per_ref = torch.tensor([slow_candidate_logprob(model, refs[k : k + 1], q, a) for k in range(3)],
                                   dtype=torch.float64)
            want = raw[i][j] - (torch.logsumexp(per_ref, 0) - torch.log(torch.tensor(3.0, dtype=torch.float64)))
            assert calibrated[i][j] == pytest.approx(float(want), abs=1e-4)
    own = image_pmi(model, raw[:1], questions[:1], candidates[:1], model.image_features(pixels[:1]))
    assert own[0] == pytest.approx([0.0, 0.0], abs=1e-4)
    answers = answer_questions(model, pixels, questions, candidates, reference_embeds=ref_embeds)
    assert answers == [opts[max(range(len(opts)), key=c.__getitem__)] for opts, c in zip(candidates, calibrated)]
    with pytest.raises(ValueError, match="reference_embeds"):
        image_pmi(model, raw, questions, candidates, ref_embeds[0])


@torch.no_grad()
def test_models_with_modality_embeddings_score_with_the_record_modality(model, pixels) -> None:
    from medunifier.config import EncoderConfig, load_config
    from medunifier.model.medunifier import MedUnifier

    if "modalities" not in EncoderConfig.model_fields:
        pytest.skip("this encoder has no modality embeddings")
    torch.manual_seed(0)
    m = MedUnifier(load_config("tiny", [*SMALL, "encoder.modalities=[cxr,ct]"]), tokenizer=model.tokenizer).eval()
    m.encoder.modality_embeddings.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(3))
    question, options = "Is there a mass?", ["yes", "no"]
    with_ct = score_candidates(m, pixels[:1], [question], [options], modalities=["CT"])[0]
    slow = [slow_candidate_logprob(m, pixels[:1], question, a, modality_ids=m.modality_ids(["ct"])) for a in options]
    assert with_ct == pytest.approx(slow, abs=1e-4)
    unknown = score_candidates(m, pixels[:1], [question], [options])[0]
    assert abs(unknown[0] - with_ct[0]) > 1e-3  # the modality reached the encoder
    # greedy decoding with the modality is padding-independent too
    alone = answer_questions(m, pixels[:1], [question], max_length=4, modalities=["ct"])
    batched = answer_questions(m, pixels, [question, "What is the long question here about?"], max_length=4,
                               modalities=["ct", "cxr"])
    assert batched[0] == alone[0]


@torch.no_grad()
def test_open_answers_do_not_depend_on_padding_or_batch(model, pixels) -> None:
    short, long = "Is it normal?", "Which organ system is shown here and what is the imaging modality used?"
    alone = answer_questions(model, pixels[:1], [short], max_length=6)
    batched = answer_questions(model, pixels, [short, long], max_length=6)
    assert batched[0] == alone[0] and alone[0]
    assert answer_questions(model, pixels[1:], [long], max_length=6)[0] == batched[1]
    beams_alone = answer_questions(model, pixels[:1], [short], max_length=6, num_beams=2)
    assert answer_questions(model, pixels, [short, long], max_length=6, num_beams=2)[0] == beams_alone[0]


@torch.no_grad()
def test_greedy_answer_is_the_argmax_of_the_training_layout(model, pixels) -> None:
    """Decoding with the cache after "[DEC] q [SEP]" equals the argmax of one teacher-forced pass over
    "[DEC] q [SEP] answer", the sequence the ITG loss trains on."""
    question = "What is abnormal in the left upper lobe?"
    tokens = _greedy_answers(model, model.image_features(pixels[:1]), [question], max_length=5)[0]
    assert len(tokens) >= 2
    sp = model.special
    q = model.tokenizer(question, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[sp["dec"], *q, sp["sep"], *tokens]])
    prefix = len(q) + 2
    out = model.encoder(input_ids=ids, image_embeds=model.image_features(pixels[:1]), mode="prefix",
                        prefix_lengths=torch.tensor([prefix]))
    logits = model.encoder.lm_logits(out.text_states[0, prefix - 1 : -1]).float()
    logits[:, [sp["dec"], sp["pad"]]] = -float("inf")
    assert logits.argmax(-1).tolist() == tokens


@torch.no_grad()
def test_generate_report_with_questions_continues_the_training_layout(model, pixels) -> None:
    """generate_report after Processor.question_prefixes and beam search decode after the left-padded
    "[DEC] q [SEP]" prefix, so with one beam they give exactly the cached greedy answer of the training layout,
    padding or not."""
    from medunifier.data.processor import Processor

    questions = ["What is abnormal in the left upper lobe?", "Is it normal?"]
    expected = _greedy_answers(model, model.image_features(pixels), questions, max_length=5)
    assert all(len(t) >= 2 for t in expected)
    decoded = [model.tokenizer.decode(t, skip_special_tokens=True) for t in expected]
    processor = Processor.from_config(model.config, model.tokenizer)
    ids, mask = processor.question_prefixes(questions)
    assert model.generate_report(pixels, num_beams=1, max_length=5, prefix_ids=ids, prefix_mask=mask) == decoded
    one_ids, one_mask = processor(questions=questions[1:]).values()
    assert model.generate_report(pixels[1:], num_beams=1, max_length=5, prefix_ids=one_ids,
                                 prefix_mask=one_mask) == decoded[1:]
    assert mask[:, -1].all() and not mask[1, 0]  # left-padded: the shorter question starts later
    assert ids[0, 0] == model.special["dec"] and ids[0, -1] == model.special["sep"]
    from medunifier.model.decoding import DecodeOptions, generate

    with pytest.raises(ValueError, match="left-padded"):
        generate(model.encoder, model.image_features(pixels), bos_id=model.special["dec"],
                 eos_id=model.special["sep"], pad_id=model.special["pad"], options=DecodeOptions(max_length=3),
                 prefix_ids=ids.flip(1), prefix_mask=mask.flip(1), continue_prefix=True)


def test_open_answer_pool_keeps_one_spelling_per_answer_most_frequent_first() -> None:
    records = [{"answer": a, "answer_type": t} for a, t in [
        ("Left kidney", "OPEN"), ("left kidney.", "OPEN"), ("left kidney.", "OPEN"), ("Liver", "OPEN"),
        ("yes", "CLOSED"), ("", "OPEN"), ("The liver", "OPEN"), ("axial", "OPEN"), ("liver", "OPEN")]]
    assert open_answer_pool(records) == ["left kidney.", "Liver", "axial"]  # closed and empty answers left out


@torch.no_grad()
def test_ranked_open_answers_match_full_scoring_of_the_pool(model, pixels) -> None:
    """The cached ranking gives each candidate the total log-likelihood of one teacher-forced pass
    (`score_candidates`), whatever the padding; a shortlist of 2 keeps the 2 likeliest first tokens."""
    questions = ["Where is the lesion located in this abdominal CT scan?", "Which organ is shown?"]
    pool = ["left kidney", "liver", "both sides of the abdomen", "right lower lobe of the lung", "axial"]
    image_embeds = model.image_features(pixels)
    answers, best = rank_answers(model, image_embeds, questions, pool, top_k=None, batch_size=3)
    full = score_candidates(model, pixels, questions, [pool, pool])
    for got, score, want in zip(answers, best, full):
        assert got == pool[max(range(len(pool)), key=want.__getitem__)]
        assert score == pytest.approx(max(want), abs=1e-4)
    alone, _ = rank_answers(model, image_embeds[1:], questions[1:], pool, top_k=None)
    assert alone[0] == answers[1]
    assert answer_questions(model, pixels, questions, open_pool=pool, top_k=None) == answers

    # the shortlist: first-token log-likelihoods decide which candidates are scored in full
    prefix = torch.tensor([[model.special["dec"], *model.tokenizer(questions[0], add_special_tokens=False)["input_ids"],
                            model.special["sep"]]])
    first = model.encoder.lm_logits(model.encoder(input_ids=prefix, image_embeds=image_embeds[:1], mode="prefix",
                                                  prefix_lengths=torch.tensor([prefix.shape[1]])).text_states[0, -1])
    first_ids = [model.tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in pool]
    kept = sorted(range(len(pool)), key=lambda a: -float(first[first_ids[a]]))[:2]
    short, _ = rank_answers(model, image_embeds[:1], questions[:1], pool, top_k=2)
    assert short[0] == pool[max(kept, key=full[0].__getitem__)]
    with pytest.raises(ValueError, match="top_k"):
        rank_answers(model, image_embeds, questions, pool, top_k=0)
    with pytest.raises(ValueError, match="answer pool"):
        rank_answers(model, image_embeds, questions, [])


def test_answer_questions_rejects_bad_input(model, pixels) -> None:
    with pytest.raises(ValueError, match="2 images but 1 questions"):
        answer_questions(model, pixels, ["Is it?"])
    with pytest.raises(ValueError, match="non-empty candidate"):
        answer_questions(model, pixels, ["Is it?", "Is it?"], [["yes", " "], None])


# ------------------------------------------------------------------------ real VQA-RAD, end to end


@pytest.fixture(scope="module")
def vqa_rad_subset(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The questions of the first 8 VQA-RAD images, converted at 32 px with half the images in val."""
    from medunifier.data.converters.vqa_rad import convert_vqa_rad

    src = shared_data / "vqa_rad"
    if not (src / "trainset.json").is_file():
        pytest.skip(f"VQA-RAD not found in {src}")
    items = json.loads((src / "trainset.json").read_text())
    names = list(dict.fromkeys(i["image_name"] for i in items))[:8]
    root = tmp_path_factory.mktemp("vqa_rad")
    (root / "images").mkdir()
    for name in names:
        shutil.copy(src / "images" / name, root / "images" / name)
    (root / "trainset.json").write_text(json.dumps([i for i in items if i["image_name"] in names]))
    convert_vqa_rad(root, root / "out", val_fraction=0.5, image_size=32, seed=0)
    return root / "out" / "manifest.jsonl"


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory, model) -> Path:
    run = tmp_path_factory.mktemp("vqa_run") / "run"
    model.save_pretrained(run / "model")
    return run


def test_eval_vqa_cli_on_real_vqa_rad(vqa_rad_subset: Path, small_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "vqa"
    r = runner.invoke(app, ["eval", "vqa", "--ckpt", str(small_run), "--data", str(vqa_rad_subset), "--split", "val",
                            "--out", str(out), "--limit", "12", "--max-length", "4", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "overall" in r.output and "modality" in r.output
    res = json.loads((out / "results.json").read_text())
    assert {"task", "n", "closed_scoring", "candidate_pool", "candidate_coverage", "metrics", "split"} <= set(res)
    m = res["metrics"]
    assert res["n"] == 12 == m["n"] == m["n_closed"] + m["n_open"] and res["split"] == "val"
    assert {"accuracy", "closed_accuracy", "open_accuracy", "open_token_recall"} <= set(m)
    assert set(m["groups"]) == {"modality", "organ"}
    assert sum(g["n"] for g in m["groups"]["organ"].values()) == 12
    assert res["candidate_pool"]["source"] == "train split" and res["candidate_pool"]["answers"] >= 2
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    for row in rows:  # closed questions are answered by one of their candidates
        if row["closed"]:
            assert row["prediction"] in row["candidates"]
        else:
            assert row["candidates"] is None
    assert sum(row["correct"] for row in rows) == round(m["accuracy"] * 12)

    r = runner.invoke(app, ["eval", "vqa", "--ckpt", str(small_run), "--data", str(vqa_rad_subset), "--split", "val",
                            "--out", str(out), "--limit", "12", "--open-scoring", "rank", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    pool = res["open_pool"]
    assert res["open_scoring"] == "rank" and pool["answers"] >= 1 and 0.0 <= pool["coverage"] <= 1.0
    train = [json.loads(x) for x in vqa_rad_subset.read_text().splitlines()]
    train_open = {normalize_answer(t["answer"]) for t in train if t["split"] == "train" and not is_closed(t)}
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    ranked = [row for row in rows if not row["closed"]]
    assert ranked and all(normalize_answer(row["prediction"]) in train_open for row in ranked)

    r = runner.invoke(app, ["eval", "vqa", "--ckpt", str(small_run), "--data", str(vqa_rad_subset), "--split", "val",
                            "--out", str(out), "--closed-scoring", "maybe"])
    assert r.exit_code == 2 and "--closed-scoring" in r.output

    # closed answers calibrated against 3 training images: recorded, still one of the candidates
    r = runner.invoke(app, ["eval", "vqa", "--ckpt", str(small_run), "--data", str(vqa_rad_subset), "--split", "val",
                            "--out", str(out), "--limit", "12", "--max-length", "2", "--closed-calibration",
                            "image-pmi", "--reference-images", "3", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["closed_calibration"]["kind"] == "image-pmi" and len(res["closed_calibration"]["reference_ids"]) == 3
    train_ids = {t["id"] for t in train if t["split"] == "train"}
    assert set(res["closed_calibration"]["reference_ids"]) <= train_ids
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert all(row["prediction"] in row["candidates"] for row in rows if row["closed"])
    for bad in (["--closed-calibration", "always"], ["--closed-calibration", "image-pmi", "--closed-scoring",
                                                     "generate"]):
        r = runner.invoke(app, ["eval", "vqa", "--ckpt", str(small_run), "--data", str(vqa_rad_subset), *bad])
        assert r.exit_code == 2 and "--closed-calibration" in r.output


def test_ask_cli(vqa_rad_subset: Path, small_run: Path) -> None:
    image = next((vqa_rad_subset.parent / "images").iterdir())
    r = runner.invoke(app, ["ask", str(image), "Is there a fracture?", "--ckpt", str(small_run),
                            "--candidates", "yes,no", "--json", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["answer"] in ("yes", "no") and [c["answer"] for c in res["candidates"]] == ["yes", "no"]
    assert sum(c["probability"] for c in res["candidates"]) == pytest.approx(1.0)
    best = max(res["candidates"], key=lambda c: c["log_likelihood"])
    assert best["answer"] == res["answer"]
    r = runner.invoke(app, ["ask", str(image), "What organ is shown?", "--ckpt", str(small_run), "--max-length", "3"])
    assert r.exit_code == 0, r.output
    assert "What organ is shown?" in r.output
    r = runner.invoke(app, ["ask", str(image), "Is it?", "--ckpt", str(small_run), "--candidates", ","])
    assert r.exit_code == 2 and "--candidates is empty" in r.output


def test_shuffled_images_ask_each_question_of_the_permuted_image(vqa_rad_subset: Path, model, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The language-prior control: the model sees exactly the images of records permuted by hand."""
    from medunifier.data.manifest import load_records
    from medunifier.eval.vqa import evaluate_vqa

    records = [r for r in load_records(vqa_rad_subset) if r.split == "val"][:10]
    root = vqa_rad_subset.parent
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(0)).tolist()
    by_hand = [r.model_copy(update={"image": records[i].image}) for r, i in zip(records, order)]
    assert any(a.image != b.image for a, b in zip(records, by_hand))
    seen: list[torch.Tensor] = []
    features = model.image_features
    monkeypatch.setattr(model, "image_features", lambda px: seen.append(px.clone()) or features(px))

    def run(name: str, rows, shuffle: bool) -> tuple[torch.Tensor, list[str]]:
        seen.clear()
        res = evaluate_vqa(model, rows, root, shuffle_images=shuffle, out=tmp_path / name, closed_scoring="generate",
                           max_length=3, progress=False)
        assert res["shuffled_images"] is shuffle
        lines = (tmp_path / name / "predictions.jsonl").read_text().splitlines()
        return torch.cat(seen), [json.loads(x)["question"] for x in lines]

    shuffled, questions = run("shuffled", records, True)
    by_hand_pixels, _ = run("by_hand", by_hand, False)
    real, _ = run("real", records, False)
    assert questions == [r.question for r in records]  # the questions keep their order
    assert torch.equal(shuffled, by_hand_pixels) and not torch.equal(shuffled, real)


def test_compute_vqa_writes_and_prints_nothing_and_write_vqa_writes_its_rows(
        vqa_rad_subset: Path, model, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The computation returns figures and rows only; the files come from `write_vqa` at the edge."""
    from medunifier.data.manifest import load_records
    from medunifier.eval.vqa import compute_vqa, write_vqa

    records = [r for r in load_records(vqa_rad_subset) if r.split == "val"][:6]
    calls: list[tuple[int, int]] = []
    evaluation = compute_vqa(model, records, vqa_rad_subset.parent, closed_scoring="generate", max_length=2,
                             batch_size=4, on_progress=lambda done, total: calls.append((done, total)))
    assert capsys.readouterr().out == "" and not any(tmp_path.iterdir())
    assert calls == [(0, 6), (4, 6), (6, 6)]
    assert evaluation.results["n"] == 6 and evaluation.results["metrics"]["n"] == 6
    assert [row["id"] for row in evaluation.predictions] == [r.id for r in records]
    assert all(row["correct"] == (normalize_answer(row["prediction"]) == normalize_answer(row["reference"]))
               for row in evaluation.predictions)
    write_vqa(evaluation, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["n"] == 6
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == evaluation.predictions
