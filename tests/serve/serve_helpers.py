"""Helpers of the serving tests: a small saved model, image bytes in every accepted format, a fake generator."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from medunifier.data.images import save_png
from medunifier.data.manifest import write_manifest
from shrunk_config import SMALL_MODEL

# the tiny preset shrunk further (as in tests/model/test_medunifier.py), so that a random-init model saves,
# loads and answers in milliseconds
SMALL = [*SMALL_MODEL, "encoder.dropout=0.0", "text.max_length=24"]

CASES = [
    ("case-0", "FINDINGS: Mild cardiomegaly. No pleural effusion. IMPRESSION: Enlarged heart.", {"cardiomegaly": 1}),
    ("case-1", "FINDINGS: Small left pleural effusion. IMPRESSION: Left effusion.", {"pleural_effusion": 1}),
    ("case-2", "FINDINGS: The lungs are clear. IMPRESSION: No acute process.", {"no_finding": 1}),
    ("case-3", "FINDINGS: Right upper lobe consolidation. IMPRESSION: Pneumonia.", {"consolidation": 1}),
    ("case-4", "FINDINGS: Bibasilar atelectasis. IMPRESSION: Atelectasis.", {"atelectasis": 1}),
    ("case-5", "FINDINGS: Diffuse interstitial edema. IMPRESSION: Pulmonary edema.", {"edema": 1}),
]


def build_model_dir(root: Path) -> Path:
    """A random-init small MedUnifier saved as a run folder (`root/run/model`); returns the run folder."""
    from medunifier.config import load_config
    from medunifier.model.medunifier import MedUnifier

    torch.manual_seed(0)
    model = MedUnifier(load_config("tiny", [*SMALL, "i2i.enabled=true", "i2i.channels=8"]))
    model.save_pretrained(root / "run" / "model")
    return root / "run"


def picture(seed: int, shape: tuple[int, ...] = (48, 40)) -> np.ndarray:
    """A smooth random grey picture, float32 in [0, 1]."""
    rng = np.random.default_rng(seed)
    small = rng.random((6, 5)).astype(np.float32)
    img = Image.fromarray(small, mode="F").resize((shape[1], shape[0]), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(img, dtype=np.float32), 0, 1)


def write_cases(root: Path) -> Path:
    """Six PNG cases with reports and labels, `root/manifest.jsonl` (paths relative to root)."""
    records = []
    for i, (case_id, text, labels) in enumerate(CASES):
        image = f"images/{case_id}.png"
        save_png(picture(100 + i), root / image)
        records.append({"id": case_id, "image": image, "text": text, "labels": labels, "split": "test"})
    path = root / "manifest.jsonl"
    write_manifest(records, path)
    return path


def encode(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def dicom_dataset(arr: np.ndarray, photometric: str = "MONOCHROME2"):
    """A DICOM dataset (16-bit grey) holding `arr`."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = (np.clip(arr, 0, 1) * 4000).astype(np.uint16).tobytes()
    return ds


def dicom_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    dicom_dataset(arr).save_as(buf, enforce_file_format=True)
    return buf.getvalue()


class FakeGenerator:
    """A deterministic stand-in for the text-to-image sampler (the real one lives in medunifier.generate).

    synthesize: noise seeded by (seed, image index), so the same seed gives the same images.
    edit: blends the source toward seeded noise by `strength` (0 leaves the image unchanged).
    """

    def __init__(self, channels: int = 1, size: int = 32) -> None:
        self.channels, self.size = channels, size
        self.calls: list[tuple[str, dict]] = []

    def _noise(self, seed: int | None, i: int) -> Tensor:
        g = torch.Generator().manual_seed((seed or 0) * 1000 + i)
        return torch.rand(self.channels, self.size, self.size, generator=g) * 2 - 1  # normalised [-1, 1]

    def synthesize(self, texts: list[str], n: int, *, guidance: float, steps: int, seed: int | None) -> Tensor:
        self.calls.append(("synthesize", {"texts": texts, "n": n, "guidance": guidance, "steps": steps, "seed": seed}))
        return torch.stack([self._noise(seed, i) for i in range(len(texts) * n)])

    def edit(self, pixel_values: Tensor, texts: list[str], *, strength: float, guidance: float, steps: int,
             seed: int | None) -> Tensor:
        self.calls.append(("edit", {"texts": texts, "strength": strength, "steps": steps, "seed": seed}))
        noise = torch.stack([self._noise(seed, i) for i in range(pixel_values.shape[0])])
        return (1 - strength) * pixel_values + strength * noise
