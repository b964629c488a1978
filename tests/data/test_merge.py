"""`medunifier data merge`: several sources in one manifest, image paths rewritten, ids kept unique."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medunifier.cli import app
from medunifier.data.dataset import ManifestDataset
from medunifier.data.manifest import ManifestError, load_records, merge_manifests


def _copy_with_new_ids(manifest: Path, folder: Path, prefix: str) -> Path:
    folder.mkdir(parents=True)
    shutil.copytree(manifest.parent / "images", folder / "images")
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    for line in lines:
        line["id"] = prefix + line["id"]
        line["modality"] = "ct"
    out = folder / "manifest.jsonl"
    out.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return out


def test_merge_rewrites_paths_and_loads(tiny_manifest: Path, tmp_path: Path) -> None:
    other = _copy_with_new_ids(tiny_manifest, tmp_path / "sources" / "ct", "ct-")
    out = tmp_path / "merged" / "deeper" / "manifest.jsonl"
    counts = merge_manifests([tiny_manifest, other], out)
    assert list(counts.values()) == [12, 12]
    assert load_records(out) == []  # its paths leave its folder: refused without an image root
    records = load_records(out, image_root=tmp_path)
    assert len(records) == 24 and len({r.id for r in records}) == 24
    assert records[0].image.startswith("..") and records[-1].image.startswith("..")
    # every rewritten path points at the same file as before
    originals = {r.id: tiny_manifest.parent / r.image for r in load_records(tiny_manifest)}
    assert all((out.parent / r.image).resolve() == originals[r.id].resolve() for r in records if r.id in originals)
    dataset = ManifestDataset(records, root=out.parent, image_size=16, channels=1, image_root=tmp_path)
    assert dataset[23]["pixel_values"].shape == (1, 16, 16) and dataset[23]["modality"] == "ct"


def test_merge_refuses_duplicate_ids(tiny_manifest: Path, tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="tiny-00"):
        merge_manifests([tiny_manifest, tiny_manifest], tmp_path / "m.jsonl")
    assert not (tmp_path / "m.jsonl").exists()
    result = CliRunner().invoke(app, ["data", "merge", str(tiny_manifest), str(tiny_manifest),
                                      "--out", str(tmp_path / "m.jsonl")])
    assert result.exit_code == 2 and "unique" in result.output
