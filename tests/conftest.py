"""Shared fixtures: the real-data folder beside the project and a tiny on-disk manifest."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from medunifier.data.findings import FINDINGS
from medunifier.data.images import save_png
from medunifier.data.manifest import write_manifest

DEFAULT_SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` (real public data kept beside the checkout), or $MEDUNIFIER_SHARED_DATA."""
    path = Path(os.environ.get("MEDUNIFIER_SHARED_DATA") or DEFAULT_SHARED_DATA)
    if not path.is_dir():
        pytest.skip(f"real test data not found at {path} (a checkout without ../shared/data; "
                    "set MEDUNIFIER_SHARED_DATA to its location to run this test)")
    return path


TINY_SPLITS = ["train"] * 8 + ["val"] * 2 + ["test"] * 2
TINY_VQA = {3: ("Is there a pleural effusion?", "yes"), 7: ("Is the heart enlarged?", "no"),
            10: ("Which side is the pneumothorax on?", "the left side")}


@pytest.fixture
def tiny_manifest(tmp_path: Path) -> Path:
    """12 random 40x40 grey PNGs and `manifest.jsonl` (8 train / 2 val / 2 test; 9 report + 3 vqa).

    Returns the manifest path; images live in `images/` beside it. Labels cover a few findings
    (others absent from the record, i.e. unknown); report texts mention the positive findings.
    """
    rng = np.random.default_rng(0)
    records = []
    for i in range(12):
        image = f"images/{i:04d}.png"
        save_png(rng.random((40, 40)).astype(np.float32), tmp_path / image)
        labels = {name: int(rng.integers(0, 2)) for name in FINDINGS[:5]}
        positives = [name.replace("_", " ") for name, v in labels.items() if v == 1]
        impression = ", ".join(positives).capitalize() + "." if positives else "No acute cardiopulmonary process."
        record = {
            "id": f"tiny-{i:02d}", "image": image, "split": TINY_SPLITS[i], "modality": "cxr",
            "findings": f"Sample {i}. " + (f"There is {positives[0]}." if positives else "The lungs are clear."),
            "impression": impression, "labels": labels, "task": "report", "source": "tiny",
        }
        record["text"] = f"FINDINGS: {record['findings']} IMPRESSION: {impression}"
        if i in TINY_VQA:
            record.update(task="vqa", question=TINY_VQA[i][0], answer=TINY_VQA[i][1], source="tiny-vqa")
        records.append(record)
    path = tmp_path / "manifest.jsonl"
    write_manifest(records, path)
    return path
