"""Image-to-image pairs of SynthCXR and their manifest records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medunifier.data.manifest import ManifestError, parse_line, read_manifest
from medunifier.data.synthcxr import I2I_SCALES, MASK_FINDINGS, generate_i2i, write_synthcxr


def test_soft_tissue_differs_from_the_radiograph_only_where_bone_is_drawn() -> None:
    for index in range(12):
        s = generate_i2i(seed=5, index=index, size=64)
        full, soft, bone = (s.images[k].astype(int) for k in ("radiograph", "soft_tissue", "bone"))
        changed = full != soft
        assert changed.sum() > 200  # the ribs, clavicles and spine really are removed
        assert not (changed & ~s.masks["bone_region"]).any()  # identical pixel for pixel elsewhere
        assert (full[changed] > soft[changed]).mean() > 0.9  # bone is an opacity: suppressing it darkens
        assert bone[s.masks["bone_region"]].mean() > bone[~s.masks["bone_region"]].mean() + 20


def test_masks_follow_the_findings_and_lowres_copies_have_their_scale() -> None:
    seen = set()
    for index in range(30):
        s = generate_i2i(seed=2, index=index, size=64)
        present = {f.name for f in s.case.findings}
        for name in MASK_FINDINGS:
            if name == "heart":
                assert 150 < s.masks["heart"].sum() < 1200
            elif name in s.masks:
                assert name in present and s.masks[name].any()
                seen.add(name)
            else:
                assert name not in present
        for k in I2I_SCALES:
            assert s.lowres[k].shape == (64 // k, 64 // k) and s.lowres[k].dtype == np.uint8
    assert {"pleural_effusion", "pneumothorax"} <= seen


def test_write_synthcxr_i2i_records(tmp_path: Path) -> None:
    summary = write_synthcxr(tmp_path, n=4, size=32, seed=1, workers=1, per_class_5x200=0, i2i=6)
    records, report = read_manifest(tmp_path / "manifest.jsonl", strict=True)
    i2i = [r for r in records if r.task in ("translate", "upscale", "segment")]
    assert report.skipped == 0 and summary["i2i_tasks"]["translate"] == 12 and summary["i2i_tasks"]["upscale"] == 12
    assert sum(r.task == "segment" and r.mask_finding == "heart" for r in i2i) == 6
    for r in i2i:
        assert r.instruction and (tmp_path / r.image).exists()
        target = r.mask if r.task == "segment" else r.target_image
        assert (tmp_path / target).exists()
        if r.task == "upscale":
            from PIL import Image

            assert Image.open(tmp_path / r.image).size == (32 // r.scale,) * 2
    with pytest.raises(ValueError, match="divisible by 4"):
        write_synthcxr(tmp_path / "odd", n=0, size=30, workers=1, per_class_5x200=0, i2i=1)


@pytest.mark.parametrize(("record", "message"), [
    ({"id": "a", "task": "segment", "image": "x.png", "instruction": "outline the heart"}, "needs 'mask'"),
    ({"id": "a", "task": "translate", "image": "x.png", "instruction": "to bone"}, "needs 'target_image'"),
    ({"id": "a", "task": "upscale", "image": "x.png", "target_image": "y.png"}, "non-empty 'instruction'"),
    ({"id": "a", "task": "upscale", "target_image": "y.png", "instruction": "upscale x4"}, "needs 'image'"),
    ({"id": "a", "task": "report", "image": "x.png", "mask": "m.png"}, "belongs to 'segment' records"),
])
def test_bad_i2i_records_name_what_to_fix(record: dict, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        parse_line(json.dumps(record), 3, "m.jsonl")
