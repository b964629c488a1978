"""The REST service through FastAPI's TestClient: every endpoint and every way a request is refused."""

from __future__ import annotations

import base64
import hashlib
import io
import math
import threading
import time

import numpy as np
import pytest
from PIL import Image
from serve_helpers import CASES, dicom_bytes, encode, picture

PNG = encode(picture(1))


def png_of(data_url: str) -> Image.Image:
    assert data_url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))


def assert_error(response, status: int, code: str | None = None, contains: str | None = None) -> dict:
    """Every refusal: the status, and a JSON body {"error": {status, code, message}} saying what was wrong."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["status"] == status and error["message"]
    if code is not None:
        assert error["code"] == code, error
    if contains is not None:
        assert contains in error["message"], error
    return error


def image_part(data: bytes = PNG, name: str = "x.png", mime: str = "image/png") -> tuple[str, tuple[str, bytes, str]]:
    return ("image", (name, data, mime))


# ------------------------------------------------------------------------------------------ service


def test_health_needs_no_token_and_reports_capabilities(make_client) -> None:
    body = make_client(token="s3cret-token").get("/v1/health").json()
    assert body["status"] == "ok" and body["index_size"] == len(CASES) and body["generation"] is True
    assert make_client(index=False, generator=False).get("/v1/health").json()["index_size"] is None


def test_model_info_has_version_config_and_weights_checksum(make_client, run_dir) -> None:
    body = make_client().get("/v1/model").json()
    expected = "sha256:" + hashlib.sha256((run_dir / "model" / "model.safetensors").read_bytes()).hexdigest()
    assert body["checksum"] == expected
    assert body["version"] and body["config"]["image"]["size"] == 32
    assert body["labels"] == ["atelectasis", "cardiomegaly", "consolidation", "edema", "pleural_effusion"]
    assert body["index"]["count"] == len(CASES) and body["generation"]["available"] is True


def test_openapi_lists_every_endpoint_and_the_page_is_self_contained(make_client) -> None:
    client = make_client()
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/report", "/v1/classify", "/v1/retrieve", "/v1/synthesize", "/v1/edit", "/v1/health",
                 "/v1/model"):
        assert path in paths
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    for text in (page.text, client.get("/static/app.js").text, client.get("/static/style.css").text):
        assert "http://" not in text and "https://" not in text  # no CDN: the machine may be offline
    assert client.get("/docs").status_code == 404  # Swagger UI would load a CDN


# --------------------------------------------------------------------------------------- understanding


def test_report_png_jpeg_and_dicom_in_one_request(make_client, base_copilot) -> None:
    arr = picture(2)
    files = [image_part(encode(arr), "a.png"), image_part(encode(arr, "JPEG"), "b.jpg", "image/jpeg"),
             image_part(dicom_bytes(arr), "c.dcm", "application/dicom")]
    body = make_client().post("/v1/report", files=files, data={"num_beams": "2", "preview": "true"}).json()
    assert [r["filename"] for r in body["reports"]] == ["a.png", "b.jpg", "c.dcm"]
    assert body["draft"] is True and body["model"] == base_copilot.checksum
    assert all(isinstance(r["report"], str) for r in body["reports"])
    assert png_of(body["reports"][2]["preview"]).size == (40, 48)  # the DICOM, decoded for display
    # the same PNG through the Python API gives the same draft
    assert body["reports"][0]["report"] == base_copilot.report(arr, num_beams=2)[0]


def test_report_best_of_several_drafts_is_reproducible_and_bounded(make_client, base_copilot) -> None:
    client = make_client()
    arr = picture(3)
    form = {"num_beams": "2", "candidates": "3", "seed": "7"}
    first = client.post("/v1/report", files=[image_part(encode(arr))], data=form).json()["reports"][0]["report"]
    again = client.post("/v1/report", files=[image_part(encode(arr))], data=form).json()["reports"][0]["report"]
    assert first == again == base_copilot.report(arr, num_beams=2, candidates=3, seed=7)[0]
    # candidates=1 is beam search alone
    assert base_copilot.report(arr, num_beams=2, candidates=1)[0] == base_copilot.report(arr, num_beams=2)[0]
    assert_error(client.post("/v1/report", files=[image_part()], data={"candidates": "17"}), 422)
    assert_error(client.post("/v1/report", files=[image_part()], data={"candidates": "0"}), 422)


def test_classify_default_findings_and_custom_labels(make_client) -> None:
    client = make_client()
    body = client.post("/v1/classify", files=[image_part()]).json()
    probs = body["results"][0]["probabilities"]
    assert body["labels"] == list(probs) and len(probs) == 5
    assert math.isclose(sum(probs.values()), 1.0, rel_tol=1e-5)
    assert body["results"][0]["top"] == max(probs, key=probs.get)
    body = client.post("/v1/classify", files=[image_part(), image_part(name="y.png")],
                       data={"labels": "pleural effusion, a dog, no finding", "ensemble": "max"}).json()
    assert body["labels"] == ["pleural effusion", "a dog", "no finding"] and len(body["results"]) == 2
    sims = body["results"][0]["similarities"]
    order = sorted(sims, key=sims.get)
    probs = body["results"][0]["probabilities"]
    assert order == sorted(probs, key=probs.get)  # softmax keeps the similarity order


def test_retrieve_by_text_and_by_image(make_client, case_index) -> None:
    client = make_client()
    text = CASES[3][1]
    body = client.post("/v1/retrieve", data={"text": text, "k": "3", "mode": "text"}).json()
    assert body["query"] == "text" and body["mode"] == "text" and len(body["hits"]) == 3
    assert body["hits"][0]["id"] == "case-3" and body["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    scores = [h["score"] for h in body["hits"]]
    assert scores == sorted(scores, reverse=True)
    assert png_of(body["hits"][0]["thumbnail"]).size[0] <= 96
    image = (case_index.root / "images" / "case-4.png").read_bytes()
    body = client.post("/v1/retrieve", files=[image_part(image)], data={"mode": "image", "k": "2"}).json()
    assert body["query"] == "image" and body["hits"][0]["id"] == "case-4"
    assert body["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    body = client.post("/v1/retrieve", files=[image_part(image)]).json()
    assert body["mode"] == "text" and len(body["hits"]) == 5  # the default k


# ------------------------------------------------------------------------------------------ generation


def test_synthesize_labels_images_synthetic_in_json_and_png(make_client) -> None:
    client = make_client()
    body = client.post("/v1/synthesize", json={"text": "Moderate cardiomegaly.", "n": 3, "seed": 7}).json()
    assert body["synthetic"] is True and "SYNTHETIC" in body["notice"] and len(body["images"]) == 3
    for item in body["images"]:
        assert item["synthetic"] is True and item["seed"] == 7
        png = png_of(item["image"])
        assert png.text["Synthetic"] == "true" and png.text["Prompt"] == "Moderate cardiomegaly."
        assert "SYNTHETIC" in png.text["Description"]
    again = client.post("/v1/synthesize", json={"text": "Moderate cardiomegaly.", "n": 3, "seed": 7}).json()
    assert again["images"] == body["images"]  # same seed, same images
    fresh = client.post("/v1/synthesize", json={"text": "Moderate cardiomegaly."}).json()
    assert len(fresh["images"]) == 1 and isinstance(fresh["images"][0]["seed"], int)


def test_edit_returns_source_edited_and_difference(make_client) -> None:
    client = make_client()
    body = client.post("/v1/edit", files=[image_part()], data={"text": "pleural effusion", "strength": "0.6",
                                                               "seed": "3"}).json()
    assert body["synthetic"] is True and body["seed"] == 3 and body["strength"] == 0.6
    assert png_of(body["edited"]).text["Synthetic"] == "true" and png_of(body["edited"]).text["Source"] == "edit"
    assert "Synthetic" not in png_of(body["source"]).text
    assert png_of(body["reconstruction"]).size == (32, 32)
    diff = np.asarray(png_of(body["difference"]))
    assert diff.shape == (32, 32, 3) and diff.max() == 255 and body["max_abs_difference"] > 0.05
    same = client.post("/v1/edit", files=[image_part()], data={"text": "pleural effusion", "strength": "0"}).json()
    assert same["max_abs_difference"] == 0 and np.asarray(png_of(same["difference"])).max() == 0


# ------------------------------------------------------------------------------------------ refusals


def test_bearer_token_is_required_and_checked(make_client) -> None:
    client = make_client(token="correct-horse-battery")
    err = assert_error(client.get("/v1/model"), 401, "unauthorized")
    assert "Bearer" in err["message"]
    assert client.get("/v1/model").headers["www-authenticate"] == "Bearer"
    assert_error(client.get("/v1/model", headers={"Authorization": "Bearer wrong-token"}), 401, contains="wrong")
    assert_error(client.get("/v1/model", headers={"Authorization": "Basic Y29ycmVjdA=="}), 401)
    assert_error(client.post("/v1/report", files=[image_part()]), 401)
    assert_error(client.post("/v1/synthesize", json={"text": "x"}), 401)
    ok = client.get("/v1/model", headers={"Authorization": "Bearer correct-horse-battery"})
    assert ok.status_code == 200
    assert client.get("/").status_code == 200  # the page itself asks for the token


def test_size_limits_on_request_file_and_pixels(make_client) -> None:
    big = make_client(max_request_bytes=4096, max_upload_bytes=4096)
    assert_error(big.post("/v1/report", files=[image_part(b"\x89PNG\r\n\x1a\n" + bytes(5000))]), 413,
                 "request_too_large")

    def chunks():  # no Content-Length: the streamed body is counted
        for _ in range(10):
            yield bytes(1000)

    assert_error(big.post("/v1/report", content=chunks(), headers={"Content-Type": "multipart/form-data; b=x"}),
                 413, "request_too_large")
    small_file = make_client(max_upload_bytes=1024)
    assert_error(small_file.post("/v1/report", files=[image_part(encode(picture(0, (64, 64))))]), 413,
                 "file_too_large")
    few_pixels = make_client(max_pixels=1000)
    assert_error(few_pixels.post("/v1/report", files=[image_part(encode(picture(0, (40, 40))))]), 413,
                 "image_too_large", contains="1000")


def test_decompression_bomb_is_refused_before_decoding(make_client) -> None:
    buf = io.BytesIO()
    Image.new("L", (12000, 12000)).save(buf, format="PNG")  # 144 Mpixel of zeros: ~140 kB on the wire
    assert len(buf.getvalue()) < 1_000_000
    assert_error(make_client().post("/v1/report", files=[image_part(buf.getvalue())]), 413, "image_too_large")


def test_unsupported_empty_and_corrupt_uploads(make_client) -> None:
    client = make_client()
    gif = io.BytesIO()
    Image.new("L", (8, 8)).save(gif, format="GIF")
    assert_error(client.post("/v1/report", files=[image_part(gif.getvalue(), "x.gif")]), 415,
                 "unsupported_media_type")
    assert_error(client.post("/v1/classify", files=[image_part(b"hello world", "x.txt")]), 415)
    assert_error(client.post("/v1/report", files=[image_part(b"", "empty.png")]), 400, "empty_file")
    assert_error(client.post("/v1/report", files=[image_part(PNG[:60], "cut.png")]), 400, "invalid_image",
                 contains="cut.png")
    assert_error(client.post("/v1/edit", files=[image_part(b"\xff\xd8\xff" + bytes(50))], data={"text": "x"}),
                 400, "invalid_image")
    assert_error(client.post("/v1/report", content=b"--x\r\nbroken", headers={"Content-Type": "multipart/form-data"}),
                 400)


@pytest.mark.parametrize(("path", "files", "data", "contains"), [
    ("/v1/report", False, {}, "image"),
    ("/v1/report", True, {"num_beams": "0"}, "num_beams"),
    ("/v1/report", True, {"num_beams": "99"}, "num_beams"),
    ("/v1/report", True, {"max_length": "100000"}, "max_length"),
    ("/v1/classify", True, {"labels": " , "}, "no label"),
    ("/v1/classify", True, {"labels": ",".join(f"l{i}" for i in range(40))}, "at most"),
    ("/v1/classify", True, {"labels": "a," + "b" * 300}, "longer than"),
    ("/v1/classify", True, {"labels": "a,b,a"}, "repeated"),
    ("/v1/classify", True, {"ensemble": "median"}, "ensemble"),
    ("/v1/retrieve", False, {}, "exactly one"),
    ("/v1/retrieve", True, {"text": "both"}, "exactly one"),
    ("/v1/retrieve", False, {"text": "   "}, "empty"),
    ("/v1/retrieve", False, {"text": "x" * 3000}, "text"),
    ("/v1/retrieve", False, {"text": "x", "k": "0"}, "k"),
    ("/v1/retrieve", False, {"text": "x", "k": "1000"}, "k"),
    ("/v1/retrieve", False, {"text": "x", "mode": "audio"}, "mode"),
    ("/v1/edit", True, {}, "text"),
    ("/v1/edit", True, {"text": "x", "strength": "1.5"}, "strength"),
    ("/v1/edit", True, {"text": "x", "strength": "nan"}, "strength"),
    ("/v1/edit", True, {"text": "x", "steps": "1000"}, "steps"),
    ("/v1/edit", True, {"text": "x", "seed": "-1"}, "seed"),
    ("/v1/edit", True, {"text": " "}, "empty"),
])
def test_form_fields_out_of_range_are_422(make_client, path, files, data, contains) -> None:
    response = make_client().post(path, files=[image_part()] if files else None, data=data)
    assert_error(response, 422, "invalid_request", contains=contains)


@pytest.mark.parametrize(("body", "contains"), [
    ({}, "text"),
    ({"text": ""}, "text"),
    ({"text": "   "}, "empty"),
    ({"text": "x" * 2001}, "text"),
    ({"text": "x", "n": 0}, "n"),
    ({"text": "x", "n": 9}, "n"),
    ({"text": "x", "steps": 65}, "steps"),
    ({"text": "x", "guidance": -1}, "guidance"),
    ({"text": "x", "guidance": 1e9}, "guidance"),
    ({"text": "x", "seed": 2**40}, "seed"),
    ({"text": 5}, "text"),
])
def test_synthesize_body_out_of_range_is_422(make_client, body, contains) -> None:
    assert_error(make_client().post("/v1/synthesize", json=body), 422, "invalid_request", contains=contains)


def test_malformed_json_too_many_images_and_limits_follow_settings(make_client) -> None:
    client = make_client(max_images=2, max_n=2, max_text_chars=10)
    assert_error(client.post("/v1/synthesize", content=b"{not json", headers={"Content-Type": "application/json"}),
                 422)
    assert_error(client.post("/v1/report", files=[image_part()] * 3), 422, contains="at most 2")
    assert_error(client.post("/v1/synthesize", json={"text": "x", "n": 3}), 422)
    assert client.post("/v1/synthesize", json={"text": "x", "n": 2}).status_code == 200
    assert_error(client.post("/v1/synthesize", json={"text": "x" * 11}), 422)
    schema = client.get("/openapi.json").json()["components"]["schemas"]["SynthesizeRequest"]["properties"]
    assert schema["n"]["maximum"] == 2 and schema["text"]["maxLength"] == 10


def test_missing_capabilities_are_501_with_the_reason(make_client) -> None:
    client = make_client(index=False, generator=False)
    assert_error(client.post("/v1/retrieve", data={"text": "effusion"}), 501, "index_unavailable", contains="--index")
    assert_error(client.post("/v1/synthesize", json={"text": "effusion"}), 501, "generation_unavailable")
    assert_error(client.post("/v1/edit", files=[image_part()], data={"text": "effusion"}), 501,
                 "generation_unavailable")


def test_unknown_path_and_wrong_method_are_json(make_client) -> None:
    client = make_client()
    assert_error(client.get("/v1/nothing"), 404, "not_found")
    assert_error(client.get("/v1/report"), 405, "method_not_allowed")
    assert_error(client.get("/static/../api.py"), 404)


# ------------------------------------------------------------------------------------------ concurrency


def test_concurrent_requests_are_serialised_and_give_serial_results(make_client, base_copilot) -> None:
    client = make_client()
    model = base_copilot.model
    original = model.generate_report
    active, overlaps = [0], []

    def guarded(*args, **kwargs):
        active[0] += 1
        overlaps.append(active[0])
        time.sleep(0.01)
        try:
            return original(*args, **kwargs)
        finally:
            active[0] -= 1

    images = [encode(picture(10 + i)) for i in range(4)]
    serial = [client.post("/v1/report", files=[image_part(im)]).json()["reports"][0]["report"] for im in images]
    model.generate_report = guarded
    try:
        results: dict[int, str] = {}

        def worker(i: int) -> None:
            r = client.post("/v1/report", files=[image_part(images[i % 4])])
            results[i] = r.json()["reports"][0]["report"]

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        del model.generate_report
    assert max(overlaps) == 1 and len(overlaps) == 8  # never two model calls at once
    assert [results[i] for i in range(8)] == [serial[i % 4] for i in range(8)]
