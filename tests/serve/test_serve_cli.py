"""The serving commands: report, classify, index build/query, and serve (a real server on loopback)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from serve_helpers import CASES, dicom_bytes, encode, picture
from typer.testing import CliRunner

from medunifier.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("cli_images")
    (root / "a.png").write_bytes(encode(picture(1)))
    (root / "b.dcm").write_bytes(dicom_bytes(picture(2)))
    return [root / "a.png", root / "b.dcm"]


def test_report_json(run_dir, images) -> None:
    result = invoke("report", *images, "--ckpt", run_dir, "--json", "--num-beams", "1")
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert [Path(r["image"]).name for r in body] == ["a.png", "b.dcm"]
    assert all(isinstance(r["report"], str) for r in body)


def test_report_refuses_unreadable_images(run_dir, tmp_path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    result = invoke("report", bad, "--ckpt", run_dir)
    assert result.exit_code == 2 and "bad.png" in result.output
    result = invoke("report", tmp_path / "missing.png", "--ckpt", tmp_path)
    assert result.exit_code == 2 and "config.json" in result.output


def test_classify_labels(run_dir, images) -> None:
    result = invoke("classify", *images, "--ckpt", run_dir, "--labels", "cardiomegaly,pleural effusion,normal",
                    "--json")
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert list(body[0]["probabilities"]) == ["cardiomegaly", "pleural effusion", "normal"]
    assert sum(body[1]["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    table = invoke("classify", images[0], "--ckpt", run_dir)
    assert table.exit_code == 0 and "pleural_effusion" in table.output
    assert invoke("classify", images[0], "--ckpt", run_dir, "--ensemble", "median").exit_code == 2
    assert invoke("classify", images[0], "--ckpt", run_dir, "--labels", " , ").exit_code == 2


def test_index_build_and_query(run_dir, case_manifest, tmp_path) -> None:
    out = tmp_path / "index"
    result = invoke("index", "build", "--ckpt", run_dir, "--data", case_manifest, "--out", out)
    assert result.exit_code == 0, result.output
    assert (out / "embeddings.safetensors").is_file() and (out / "index.json").is_file()
    assert f"indexed {len(CASES)} cases" in result.output
    result = invoke("index", "query", out, "--text", CASES[2][1], "-k", "3", "--mode", "text", "--json")
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    assert len(hits) == 3 and hits[0]["id"] == "case-2" and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    image = case_manifest.parent / "images" / "case-5.png"
    result = invoke("index", "query", out, "--image", image, "--mode", "image", "--json", "--ckpt", run_dir)
    assert result.exit_code == 0 and json.loads(result.stdout)[0]["id"] == "case-5"
    table = invoke("index", "query", out, "--text", "effusion", "-k", "2")
    assert table.exit_code == 0 and "most similar" in table.output
    assert invoke("index", "query", out).exit_code == 2
    assert invoke("index", "query", out, "--text", "x", "--image", image).exit_code == 2
    assert invoke("index", "query", tmp_path, "--text", "x").exit_code == 2
    bad = invoke("index", "build", "--ckpt", run_dir, "--data", tmp_path / "none.jsonl", "--out", out)
    assert bad.exit_code == 2


def test_serve_refuses_bad_settings(run_dir, tmp_path) -> None:
    result = invoke("serve", "--ckpt", run_dir, "max_k=0")
    assert result.exit_code == 2 and "max_k" in result.output
    result = invoke("serve", "--ckpt", run_dir, "no_such_limit=3")
    assert result.exit_code == 2 and "no_such_limit" in result.output
    short = tmp_path / "token"
    short.write_text("abc\n")
    result = invoke("serve", "--ckpt", run_dir, "--token-file", short)
    assert result.exit_code == 2 and "8 characters" in result.output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_runs_a_real_server_on_loopback(run_dir, index_dir, tmp_path) -> None:
    token = tmp_path / "token"
    token.write_text("a-long-enough-token\n")
    port = free_port()
    cmd = [sys.executable, "-m", "medunifier.cli", "serve", "--ckpt", str(run_dir), "--port", str(port),
           "--index", str(index_dir), "--token-file", str(token), "--device", "cpu", "--threads", "1", "max_k=7"]
    log = tmp_path / "server.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "NO_COLOR": "1"})
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "server did not start in 60 s:\n" + log.read_text()
            time.sleep(0.3)
        assert httpx.get(f"{base}/v1/model").status_code == 401
        auth = {"Authorization": "Bearer a-long-enough-token"}
        info = httpx.get(f"{base}/v1/model", headers=auth).json()
        assert info["index"]["count"] == len(CASES)
        r = httpx.post(f"{base}/v1/report", headers=auth, files={"image": ("a.png", encode(picture(1)), "image/png")},
                       timeout=30)
        assert r.status_code == 200 and len(r.json()["reports"]) == 1
        r = httpx.post(f"{base}/v1/retrieve", headers=auth, data={"text": "effusion", "k": "8"})
        assert r.status_code == 422  # the max_k=7 override is in force
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert f"127.0.0.1:{port}" in log.read_text()
