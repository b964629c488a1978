"""The embedding index: file format (safetensors + JSON), exact cosine search, loading rules."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from serve_helpers import CASES

from medunifier.serve.index import (
    EmbeddingIndex,
    build_index,
    cosine_topk,
    max_over_queries_topk,
    text_to_images_topk,
)


def random_index(n: int = 40, q: int = 4, e: int = 16, seed: int = 0) -> EmbeddingIndex:
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, q, e, generator=g), dim=-1)
    text = F.normalize(torch.randn(n, e, generator=g), dim=-1)
    entries = [{"id": f"c{i}", "text": f"report {i}", "image": f"images/{i}.png", "labels": {}} for i in range(n)]
    return EmbeddingIndex(image, text, entries)


def test_files_are_safetensors_and_json_with_relative_paths(index_dir, case_manifest, base_copilot) -> None:
    meta = json.loads((index_dir / "index.json").read_text())
    assert meta["format"] == "medunifier-index" and meta["count"] == len(CASES)
    assert [e["id"] for e in meta["entries"]] == [c[0] for c in CASES]
    assert meta["entries"][1] == {"id": "case-1", "text": CASES[1][1], "image": "images/case-1.png",
                                  "labels": CASES[1][2]}
    assert meta["root"] == str(case_manifest.parent.resolve())
    assert meta["model"]["checksum"] == base_copilot.checksum
    tensors = load_file(str(index_dir / "embeddings.safetensors"))
    q, e = base_copilot.model.config.encoder.num_queries, base_copilot.model.config.encoder.embed_dim
    assert tensors["image"].shape == (len(CASES), q, e) and tensors["text"].shape == (len(CASES), e)
    torch.testing.assert_close(tensors["text"].norm(dim=-1), torch.ones(len(CASES)))


def test_save_load_round_trip(tmp_path) -> None:
    index = random_index()
    index.save(tmp_path / "ix")
    loaded = EmbeddingIndex.load(tmp_path / "ix")
    torch.testing.assert_close(loaded.image_embeds, index.image_embeds)
    torch.testing.assert_close(loaded.text_embeds, index.text_embeds)
    assert loaded.entries == index.entries and loaded.root is None


@pytest.mark.parametrize("k", [1, 5, 40])
def test_search_matches_brute_force(k) -> None:
    index = random_index()
    g = torch.Generator().manual_seed(1)
    img_q = F.normalize(torch.randn(3, 4, 16, generator=g), dim=-1)
    txt_q = F.normalize(torch.randn(3, 16, generator=g), dim=-1)
    img, txt = index.image_embeds.numpy(), index.text_embeds.numpy()
    expected = {
        "i2t": np.einsum("bqe,ne->bnq", img_q.numpy(), txt).max(-1),
        "t2i": np.einsum("be,nqe->bnq", txt_q.numpy(), img).max(-1),
        "t2t": txt_q.numpy() @ txt.T,
    }
    mean_q = img_q.mean(1).numpy()
    mean_i = img.mean(1)
    expected["i2i"] = (mean_q / np.linalg.norm(mean_q, axis=-1, keepdims=True)) @ (
        mean_i / np.linalg.norm(mean_i, axis=-1, keepdims=True)).T
    got = {
        "i2t": index.search_image(img_q, k, mode="text"),
        "i2i": index.search_image(img_q, k, mode="image", use_faiss=False),
        "t2i": index.search_text(txt_q, k, mode="image"),
        "t2t": index.search_text(txt_q, k, mode="text", use_faiss=False),
    }
    for name, hits in got.items():
        for b in range(3):
            order = np.argsort(-expected[name][b])[:k]
            assert [h.index for h in hits[b]] == order.tolist(), name
            np.testing.assert_allclose([h.score for h in hits[b]], expected[name][b][order], atol=1e-5)
    assert [h.index for h in index.search_image(img_q[0], k)[0]] == [h.index for h in got["i2t"][0]]


def test_chunked_max_over_queries_equals_unchunked() -> None:
    index = random_index(n=50)
    q = F.normalize(torch.randn(2, 4, 16), dim=-1)
    a = max_over_queries_topk(q, index.text_embeds, 7, chunk=8)
    b = max_over_queries_topk(q, index.text_embeds, 7, chunk=4096)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    t = F.normalize(torch.randn(2, 16), dim=-1)
    c = text_to_images_topk(t, index.image_embeds, 7, chunk=3)
    d = text_to_images_topk(t, index.image_embeds, 7)
    torch.testing.assert_close(c[1], d[1])


def test_faiss_gives_the_torch_result_when_installed() -> None:
    pytest.importorskip("faiss", reason="faiss is optional (pip install faiss-cpu)")
    index = random_index()
    q = F.normalize(torch.randn(4, 16), dim=-1)
    a = cosine_topk(q, index.text_embeds, 5, use_faiss=True)
    b = cosine_topk(q, index.text_embeds, 5, use_faiss=False)
    torch.testing.assert_close(a[1], b[1])
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=0)


def test_loading_refuses_what_is_not_an_index(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not an index"):
        EmbeddingIndex.load(tmp_path)
    index = random_index()
    index.save(tmp_path / "ix")
    meta = json.loads((tmp_path / "ix" / "index.json").read_text())
    (tmp_path / "ix" / "index.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(ValueError, match="newer"):
        EmbeddingIndex.load(tmp_path / "ix")
    (tmp_path / "ix" / "index.json").write_text(json.dumps({**meta, "format": "other"}))
    with pytest.raises(ValueError, match="not a medunifier index"):
        EmbeddingIndex.load(tmp_path / "ix")
    with pytest.raises(ValueError, match="mismatch"):
        EmbeddingIndex(index.image_embeds[:3], index.text_embeds, index.entries)


def test_a_moved_index_searches_without_thumbnails(index_dir, tmp_path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(index_dir, moved)
    meta = json.loads((moved / "index.json").read_text())
    (moved / "index.json").write_text(json.dumps({**meta, "root": str(tmp_path / "gone")}))
    index = EmbeddingIndex.load(moved)
    assert index.root is None and index.image_path(0) is None
    assert len(index.search_text(index.text_embeds[0], 2, mode="text")[0]) == 2


def test_build_index_split_and_empty(base_copilot, case_manifest, tmp_path) -> None:
    index = build_index(base_copilot.model, case_manifest, split="test")
    assert len(index) == len(CASES)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"id": "a", "text": "no image"}) + "\n")
    with pytest.raises(ValueError, match="no record with an image"):
        build_index(base_copilot.model, empty)
