"""Who may call and what is accepted: the Host allow-list (DNS rebinding), unknown JSON fields, a second
image where one is expected, no filesystem paths in /v1/model, the configured pixel limit in the bomb
message, and no thumbnail from outside the index's folder."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from serve_helpers import encode, picture
from test_serve_app import assert_error, image_part

from medunifier.data.images import save_png
from medunifier.serve.app import create_app, host_name
from medunifier.serve.index import EmbeddingIndex
from medunifier.serve.settings import ServeSettings, SettingsError, load_settings


def _client(copilot, bind_host: str = "127.0.0.1", **settings) -> TestClient:
    return TestClient(create_app(copilot, ServeSettings(**settings), bind_host=bind_host), base_url="http://localhost")


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST"])
def test_loopback_server_accepts_local_host_names(make_copilot, host: str) -> None:
    response = _client(make_copilot()).get("/v1/health", headers={"Host": host})
    assert response.status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.2.nip.io",
                                  "testserver", ""])
def test_loopback_server_refuses_other_hosts(make_copilot, host: str) -> None:
    client = _client(make_copilot())
    for method, path in (("GET", "/v1/health"), ("POST", "/v1/retrieve"), ("GET", "/")):
        response = client.request(method, path, headers={"Host": host}, data={"text": "effusion"})
        error = assert_error(response, 400, "bad_host", contains="allowed_hosts")
        assert "localhost" in error["message"]
        assert response.headers["x-content-type-options"] == "nosniff"  # security headers still set


def test_allowed_hosts_setting_and_non_loopback_default(make_copilot) -> None:
    copilot = make_copilot()
    lan = _client(copilot, allowed_hosts=["pacs-ai.lan", "10.0.0.5"])
    assert lan.get("/v1/health", headers={"Host": "pacs-ai.lan:8000"}).status_code == 200
    assert lan.get("/v1/health", headers={"Host": "10.0.0.5"}).status_code == 200
    assert_error(lan.get("/v1/health", headers={"Host": "localhost"}), 400, "bad_host")
    anywhere = _client(copilot, allowed_hosts=["*"])
    assert anywhere.get("/v1/health", headers={"Host": "evil.example"}).status_code == 200
    public = _client(copilot, bind_host="0.0.0.0")
    assert public.get("/v1/health", headers={"Host": "whatever.example"}).status_code == 200
    assert load_settings(overrides=["allowed_hosts=[a.lan, b.lan]"]).allowed_hosts == ["a.lan", "b.lan"]
    with pytest.raises(SettingsError, match="allowed_hosts"):
        load_settings(overrides=["allowed_hosts=['']"])


def test_host_name_parsing() -> None:
    assert host_name("Example.org:8080") == "example.org" and host_name("[::1]:80") == "::1"
    assert host_name("::1") == "::1" and host_name("localhost") == "localhost"


def test_unknown_json_field_is_422(make_client) -> None:
    client = make_client()
    error = assert_error(client.post("/v1/synthesize", json={"text": "effusion", "n": 1, "steps": 2, "sed": 3}),
                         422, "invalid_request", contains="sed")
    assert "extra" in error["message"].lower() or "not permitted" in error["message"].lower()
    assert client.post("/v1/synthesize", json={"text": "effusion", "n": 1, "steps": 2, "seed": 3}).status_code == 200


def test_a_second_image_is_refused_where_one_is_taken(make_client) -> None:
    client = make_client()
    two = [image_part(encode(picture(1))), image_part(encode(picture(2)), "y.png")]
    assert_error(client.post("/v1/ask", files=two, data={"question": "is there an effusion?"}), 422,
                 "too_many_images", contains="one")
    assert_error(client.post("/v1/edit", files=two, data={"text": "effusion", "steps": "2"}), 422, "too_many_images")
    assert_error(client.post("/v1/retrieve", files=two), 422, "too_many_images")
    ok = client.post("/v1/ask", files=two[:1], data={"question": "is there an effusion?", "candidates": "yes,no"})
    assert ok.status_code == 200


def test_model_info_shows_no_filesystem_path(make_client, run_dir: Path, case_index) -> None:
    body = make_client().get("/v1/model").json()
    strings: list[str] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, str):
            strings.append(node)

    walk(body)
    assert strings and body["index"]["manifest"] == "manifest.jsonl"
    assert "model_dir" not in body
    for s in strings:
        assert not s.startswith("/") and str(run_dir) not in s and str(case_index.root) not in s, s


def test_bomb_message_states_the_configured_limit(make_client) -> None:
    buf = io.BytesIO()
    Image.new("L", (12000, 12000)).save(buf, format="PNG")
    error = assert_error(make_client().post("/v1/report", files=[image_part(buf.getvalue())]), 413, "image_too_large")
    assert "40000000" in error["message"] and "80000000" not in error["message"]


def test_no_thumbnail_from_outside_the_index_folder(make_copilot, case_index, tmp_path: Path) -> None:
    root = tmp_path / "cases"
    (root / "images").mkdir(parents=True)
    save_png(picture(7), tmp_path / "outside.png")
    save_png(picture(8), root / "images" / "inside.png")
    (root / "images" / "link.png").symlink_to(tmp_path / "outside.png")
    images = ["images/inside.png", "../outside.png", "images/link.png", str(tmp_path / "outside.png")]
    n = len(case_index)
    entries = [{**e, "image": images[i % len(images)]} for i, e in enumerate(case_index.entries)]
    index = EmbeddingIndex(case_index.image_embeds, case_index.text_embeds, entries, root=root)
    copilot = make_copilot()
    copilot.index = index
    hits = _client(copilot).post("/v1/retrieve", data={"text": "effusion", "k": str(n), "mode": "text"}).json()["hits"]
    shown = {h["image"]: h["thumbnail"] is not None for h in hits}
    assert shown == {"images/inside.png": True, "../outside.png": False, "images/link.png": False,
                     str(tmp_path / "outside.png"): False}
