"""Synthetic images as DICOM Secondary Capture: readable by pydicom, marked synthetic, new UIDs, exact pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from medunifier.data.images import load_image
from medunifier.generate.dicom import write_secondary_capture


def ramp(h: int = 24, w: int = 40) -> np.ndarray:
    return (np.arange(h * w).reshape(h, w) * 7 % 256).astype(np.uint8)


def test_secondary_capture_is_readable_and_marked_synthetic(tmp_path: Path) -> None:
    image = ramp()
    path = write_secondary_capture(image, tmp_path / "a.dcm", prompt="Large left pleural effusion", seed=11)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.7" == ds.SOPClassUID
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"] and "SYNTHETIC" in ds.ImageType
    assert ds.ConversionType == "SYN" and ds.BurnedInAnnotation == "NO"
    for field in ("SeriesDescription", "ImageComments", "DerivationDescription"):
        assert "synthetic" in str(ds.data_element(field).value).lower(), field
    assert "Large left pleural effusion" in ds.ImageComments and "seed 11" in ds.DerivationDescription
    assert str(ds.PatientName) == "SYNTHETIC^IMAGE"
    assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsAllocated == 8
    assert np.array_equal(ds.pixel_array, image)
    np.testing.assert_allclose(load_image(path), image / 255.0, atol=1e-6)  # the project's own DICOM reader


def test_new_uids_and_shared_series(tmp_path: Path) -> None:
    a = pydicom.dcmread(write_secondary_capture(ramp(), tmp_path / "a.dcm", prompt="x", study_uid="1.2.3.4",
                                                series_uid="1.2.3.4.5", instance_number=1))
    b = pydicom.dcmread(write_secondary_capture(ramp(), tmp_path / "b.dcm", prompt="x", study_uid="1.2.3.4",
                                                series_uid="1.2.3.4.5", instance_number=2))
    c = pydicom.dcmread(write_secondary_capture(ramp(), tmp_path / "c.dcm", prompt="x"))
    assert a.SeriesInstanceUID == b.SeriesInstanceUID == "1.2.3.4.5" and b.InstanceNumber == 2
    assert len({a.SOPInstanceUID, b.SOPInstanceUID, c.SOPInstanceUID}) == 3
    assert c.StudyInstanceUID not in ("1.2.3.4", a.SOPInstanceUID) and c.SeriesInstanceUID != a.SeriesInstanceUID


def test_sixteen_bit_from_float(tmp_path: Path) -> None:
    image = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    ds = pydicom.dcmread(write_secondary_capture(image, tmp_path / "f.dcm", prompt="edema", bits=16, kind="edit"))
    assert ds.BitsStored == 16 and ds.pixel_array.dtype == np.uint16
    assert ds.pixel_array.max() == 65535 and ds.pixel_array.min() == 0
    assert "edit" in ds.SeriesDescription


def test_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bits"):
        write_secondary_capture(ramp(), tmp_path / "x.dcm", prompt="x", bits=12)
    with pytest.raises(ValueError, match="grey"):
        write_secondary_capture(np.zeros((2, 3, 4, 5)), tmp_path / "x.dcm", prompt="x")
