"""An embedding index of a manifest's cases for similar-case retrieval, stored as safetensors + JSON.

Layout of an index folder (no pickle anywhere):

    embeddings.safetensors   image [N, Q, E]  per-query ITC image embeddings (L2-normalised)
                             text  [N, E]     ITC text embeddings of the reports (L2-normalised)
    index.json               {"format", "version", "model": {"dir", "checksum"}, "manifest", "root",
                              "image_root", "count", "entries": [{"id", "text", "image", "labels"}]}

`image` paths stay relative to the manifest's folder (`root`), as in the manifest; a thumbnail is served
only when its path resolves inside `image_root` (the manifest's folder unless the index was built with
`--image-root`), symlinks followed.

Search is cosine similarity, in one of two ways for each query modality:

    image query, mode "text"  (default)  score_n = max_q <g_q, t_n>          the paper's ITC similarity
                                         against the indexed *reports* (cross-modal, like retrieval eval)
    image query, mode "image"            score_n = <mean_q g_q, mean_q g_nq> with both means renormalised:
                                         image-to-image similarity of cases
    text query,  mode "image" (default)  score_n = max_q <g_nq, t>           text-to-image (ITC)
    text query,  mode "text"             score_n = <t, t_n>                  report-to-report

The two single-vector modes use faiss (IndexFlatIP, exact) when it is installed, else torch; the
max-over-queries modes always use torch (chunked over the index).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from medunifier.model.protocols import ImageTextModel

INDEX_FORMAT = "medunifier-index"
INDEX_VERSION = 1
EMBEDDINGS_NAME = "embeddings.safetensors"
META_NAME = "index.json"

Mode = Literal["auto", "text", "image"]


@dataclass
class Hit:
    """One retrieved case."""

    rank: int
    index: int
    id: str
    score: float
    text: str
    image: str | None
    labels: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _faiss() -> Any | None:
    try:
        import faiss  # optional: exact inner-product search on large indexes
    except ImportError:
        return None
    return faiss


def cosine_topk(queries: Tensor, keys: Tensor, k: int, use_faiss: bool | None = None) -> tuple[Tensor, Tensor]:
    """Top-k inner products of L2-normalised rows. queries [B, E], keys [N, E] -> (scores [B, k], idx [B, k]).

    use_faiss: None = when installed, True = require it, False = torch only.
    """
    k = min(k, keys.shape[0])
    faiss = _faiss() if use_faiss is not False else None
    if use_faiss and faiss is None:
        raise ImportError("faiss is not installed (pip install faiss-cpu)")
    if faiss is not None:
        index = faiss.IndexFlatIP(keys.shape[1])
        index.add(keys.float().contiguous().numpy())
        scores, idx = index.search(queries.float().contiguous().numpy(), k)
        return torch.from_numpy(scores), torch.from_numpy(idx).long()
    scores = queries.float() @ keys.float().t()  # [B, N]
    return scores.topk(k, dim=1)


def max_over_queries_topk(
    image_queries: Tensor, text_keys: Tensor, k: int, chunk: int = 4096
) -> tuple[Tensor, Tensor]:
    """Image queries [B, Q, E] against texts [N, E]: score = max_q cos; -> (scores [B, k], idx [B, k])."""
    cols = [torch.einsum("bqe,ne->bnq", image_queries.float(), text_keys[i : i + chunk].float()).amax(-1)
            for i in range(0, text_keys.shape[0], chunk)]
    return torch.cat(cols, dim=1).topk(min(k, text_keys.shape[0]), dim=1)


def text_to_images_topk(text_queries: Tensor, image_keys: Tensor, k: int, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Texts [B, E] against images [N, Q, E]: score = max_q cos; -> (scores [B, k], idx [B, k])."""
    cols = [torch.einsum("be,nqe->bnq", text_queries.float(), image_keys[i : i + chunk].float()).amax(-1)
            for i in range(0, image_keys.shape[0], chunk)]
    return torch.cat(cols, dim=1).topk(min(k, image_keys.shape[0]), dim=1)


class EmbeddingIndex:
    """Embeddings of N cases plus their ids, reports, image paths and labels."""

    def __init__(self, image_embeds: Tensor, text_embeds: Tensor, entries: list[dict[str, Any]],
                 meta: dict[str, Any] | None = None, root: str | Path | None = None,
                 image_root: str | Path | None = None):
        if image_embeds.ndim != 3 or text_embeds.ndim != 2:
            raise ValueError(f"expected image [N, Q, E] and text [N, E], got {tuple(image_embeds.shape)} "
                             f"and {tuple(text_embeds.shape)}")
        n = len(entries)
        if image_embeds.shape[0] != n or text_embeds.shape[0] != n or image_embeds.shape[2] != text_embeds.shape[1]:
            raise ValueError(f"index mismatch: {n} entries, image {tuple(image_embeds.shape)}, "
                             f"text {tuple(text_embeds.shape)}")
        self.image_embeds = image_embeds.float()  # [N, Q, E]
        self.text_embeds = text_embeds.float()  # [N, E]
        self.image_mean = F.normalize(self.image_embeds.mean(dim=1), dim=-1)  # [N, E]
        self.entries = entries
        self.meta = dict(meta or {})
        self.root = Path(root) if root is not None else None
        self.image_root = Path(image_root) if image_root is not None else self.root

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def model_checksum(self) -> str | None:
        return (self.meta.get("model") or {}).get("checksum")

    def summary(self) -> dict[str, Any]:
        return {"count": len(self), "embed_dim": int(self.text_embeds.shape[1]),
                "queries": int(self.image_embeds.shape[1]), "manifest": self.meta.get("manifest"),
                "model_checksum": self.model_checksum, "created": self.meta.get("created")}

    def image_path(self, i: int) -> Path | None:
        """Absolute path of case i's image, or None when the index has no root, the file is gone or its path
        leaves the image root."""
        from medunifier.data.manifest import UnsafePathError, contained_path

        rel = self.entries[i].get("image")
        if not isinstance(rel, str) or self.root is None:
            return None
        try:
            path = contained_path(self.root, rel, self.image_root)
        except UnsafePathError:
            return None
        return path if path.is_file() else None

    # -------------------------------------------------------------------------------------- search

    def search_image(self, query: Tensor, k: int = 5, mode: Mode = "auto",
                     use_faiss: bool | None = None) -> list[list[Hit]]:
        """Image queries [B, Q, E] (or one [Q, E]); mode "text" (default) or "image"; one hit list per query."""
        query = query.unsqueeze(0) if query.ndim == 2 else query
        mode = "text" if mode == "auto" else mode
        if mode == "text":
            scores, idx = max_over_queries_topk(query.cpu(), self.text_embeds, k)
        elif mode == "image":
            mean = F.normalize(query.float().mean(dim=1), dim=-1).cpu()  # [B, E]
            scores, idx = cosine_topk(mean, self.image_mean, k, use_faiss)
        else:
            raise ValueError(f"mode must be 'auto', 'text' or 'image', got {mode!r}")
        return self._hits(scores, idx)

    def search_text(self, query: Tensor, k: int = 5, mode: Mode = "auto",
                    use_faiss: bool | None = None) -> list[list[Hit]]:
        """Text queries [B, E] (or one [E]); mode "image" (default) or "text"; one hit list per query."""
        query = query.unsqueeze(0) if query.ndim == 1 else query
        mode = "image" if mode == "auto" else mode
        if mode == "image":
            scores, idx = text_to_images_topk(query.cpu(), self.image_embeds, k)
        elif mode == "text":
            scores, idx = cosine_topk(query.cpu().float(), self.text_embeds, k, use_faiss)
        else:
            raise ValueError(f"mode must be 'auto', 'text' or 'image', got {mode!r}")
        return self._hits(scores, idx)

    def _hits(self, scores: Tensor, idx: Tensor) -> list[list[Hit]]:
        out = []
        for row_scores, row_idx in zip(scores.tolist(), idx.tolist()):
            hits = []
            for rank, (score, i) in enumerate(zip(row_scores, row_idx), start=1):
                e = self.entries[i]
                hits.append(Hit(rank=rank, index=i, id=str(e["id"]), score=float(score), text=e.get("text", ""),
                                image=e.get("image"), labels=dict(e.get("labels") or {})))
            out.append(hits)
        return out

    # ------------------------------------------------------------------------------------ save/load

    def save(self, out_dir: str | Path) -> Path:
        """Write embeddings.safetensors and index.json into `out_dir` (created); returns the folder."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({"image": self.image_embeds.contiguous(), "text": self.text_embeds.contiguous()},
                  str(out / EMBEDDINGS_NAME), metadata={"format": INDEX_FORMAT, "version": str(INDEX_VERSION)})
        meta = {**self.meta, "format": INDEX_FORMAT, "version": INDEX_VERSION, "count": len(self),
                "root": str(self.root) if self.root is not None else None,
                "image_root": str(self.image_root) if self.image_root is not None else None, "entries": self.entries}
        tmp = out / f".{META_NAME}.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        tmp.replace(out / META_NAME)
        return out

    @classmethod
    def load(cls, index_dir: str | Path) -> EmbeddingIndex:
        """Read an index folder written by `save` / `build_index`."""
        index_dir = Path(index_dir)
        meta_path, emb_path = index_dir / META_NAME, index_dir / EMBEDDINGS_NAME
        if not meta_path.is_file() or not emb_path.is_file():
            raise FileNotFoundError(f"{index_dir}: not an index folder (needs {META_NAME} and {EMBEDDINGS_NAME})")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != INDEX_FORMAT:
            raise ValueError(f"{meta_path}: not a medunifier index (format {meta.get('format')!r})")
        if int(meta.get("version", 0)) > INDEX_VERSION:
            raise ValueError(f"{meta_path}: index version {meta.get('version')} is newer than this code "
                             f"({INDEX_VERSION})")
        tensors = load_file(str(emb_path))
        entries = meta.pop("entries")
        root = meta.pop("root", None)
        image_root = meta.pop("image_root", None)
        root_path = Path(root) if root else None
        if root_path is not None and not root_path.is_dir():
            root_path = None  # moved to another machine: search works, thumbnails do not
        image_root_path = Path(image_root) if image_root and root_path is not None else root_path
        return cls(tensors["image"], tensors["text"], entries, meta=meta, root=root_path, image_root=image_root_path)


def build_index(
    model: ImageTextModel,
    manifest: str | Path,
    out: str | Path | None = None,
    split: str | None = None,
    batch_size: int = 64,
    model_meta: dict[str, Any] | None = None,
) -> EmbeddingIndex:
    """Embed every record with an image of `manifest` (its `split` only, when given) and save to `out`.

    model: anything with the MedUnifier inference API (`encode_image`, `encode_text`, `tokenize`,
    `config.image`). model_meta: {"dir", "checksum"} of the model, stored so a query can load the same model
    and a server can refuse an index built by another one.
    """
    from medunifier.data.manifest import get_image_root
    from medunifier.eval.common import encode_images, encode_texts, load_split, record_text

    manifest = Path(manifest)
    records, root = load_split(manifest, split)
    records = [r for r in records if r.image is not None]
    if not records:
        raise ValueError(f"{manifest}: no record with an image" + (f" in split '{split}'" if split else ""))
    image_embeds = encode_images(model, records, root, batch_size)  # [N, Q, E]
    texts = [record_text(r) for r in records]
    text_embeds = encode_texts(model, texts)  # [N, E]
    entries = [{"id": r.id, "text": t, "image": r.image, "labels": dict(r.labels)} for r, t in zip(records, texts)]
    meta = {"model": dict(model_meta or {}), "manifest": str(manifest.resolve()), "split": split,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    index = EmbeddingIndex(image_embeds, text_embeds, entries, meta=meta, root=root.resolve(),
                           image_root=get_image_root() or root.resolve())
    if out is not None:
        index.save(out)
    return index
