"""Image and mask paths stay inside the manifest's folder (or an explicit image root): traversal, absolute
paths and symlinks that leave are refused per record, in reading, training, eval and the index."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medunifier.cli import app
from medunifier.data.dataset import ManifestDataset
from medunifier.data.images import save_png
from medunifier.data.manifest import (
    ManifestError,
    Record,
    UnsafePathError,
    contained_path,
    read_manifest,
    set_image_root,
)
from medunifier.eval.common import ImageRecords
from medunifier.serve.index import EmbeddingIndex


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    """data/manifest.jsonl with one good image inside, plus a valid image outside data/ (secret.png) and a
    symlink inside data/ that points at it."""
    data = tmp_path / "data"
    save_png(np.full((16, 16), 0.5, np.float32), data / "images" / "ok.png")
    save_png(np.full((16, 16), 0.9, np.float32), tmp_path / "secret.png")
    (data / "images" / "link.png").symlink_to(tmp_path / "secret.png")
    (data / "images" / "inner.png").symlink_to(data / "images" / "ok.png")  # stays inside: allowed
    return {"tmp": tmp_path, "data": data, "secret": tmp_path / "secret.png"}


def _write(data: Path, images: list[str], **extra) -> Path:
    lines = [json.dumps({"id": f"r{i}", "image": image, "text": "x", **extra}) for i, image in enumerate(images)]
    path = data / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_manifest_refuses_traversal_absolute_and_leaving_symlinks(layout) -> None:
    path = _write(layout["data"], ["images/ok.png", "../secret.png", str(layout["secret"]), "/etc/passwd",
                                   "images/link.png", "images/inner.png", "images/../images/ok.png",
                                   "C:\\\\Windows\\\\x.png"])
    records, report = read_manifest(path)
    assert [r.id for r in records] == ["r0", "r5", "r6"]
    assert report.by_reason() == {"unsafe_path": 5}
    by_line = {p.line: p.message for p in report.problems}
    assert set(by_line) == {2, 3, 4, 5, 8}
    assert "resolves outside" in by_line[2] and "field 'image'" in by_line[2] and "record 'r1'" in by_line[2]
    assert "absolute path" in by_line[3] and "absolute path" in by_line[4] and "absolute path" in by_line[8]
    assert "symlink" in by_line[5]
    with pytest.raises(ManifestError, match=r"manifest\.jsonl:2"):
        read_manifest(path, strict=True)


def test_mask_and_target_paths_are_checked_too(layout) -> None:
    path = layout["data"] / "manifest.jsonl"
    path.write_text(json.dumps({"id": "e", "image": "images/ok.png", "task": "edit", "target_image": "images/ok.png",
                                "edit_region": "../secret.png"}) + "\n"
                    + json.dumps({"id": "t", "image": "images/ok.png", "task": "edit",
                                  "target_image": "../secret.png"}) + "\n")
    records, report = read_manifest(path)
    assert records == [] and "field 'edit_region'" in report.errors[0] and "field 'target_image'" in report.errors[1]


def test_image_root_widens_the_allowed_folder(layout) -> None:
    path = _write(layout["data"], ["../secret.png", "images/link.png", "/etc/passwd"])
    records, _ = read_manifest(path, image_root=layout["tmp"])
    assert [r.id for r in records] == ["r0", "r1"]  # absolute paths stay refused
    set_image_root(layout["tmp"])
    try:
        assert [r.id for r in read_manifest(path)[0]] == ["r0", "r1"]
    finally:
        set_image_root(None)
    assert read_manifest(path)[0] == []


def test_dataset_refuses_an_escaping_record_given_directly(layout, capsys) -> None:
    """Records handed over as a list skip read_manifest: the dataset checks again when it loads."""
    records = [Record(id="ok", image="images/ok.png"), Record(id="out", image="../secret.png"),
               Record(id="link", image="images/link.png")]
    ds = ManifestDataset(records, root=layout["data"], image_size=8, channels=1)
    assert isinstance(ds[0]["pixel_values"], torch.Tensor)
    assert ds[1] is None and ds[2] is None and ds.skipped_ids == ["link", "out"]
    assert "resolves outside" in capsys.readouterr().err
    # a manifest path gives the same answer through read_manifest
    path = _write(layout["data"], ["images/ok.png", "../secret.png"])
    assert len(ManifestDataset(path, image_size=8, channels=1)) == 1


def test_eval_images_and_record_paths_are_contained(layout) -> None:
    with pytest.raises(UnsafePathError):
        Record(id="x", image="../secret.png").image_path(layout["data"])
    cfg = type("C", (), {"size": 8, "channels": 1, "mean": 0.5, "std": 0.5})()
    with pytest.raises(UnsafePathError):
        ImageRecords([Record(id="x", image="images/link.png")], layout["data"], cfg)[0]
    assert contained_path(layout["data"], "images/ok.png") == layout["data"] / "images" / "ok.png"


def test_index_serves_no_thumbnail_outside_its_root(layout) -> None:
    entries = [{"id": "a", "image": "images/ok.png"}, {"id": "b", "image": "../secret.png"},
               {"id": "c", "image": "images/link.png"}, {"id": "d", "image": str(layout["secret"])}]
    index = EmbeddingIndex(torch.zeros(4, 2, 3), torch.zeros(4, 3), entries, root=layout["data"])
    assert index.image_path(0) == layout["data"] / "images" / "ok.png"
    assert [index.image_path(i) for i in (1, 2, 3)] == [None, None, None]
    saved = EmbeddingIndex.load(index.save(layout["tmp"] / "index"))
    assert saved.image_path(0) is not None and saved.image_path(1) is None


def test_cli_image_root_option(layout) -> None:
    path = _write(layout["data"], ["images/ok.png", "../secret.png"])
    runner = CliRunner()
    plain = runner.invoke(app, ["data", "info", str(path), "--json"])
    assert plain.exit_code == 0 and '"records": 1' in plain.output and "resolves outside" in plain.output
    wide = runner.invoke(app, ["--image-root", str(layout["tmp"]), "data", "info", str(path), "--json"])
    assert wide.exit_code == 0 and '"records": 2' in wide.output
    missing = runner.invoke(app, ["--image-root", str(layout["tmp"] / "nope"), "data", "info", str(path)])
    assert missing.exit_code == 2 and "not a folder" in missing.output
    # the next command without the option is back to the manifest's folder
    assert '"records": 1' in runner.invoke(app, ["data", "info", str(path), "--json"]).output
