"""Image reading (PNG, DICOM, refusals) and manifest reading (bad lines reported, nothing else lost)."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medunifier.data.images import (
    ImageLoadError,
    as_array,
    dicom_to_array,
    load_image,
    load_image_bytes,
    save_png,
    to_tensor,
    to_uint8,
)
from medunifier.data.manifest import ManifestError, Record, load_records, read_manifest, write_manifest

# ---------------------------------------------------------------------------------------------- PNG


def test_png_grey_roundtrip(tmp_path: Path):
    pixels = np.random.default_rng(1).integers(0, 256, size=(30, 20), dtype=np.uint8)
    save_png(pixels, tmp_path / "a.png")
    arr = load_image(tmp_path / "a.png")
    assert arr.shape == (30, 20) and arr.dtype == np.float32
    np.testing.assert_allclose(arr, pixels / 255.0, atol=1e-6)


def test_png_colour_and_16bit(tmp_path: Path):
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    arr = load_image(tmp_path / "rgb.png")
    assert arr.shape == (8, 8, 3) and arr[..., 0].min() == 1.0 and arr[..., 1:].max() == 0.0
    deep = np.full((8, 8), 65535 // 4, dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    np.testing.assert_allclose(load_image(tmp_path / "deep.png"), (65535 // 4) / 65535, atol=1e-4)


def test_truncated_png_is_refused_with_path(tmp_path: Path):
    save_png(np.random.default_rng(0).random((64, 64)), tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError) as info:
        load_image(tmp_path / "cut.png")
    assert "cut.png" in str(info.value) and info.value.reason


def test_non_image_named_png(tmp_path: Path):
    (tmp_path / "notes.png").write_text("FINDINGS: this is a text file, not an image\n")
    with pytest.raises(ImageLoadError, match="not a readable image"):
        load_image(tmp_path / "notes.png")


def test_missing_file(tmp_path: Path):
    with pytest.raises(ImageLoadError, match="file not found"):
        load_image(tmp_path / "absent.png")


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def test_decompression_bomb_header_is_refused(tmp_path: Path):
    # a valid PNG header that claims 100000 x 100000 pixels (10^10) with a tiny body
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    body = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
    body += _png_chunk(b"IEND", b"")
    (tmp_path / "bomb.png").write_bytes(body)
    with pytest.raises(ImageLoadError, match="refused"):
        load_image(tmp_path / "bomb.png")
    with pytest.raises(ImageLoadError, match="refused"):
        load_image_bytes(body, name="upload.png")


def test_max_pixels_limit(tmp_path: Path):
    save_png(np.zeros((40, 40)), tmp_path / "small.png")
    assert load_image(tmp_path / "small.png", max_pixels=1600).shape == (40, 40)
    with pytest.raises(ImageLoadError, match="refused"):
        load_image(tmp_path / "small.png", max_pixels=1599)


# -------------------------------------------------------------------------------------------- DICOM


def _write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", **extra) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR image storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    for key, value in extra.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_monochrome1_is_inverted(tmp_path: Path):
    raw = np.array([[0, 100], [200, 4000]], dtype=np.uint16)
    mono1 = load_image(_write_dicom(tmp_path / "m1.dcm", raw, "MONOCHROME1"))
    mono2 = load_image(_write_dicom(tmp_path / "m2.dcm", raw, "MONOCHROME2"))
    assert mono1[1, 1] == pytest.approx(0.0)  # the largest raw value is dark in MONOCHROME1
    assert mono1[0, 0] == pytest.approx(1.0)
    assert mono2[1, 1] == pytest.approx(1.0)
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)


def test_rescale_slope_intercept_applied_before_window(tmp_path: Path):
    raw = np.array([[0, 50], [100, 150]], dtype=np.uint16)
    # stored values -> HU: 2 * raw - 100 = [-100, 0, 100, 200]; window [-100, 200]
    path = _write_dicom(tmp_path / "ct.dcm", raw, RescaleSlope=2, RescaleIntercept=-100)
    ds = pydicom.dcmread(path)
    np.testing.assert_allclose(dicom_to_array(ds, window=(50, 300)), [[0, 1 / 3], [2 / 3, 1]], atol=1e-6)
    # the file's own window (center 50, width 100: HU 0..100) must act on HU, not on stored values:
    # HU 0 (stored 50) is at the bottom of the window, so it is dark
    windowed = load_image(_write_dicom(tmp_path / "ctw.dcm", raw, RescaleSlope=2, RescaleIntercept=-100,
                                       WindowCenter=50, WindowWidth=100))
    assert windowed[0, 1] < 0.05 and windowed[1, 0] > 0.95 and windowed[1, 1] == pytest.approx(1.0)


def test_pydicom_ct_and_mr():
    ct_path = get_testdata_file("CT_small.dcm", download=False)
    mr_path = get_testdata_file("MR_small.dcm", download=False)
    if ct_path is None or mr_path is None:
        pytest.skip("pydicom's test files are not installed")
    ct, mr = load_image(ct_path), load_image(mr_path)
    assert ct.shape == (128, 128) and mr.shape == (64, 64)
    for arr in (ct, mr):
        assert arr.dtype == np.float32 and arr.min() >= 0.0 and arr.max() <= 1.0 and arr.std() > 0.05
    # DICOM recognised from bytes (the 'DICM' preamble) gives the same pixels as from the file
    np.testing.assert_array_equal(load_image_bytes(Path(ct_path).read_bytes()), ct)
    tensor = to_tensor(ct, 32, channels=3)
    assert tensor.shape == (3, 32, 32)


def test_dicom_without_suffix_is_recognised(tmp_path: Path):
    ct_path = get_testdata_file("CT_small.dcm", download=False)
    if ct_path is None:
        pytest.skip("pydicom's test files are not installed")
    (tmp_path / "image_without_suffix").write_bytes(Path(ct_path).read_bytes())
    np.testing.assert_array_equal(load_image(tmp_path / "image_without_suffix"), load_image(ct_path))


def test_real_chest_radiograph_monochrome1():
    path = get_testdata_file("RG1_UNCR.dcm", download=False)
    if path is None:
        pytest.skip("RG1_UNCR.dcm needs the pydicom-data package (pip install pydicom-data)")
    arr = load_image(path)
    assert arr.shape == (1955, 1841) and arr.min() == 0.0 and arr.max() == 1.0
    # correct polarity: the spine/mediastinum (centre) is brighter than both lungs
    h, w = arr.shape
    rows = slice(h // 3, 2 * h // 3)
    centre = arr[rows, w // 2 - 50 : w // 2 + 50].mean()
    left, right = arr[rows, w // 4 - 50 : w // 4 + 50].mean(), arr[rows, 3 * w // 4 - 50 : 3 * w // 4 + 50].mean()
    assert centre > left + 0.1 and centre > right + 0.1
    with pytest.raises(ImageLoadError, match="refused"):
        load_image(path, max_pixels=1_000_000)


def test_to_tensor_and_back():
    arr = np.random.default_rng(2).random((20, 20)).astype(np.float32)
    tensor = to_tensor(arr, 20, channels=1, mean=0.5, std=0.25)
    assert tensor.shape == (1, 20, 20)
    np.testing.assert_allclose(tensor.numpy()[0], (arr - 0.5) / 0.25, atol=1e-5)
    back = to_uint8(tensor, mean=0.5, std=0.25)
    assert np.abs(back.astype(float) - arr * 255).max() <= 0.51
    colour = to_tensor(np.stack([arr] * 3, axis=-1), 10, channels=1)
    assert colour.shape == (1, 10, 10)


def test_as_array_inputs():
    u8 = np.full((4, 5), 255, dtype=np.uint8)
    assert as_array(u8).max() == 1.0
    chw = np.zeros((3, 6, 7), dtype=np.float32)
    assert as_array(chw).shape == (6, 7, 3)
    assert as_array(Image.fromarray(u8)).shape == (4, 5)
    with pytest.raises(TypeError):
        as_array(3.5)


# ----------------------------------------------------------------------------------------- manifest


def _good(i: int) -> str:
    return json.dumps({"id": f"r{i}", "image": f"images/{i}.png", "text": f"report {i}", "split": "train"})


def test_malformed_lines_are_named_and_nothing_else_is_lost(tmp_path: Path, capsys):
    lines = [
        _good(1),
        '{"id": "r2", "image": "images/2.png", "text": ',  # line 2: broken JSON
        _good(3),
        json.dumps({"id": "r4", "labels": {"cardiomegaly": 2}}),  # line 4: bad label value
        json.dumps({"id": "r5", "split": "training"}),  # line 5: bad split
        "",
        json.dumps(["not", "an", "object"]),  # line 7
        json.dumps({"id": "", "text": "empty id"}),  # line 8: empty id
        _good(9),
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    records, report = read_manifest(path)
    assert [r.id for r in records] == ["r1", "r3", "r9"]
    assert report.skipped == 5
    by_line = {int(e.split(":")[1]): e for e in report.errors}
    assert set(by_line) == {2, 4, 5, 7, 8}
    assert "not valid JSON" in by_line[2]
    assert "field 'labels'" in by_line[4] and "field 'split'" in by_line[5] and "field 'id'" in by_line[8]
    with pytest.raises(ManifestError, match=r"m\.jsonl:2"):
        read_manifest(path, strict=True)
    kept = load_records(path)
    assert len(kept) == 3 and "skipped 5 bad manifest lines" in capsys.readouterr().out


def test_duplicate_ids_keep_the_first_and_report_each_other(tmp_path: Path):
    path = tmp_path / "dup.jsonl"
    first = json.dumps({"id": "r1", "image": "images/1.png", "text": "the first copy"})
    path.write_text("\n".join([first, _good(1), _good(2), _good(1)]) + "\n")
    records, report = read_manifest(path)
    assert [r.id for r in records] == ["r1", "r2"] and records[0].text == "the first copy"
    assert report.skipped == 2 and report.by_reason() == {"duplicate_id": 2}
    assert [p.line for p in report.problems] == [2, 4] and "first on line 1" in report.errors[0]
    with pytest.raises(ManifestError, match="duplicate"):
        read_manifest(path, strict=True)


def test_manifest_roundtrip_keeps_extra_fields(tmp_path: Path):
    records = [Record(id="a", text="x", labels={"edema": 1}, split="val"),
               {"id": "b", "task": "vqa", "question": "q?", "answer": "yes", "view": "PA"}]
    assert write_manifest(records, tmp_path / "out" / "m.jsonl") == 2
    back, report = read_manifest(tmp_path / "out" / "m.jsonl")
    assert report.skipped == 0
    assert back[0].labels == {"edema": 1} and back[0].split == "val"
    assert back[1].answer == "yes" and back[1].model_extra == {"view": "PA"}
    assert not list((tmp_path / "out").glob(".*tmp*"))  # the temp file was renamed away
