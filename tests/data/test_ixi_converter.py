"""The IXI NIfTI converter on a miniature IXI download written by the test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")

from medunifier.data.converters import ConversionError, convert  # noqa: E402
from medunifier.data.images import load_image  # noqa: E402
from medunifier.data.manifest import read_manifest  # noqa: E402


def _volume(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4) if affine is None else affine), str(path))


@pytest.fixture
def ixi(tmp_path: Path) -> Path:
    root = tmp_path / "IXI"
    rng = np.random.default_rng(0)
    for subject in ("IXI002-Guys-0828", "IXI012-HH-1211", "IXI013-HH-1212"):
        base = rng.random((20, 24, 16))
        base[:, :, :] += np.arange(16)[None, None, :]  # each axial slice has its own level
        _volume(root / "IXI-T2" / f"{subject}-T2.nii.gz", base)
        _volume(root / "IXI-PD" / f"{subject}-PD.nii.gz", 2.0 * base + 1.0)  # the same grid (dual echo)
        _volume(root / "IXI-T1" / f"{subject}-T1.nii.gz", rng.random((18, 24, 16)))  # acquired apart
    return root


def test_ixi_pairs_on_one_grid_become_translate_records(ixi: Path, tmp_path: Path) -> None:
    summary = convert("ixi", ixi, tmp_path / "out", pairs="t2:pd,pd:t2,t1:t2", val_fraction=0.0,
                      test_fraction=1 / 3)
    records, report = read_manifest(tmp_path / "out" / "manifest.jsonl", strict=True)
    # keep=0.5 of 16 slices from index 4, every 4th: slices 4 and 8; 3 subjects x 2 pairs x 2 slices
    assert report.skipped == 0 and len(records) == summary.records == 12
    assert summary.filtered["unregistered_pair"] == 3  # T1 is on another grid in every subject
    assert {r.split for r in records} == {"train", "test"}
    assert len({r.split for r in records if r.subject == "IXI002-Guys-0828"}) == 1  # split by subject
    r = next(r for r in records if r.source_kind == "t2" and r.slice == 1)
    assert r.task == "translate" and r.instruction == "translate to a PD-weighted image" and r.modality == "mri"
    source, target = load_image(tmp_path / "out" / r.image), load_image(tmp_path / "out" / r.target_image)
    assert source.shape == target.shape == (24, 20)  # axial slice (x, y) shown with y as rows
    # PD = 2 T2 + 1 on one grid: after per-volume percentile scaling the two slices agree
    assert np.abs(source - target).max() < 0.02
    assert source.mean() > 0.3  # slice 8 of 16: the middle of the intensity ramp


def test_ixi_refuses_bad_pairs_and_empty_folders(ixi: Path, tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="source:target"):
        convert("ixi", ixi, tmp_path / "a", pairs="t2:ct")
    with pytest.raises(ConversionError, match="no IXI NIfTI files"):
        convert("ixi", tmp_path / "empty_dir_missing", tmp_path / "b")
