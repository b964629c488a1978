"""`Copilot.ask` and `POST /v1/ask`: answers (generated or chosen among candidates) and clear 4xx refusals."""

from __future__ import annotations

import pytest
import torch
from serve_helpers import encode, picture

from medunifier.eval.vqa_answering import answer_questions, score_candidates

PNG = encode(picture(7))


def test_copilot_ask_matches_the_evaluation_functions(base_copilot) -> None:
    image = picture(7)
    pixels = base_copilot.preprocess(image)
    question = "Is there a pleural effusion?"
    with torch.no_grad():
        want_open = answer_questions(base_copilot.model, pixels, [question], max_length=5)[0]
        want_scores = score_candidates(base_copilot.model, pixels, [question], [["yes", "no", "maybe"]])[0]
    got = base_copilot.ask(image, question, max_length=5)
    assert got.answer == want_open and got.candidates is None
    got = base_copilot.ask(image, f"  {question} ", candidates=["yes", "no", "maybe"])
    assert got.question == question
    assert [c.log_likelihood for c in got.candidates] == pytest.approx(want_scores, abs=1e-5)
    assert got.answer == ["yes", "no", "maybe"][max(range(3), key=want_scores.__getitem__)]
    assert sum(c.probability for c in got.candidates) == pytest.approx(1.0)
    for bad, message in (({"question": " "}, "empty question"), ({"candidates": []}, "at least one"),
                         ({"candidates": ["yes", "yes"]}, "repeated")):
        with pytest.raises(ValueError, match=message):
            base_copilot.ask(image, **{"question": question, **bad})


def test_post_ask_generated_and_candidates(make_client) -> None:
    client = make_client(index=False, generator=False)
    files = {"image": ("scan.png", PNG, "image/png")}
    r = client.post("/v1/ask", files=files, data={"question": "What organ is shown?", "max_length": "4"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["filename"] == "scan.png" and body["question"] == "What organ is shown?" and body["draft"]
    assert isinstance(body["answer"], str) and body["candidates"] is None

    r = client.post("/v1/ask", files=files, data={"question": "Is the heart enlarged?", "candidates": "yes, no"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["answer"] for c in body["candidates"]] == ["yes", "no"]
    assert body["answer"] == max(body["candidates"], key=lambda c: c["log_likelihood"])["answer"]
    assert sum(c["probability"] for c in body["candidates"]) == pytest.approx(1.0)


@pytest.mark.parametrize(("data", "files", "status", "message"), [
    ({}, "png", 422, "question"),  # missing field
    ({"question": "   "}, "png", 422, "question is empty"),
    ({"question": "Is it?", "candidates": " , "}, "png", 422, "candidates: no answer given"),
    ({"question": "Is it?", "candidates": "yes,yes"}, "png", 422, "candidates: an answer is repeated"),
    ({"question": "Is it?", "max_length": "0"}, "png", 422, "max_length"),
    ({"question": "Is it?"}, "text", 415, "not a PNG, JPEG or DICOM"),
    ({"question": "Is it?"}, None, 422, "image"),
])
def test_post_ask_rejects_bad_input(make_client, data, files, status, message) -> None:
    client = make_client(index=False, generator=False)
    upload = {"png": {"image": ("a.png", PNG, "image/png")},
              "text": {"image": ("a.txt", b"not an image at all", "text/plain")}, None: None}[files]
    r = client.post("/v1/ask", files=upload, data=data)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["status"] == status and message in error["message"]
