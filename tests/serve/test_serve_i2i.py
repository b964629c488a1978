"""The image-to-image endpoints: translate, upscale and segment, and what they refuse."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image
from serve_helpers import encode, picture

from medunifier.serve.api import Copilot


def _png(data_url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))))


def test_translate_upscale_segment_answer_at_the_model_size(make_client) -> None:
    client = make_client()
    r = client.post("/v1/translate", files={"image": ("x.png", encode(picture(1)))}, data={"to": "soft_tissue"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["synthetic"] and body["instruction"] == "translate to a bone-suppressed image"
    assert _png(body["image"]).shape == _png(body["source"]).shape == (32, 32)
    r = client.post("/v1/upscale", files={"image": ("x.png", encode(picture(2, (8, 8))))}, data={"scale": "4"})
    assert r.status_code == 200, r.text
    assert _png(r.json()["image"]).shape == (32, 32)
    r = client.post("/v1/segment", files={"image": ("x.png", encode(picture(3)))}, data={"finding": "cardiomegaly"})
    assert r.status_code == 200, r.text
    body = r.json()
    mask = _png(body["mask"])
    assert body["instruction"] == "outline the heart" and mask.shape == (32, 32) and set(np.unique(mask)) <= {0, 255}
    assert body["area_fraction"] == (mask > 0).mean()


def test_the_spec_lists_exactly_the_kinds_and_findings_the_model_knows(make_client) -> None:
    from medunifier.data.synthcxr import MASK_FINDINGS
    from medunifier.generate.i2i import FINDING_ALIASES, translation_kinds

    spec = make_client().get("/openapi.json").json()["components"]["schemas"]
    forms = {name: body["properties"] for name, body in spec.items() if name.startswith("Body_")}
    to = next(p["to"] for p in forms.values() if "to" in p)
    finding = next(p["finding"] for p in forms.values() if "finding" in p)
    assert set(to["enum"]) == set(translation_kinds())
    assert set(finding["enum"]) == {*MASK_FINDINGS, *FINDING_ALIASES}


def test_bad_i2i_requests_get_4xx_naming_the_problem(make_client) -> None:
    client = make_client()
    png = encode(picture(1))
    cases = [
        ("/v1/translate", {"to": "ct"}, png, 422, "soft_tissue"),
        ("/v1/translate", {}, png, 422, None),  # `to` missing
        ("/v1/upscale", {"scale": "3"}, encode(picture(2, (8, 8))), 422, None),
        ("/v1/upscale", {"scale": "4"}, png, 422, "needs a 8x8 input"),
        ("/v1/segment", {"finding": "fracture"}, png, 422, "pleural_effusion"),
        ("/v1/segment", {"finding": "heart"}, b"not an image at all", 415, None),
    ]
    for path, data, image, status, message in cases:
        r = client.post(path, files={"image": ("x.png", image)}, data=data)
        assert r.status_code == status, (path, data, r.status_code, r.text)
        if message:
            assert message in r.json()["error"]["message"], r.text
    r = client.post("/v1/segment", data={"finding": "heart"})  # no image
    assert r.status_code == 422


def test_a_model_without_the_head_answers_501(make_client, base_copilot: Copilot, monkeypatch) -> None:
    monkeypatch.setattr(base_copilot.model, "i2i", None)
    client = make_client()
    r = client.post("/v1/translate", files={"image": ("x.png", encode(picture(1)))}, data={"to": "bone"})
    assert r.status_code == 501 and r.json()["error"]["code"] == "image_to_image_unavailable"
    assert client.get("/v1/model").json()["image_to_image"] is False
