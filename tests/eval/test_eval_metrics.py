"""Metric functions against hand-worked values (retrieval, zero-shot, classification, NLG, clinical efficacy)."""

from __future__ import annotations

import math
import re
import string

import numpy as np
import pytest
import torch

from medunifier.eval.metrics import (
    classification_metrics,
    clean_report,
    clinical_efficacy,
    java_available,
    mean_rank,
    mean_std,
    nlg_metrics,
    precision_at_k,
    r2gen_text,
    recall_at_k,
    zero_shot_scores,
)

# ------------------------------------------------------------------------------------------ retrieval

SIM = np.array([
    [0.9, 0.8, 0.1],  # order c0 c1 c2 -> classes 0 1 0
    [0.2, 0.5, 0.7],  # order c2 c1 c0 -> classes 0 1 0
    [0.3, 0.6, 0.4],  # order c1 c2 c0 -> classes 1 0 0
])
QUERY_CLASSES = [0, 1, 1]
CANDIDATE_CLASSES = [0, 1, 0]


def test_precision_at_k_hand_worked_3x3() -> None:
    # hits per row: [1,0,1], [0,1,0], [1,0,0]
    p = precision_at_k(SIM, QUERY_CLASSES, CANDIDATE_CLASSES, ks=(1, 2, 3))
    assert p[1] == pytest.approx((1 + 0 + 1) / 3)
    assert p[2] == pytest.approx((1 / 2 + 1 / 2 + 1 / 2) / 3)
    assert p[3] == pytest.approx((2 / 3 + 1 / 3 + 1 / 3) / 3)


def test_precision_at_k_accepts_tensors_and_string_classes() -> None:
    p = precision_at_k(torch.tensor(SIM), ["a", "b", "b"], ["a", "b", "a"], ks=(1,))
    assert p[1] == pytest.approx(2 / 3)


def test_precision_at_k_rejects_bad_k_and_shapes() -> None:
    with pytest.raises(ValueError, match="K=4"):
        precision_at_k(SIM, QUERY_CLASSES, CANDIDATE_CLASSES, ks=(4,))
    with pytest.raises(ValueError, match="does not match"):
        precision_at_k(SIM, QUERY_CLASSES[:2], CANDIDATE_CLASSES, ks=(1,))


def test_recall_and_mean_rank_of_the_exact_pair() -> None:
    # pair ranks: row 0 -> c0 first (1), row 1 -> c1 second (2), row 2 -> c2 second (2)
    r = recall_at_k(SIM, ks=(1, 2, 3))
    assert r == {1: pytest.approx(1 / 3), 2: pytest.approx(1.0), 3: pytest.approx(1.0)}
    assert mean_rank(SIM) == pytest.approx(5 / 3)
    # the transpose (text-to-image): column 0 [.9 .2 .3] -> 1st, column 1 [.8 .5 .6] -> 3rd, column 2 [.1 .7 .4] -> 2nd
    assert mean_rank(SIM.T) == pytest.approx((1 + 3 + 2) / 3)


def test_ties_are_broken_by_index_so_a_constant_matrix_scores_as_chance() -> None:
    sim = np.zeros((4, 4))
    assert recall_at_k(sim, ks=(1,))[1] == pytest.approx(1 / 4)
    assert mean_rank(sim) == pytest.approx(2.5)
    p = precision_at_k(sim, [0, 0, 1, 1], [0, 0, 1, 1], ks=(2,))
    assert p[2] == pytest.approx(0.5)  # top-2 is always candidates 0, 1


# ------------------------------------------------------------------------------------------ zero-shot

S = math.sqrt(0.75)
IMAGES = torch.tensor([
    [[1.0, 0.0], [0.8, 0.6]],
    [[0.0, 1.0], [0.0, 1.0]],
    [[0.5, S], [0.5, S]],
])  # [3 images, 2 queries, E=2]
PROMPTS = {"A": torch.tensor([[1.0, 0.0], [0.6, 0.8]]), "B": torch.tensor([[0.0, 1.0]])}


def test_zero_shot_scores_mean_and_max_ensembles() -> None:
    # image 0: A prompts -> max over queries (1.0, 0.96), B -> 0.6
    # image 1: A -> (0, 0.8), B -> 1.0;  image 2: A -> (0.5, 0.3 + 0.8 S), B -> S
    a2 = 0.3 + 0.8 * S
    mean = zero_shot_scores(IMAGES, PROMPTS, ensemble="mean")
    mx = zero_shot_scores(IMAGES, PROMPTS, ensemble="max")
    torch.testing.assert_close(mean, torch.tensor([[0.98, 0.6], [0.4, 1.0], [(0.5 + a2) / 2, S]]))
    torch.testing.assert_close(mx, torch.tensor([[1.0, 0.6], [0.8, 1.0], [a2, S]]))
    # image 2 flips between the ensembles: mean prefers B, max prefers A
    assert mean.argmax(1).tolist() == [0, 1, 1]
    assert mx.argmax(1).tolist() == [0, 1, 0]
    y = [0, 1, 0]
    assert classification_metrics(y, mean)["accuracy"] == pytest.approx(2 / 3)
    assert classification_metrics(y, mx)["accuracy"] == pytest.approx(1.0)


def test_zero_shot_embedding_ensemble_and_flat_images() -> None:
    flat = torch.tensor([[1.0, 0.0]])  # [N, E] without queries
    emb = zero_shot_scores(flat, [PROMPTS["A"], PROMPTS["B"]], ensemble="embedding")
    centroid = torch.tensor([0.8, 0.4]) / math.hypot(0.8, 0.4)
    torch.testing.assert_close(emb, torch.tensor([[float(centroid[0]), 0.0]]))
    with pytest.raises(ValueError, match="ensemble"):
        zero_shot_scores(flat, [PROMPTS["A"]], ensemble="median")


def test_classification_metrics_multiclass_hand_worked() -> None:
    y = [0, 1, 2, 2]
    scores = np.array([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4], [0.2, 0.3, 0.5], [0.6, 0.1, 0.3]])
    m = classification_metrics(y, scores, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(0.75)  # predictions 0 1 2 0
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)
    assert m["auroc_per_class"] == {"a": pytest.approx(1.0), "b": pytest.approx(1.0), "c": pytest.approx(0.75)}
    assert m["auroc"] == pytest.approx((1 + 1 + 0.75) / 3)
    assert m["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]


def test_classification_metrics_binary_uses_the_score_difference() -> None:
    y = [0, 1, 1, 0]
    scores = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.2], [0.2, 0.5]])
    # s1 - s0 = -0.8, 0.2, -0.1, 0.3: positive-negative pairs ordered correctly: 2 of 4
    m = classification_metrics(y, scores)
    assert m["auroc"] == pytest.approx(0.5)
    assert m["accuracy"] == pytest.approx(0.5)
    assert classification_metrics([1, 1], np.array([[0.0, 1.0], [1.0, 0.0]]))["auroc"] is None


def test_mean_std_uses_the_sample_std_and_skips_missing() -> None:
    s = mean_std([0.7, 0.8, 0.9, None])
    assert s["mean"] == pytest.approx(0.8) and s["std"] == pytest.approx(0.1) and s["n"] == 3
    assert mean_std([0.5])["std"] == 0.0
    assert mean_std([None])["mean"] is None


# -------------------------------------------------------------------------------- report generation

R2GEN_SENTENCE_REGEX = "[.,?;*!%^&_+():-\\[\\]{}]"  # R2Gen's sent_cleaner character class, for parity


def test_clean_report_matches_r2gen_by_hand() -> None:
    text = "1. The heart is Normal. 2. No effusion!\nLungs: clear.. Left-sided PICC (tip in SVC)."
    assert clean_report(text) == "the heart is normal . no effusion lungs clear . left-sided picc tip in svc ."
    assert clean_report("No pneumothorax.") == "no pneumothorax ."
    assert clean_report("") == " ."  # R2Gen keeps empty sentences
    # what R2Gen scores: its tokenizer splits on whitespace and its decoder joins with one space
    assert r2gen_text("Findings : left - sided PICC.") == "findings left - sided picc ."


def test_clean_report_deletes_the_same_characters_as_r2gens_regex() -> None:
    for ch in string.printable.replace("\n", ""):
        sentence = f"x{ch}y".replace('"', "").replace("/", "").replace("\\", "").replace("'", "").strip().lower()
        assert clean_report(f"x{ch}y") == re.sub(R2GEN_SENTENCE_REGEX, "", sentence) + " .", repr(ch)


def _pycoco_direct(refs: list[str], hyps: list[str], meteor: bool) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {i: [r] for i, r in enumerate(refs)}
    res = {i: [h] for i, h in enumerate(hyps)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"BLEU_{n + 1}": b for n, b in enumerate(bleu)}
    out["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    if meteor:  # the same jar process as ours (a second JVM would double the test's time)
        from medunifier.eval.metrics import meteor_scorer

        out["METEOR"] = meteor_scorer().compute_score(gts, res)[0]
    return out


REFS = [
    "The heart is normal in size. No pleural effusion or pneumothorax.",
    "Mild cardiomegaly. Small left pleural effusion. No pneumothorax.",
    "Lungs are clear. No acute cardiopulmonary process.",
]
HYPS = [
    "The heart is normal. No pleural effusion.",
    "Moderate cardiomegaly. Small right pleural effusion.",
    "The lungs are clear. No acute disease.",
]


def test_bleu_and_rouge_hand_worked() -> None:
    m = nlg_metrics(["The heart is normal."], ["The heart is large."], meteor=False)
    # tokens: "the heart is normal ." vs "the heart is large ." -> 4 of 5 unigrams, 2 of 4 bigrams, LCS 4
    assert m["BLEU_1"] == pytest.approx(0.8, abs=1e-6)
    assert m["BLEU_2"] == pytest.approx(math.sqrt(0.8 * 0.5), abs=1e-6)
    assert m["ROUGE_L"] == pytest.approx(0.8, abs=1e-9)
    assert m["METEOR"] is None


def test_bleu_rouge_parity_with_pycocoevalcap_called_directly() -> None:
    ours = nlg_metrics(REFS, HYPS, meteor=False)
    theirs = _pycoco_direct([r2gen_text(r) for r in REFS], [r2gen_text(h) for h in HYPS], meteor=False)
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key
    assert 0 < ours["BLEU_4"] < ours["BLEU_3"] < ours["BLEU_2"] < ours["BLEU_1"] < 1
    # cleaning matters: raw, mixed-case text scores differently
    raw = nlg_metrics(REFS, HYPS, meteor=False, clean=False)
    assert raw["BLEU_1"] != pytest.approx(ours["BLEU_1"])


@pytest.mark.slow  # the METEOR jar's JVM start: 10-25 s on 2 busy cores
@pytest.mark.skipif(not java_available(), reason="METEOR needs java on PATH")
def test_meteor_parity_with_pycocoevalcap() -> None:
    ours = nlg_metrics(REFS, HYPS)
    theirs = _pycoco_direct([r2gen_text(r) for r in REFS], [r2gen_text(h) for h in HYPS], meteor=True)
    assert ours["METEOR"] == pytest.approx(theirs["METEOR"], abs=1e-12)
    assert 0 < ours["METEOR"] < 1


def test_nlg_metrics_rejects_mismatched_lists() -> None:
    with pytest.raises(ValueError, match="2 references but 1"):
        nlg_metrics(["a", "b"], ["a"], meteor=False)


# -------------------------------------------------------------------------------- clinical efficacy


def _letter_labeler(text: str) -> dict[str, int]:
    """'A' -> a present, 'A?' -> a uncertain; same for b."""
    out = {}
    for letter in "ab":
        up = letter.upper()
        out[letter] = -1 if f"{up}?" in text else int(up in text)
    return out


def test_clinical_efficacy_hand_worked_with_uncertain_policies() -> None:
    refs, hyps = ["A", "B", "AB"], ["A", "AB", "A?B"]
    neg = clinical_efficacy(refs, hyps, labeler=_letter_labeler, findings=["a", "b"])
    # a: ref 1 0 1, gen 1 1 (-1 -> 0): tp 1 fp 1 fn 1;  b: ref 0 1 1, gen 0 1 1: tp 2
    assert neg["per_finding"]["a"]["f1"] == pytest.approx(0.5)
    assert neg["per_finding"]["b"]["f1"] == pytest.approx(1.0)
    assert neg["micro"] == {"precision": pytest.approx(0.75), "recall": pytest.approx(0.75), "f1": pytest.approx(0.75)}
    assert neg["macro"]["f1"] == pytest.approx(0.75)
    assert neg["uncertain_labels"] == {"reference": 0, "generated": 1}
    pos = clinical_efficacy(refs, hyps, labeler=_letter_labeler, findings=["a", "b"], uncertain="positive")
    # a: gen 1 1 1: tp 2 fp 1 fn 0 -> P 2/3, R 1, F1 0.8
    assert pos["per_finding"]["a"] == {"precision": pytest.approx(2 / 3), "recall": 1.0, "f1": pytest.approx(0.8),
                                       "support": 2, "predicted": 3}
    assert pos["micro"]["precision"] == pytest.approx(0.8) and pos["micro"]["recall"] == pytest.approx(1.0)
    assert pos["macro"]["f1"] == pytest.approx(0.9)


def test_clinical_efficacy_with_the_project_labeler() -> None:
    pytest.importorskip("medunifier.data.labeler")
    refs = ["Mild cardiomegaly. No pleural effusion.", "Small left pleural effusion. No pneumothorax."]
    hyps = ["The heart is enlarged. Small pleural effusion.", "No acute cardiopulmonary process."]
    ce = clinical_efficacy(refs, hyps)
    assert ce["per_finding"]["cardiomegaly"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1,
                                                 "predicted": 1}
    effusion = ce["per_finding"]["pleural_effusion"]  # generated for report 1 (wrong), missed for report 2
    assert (effusion["precision"], effusion["recall"], effusion["support"]) == (0.0, 0.0, 1)
    assert ce["per_finding"]["pneumothorax"]["support"] == 0  # negated in the reference
