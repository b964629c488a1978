"""IXI (T1 / T2 / PD brain MRI, NIfTI) -> image-to-image translation records, read as 2D axial slices.

Layout (the IXI download, one folder per contrast, files named by subject):

    root/IXI-T1/IXI002-Guys-0828-T1.nii.gz
    root/IXI-T2/IXI002-Guys-0828-T2.nii.gz
    root/IXI-PD/IXI002-Guys-0828-PD.nii.gz

(the files may also sit directly in `root`). A subject is the name before its last "-T1" / "-T2" / "-PD".
Each volume is read with nibabel, reoriented to the closest canonical (RAS) axes, and scaled to [0, 1] by its
own 0.5th and 99.5th percentiles; the axial slices of the central `keep` fraction (every `step`-th) become PNGs.
Every requested contrast pair (`pairs`, default T2 -> PD and PD -> T2) whose two volumes share one voxel grid
(same shape and affine) gives one "translate" record per slice (source `image`, `target_image`, an instruction
"translate to a PD-weighted image"). IXI's T2 and PD come from one dual-echo acquisition and share a grid; T1
was acquired apart and does not: a pair on different grids is dropped with the reason `unregistered_pair`
(register the volumes first, then convert). Splits are by subject, seeded.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from medunifier.data.converters.common import ConversionError, ConversionSummary, assign_splits, finish
from medunifier.data.images import save_png
from medunifier.data.manifest import Record

__all__ = ["CONTRASTS", "MRI_TRANSLATIONS", "convert_ixi", "read_slices"]

CONTRASTS = ("t1", "t2", "pd")
MRI_TRANSLATIONS = {c: f"translate to a {c.upper()}-weighted image" for c in CONTRASTS}
_NAME = re.compile(r"^(?P<subject>.+)-(?P<contrast>T1|T2|PD)\.nii(\.gz)?$", re.IGNORECASE)


def read_slices(path: Path, keep: float, step: int) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """(float32 [N, H, W] axial slices in [0, 1], the affine, the volume shape) of a NIfTI volume."""
    try:
        import nibabel as nib
    except ImportError as err:
        raise ConversionError("reading NIfTI needs nibabel: pip install 'medunifier[mri]'") from err
    image = nib.as_closest_canonical(nib.load(str(path)))
    volume = np.asarray(image.dataobj, dtype=np.float32)
    if volume.ndim == 4 and volume.shape[-1] == 1:
        volume = volume[..., 0]
    if volume.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {volume.shape}")
    low, high = np.percentile(volume, [0.5, 99.5])
    volume = np.clip((volume - low) / max(float(high - low), 1e-6), 0.0, 1.0)
    depth = volume.shape[2]
    first = round(depth * (1 - keep) / 2)
    indices = np.arange(first, depth - first, step)
    # axial slices (x, y) -> image rows = anterior at the top: transpose and flip so the nose points up
    slices = np.stack([np.flipud(volume[:, :, k].T) for k in indices]) if len(indices) else np.zeros((0, 1, 1))
    return slices.astype(np.float32), np.asarray(image.affine), tuple(volume.shape)


def convert_ixi(root: Path, out: Path, *, pairs: str = "t2:pd,pd:t2", keep: float = 0.5, step: int = 4,
                val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0) -> ConversionSummary:
    """Convert an IXI download (module doc) into translate records.

    Args:
        pairs: comma-separated "source:target" contrasts among t1, t2, pd.
        keep: the central fraction of axial slices used (the rest is mostly outside the brain).
        step: every step-th slice of that range (neighbouring slices are near duplicates).
    """
    root, out = Path(root), Path(out)
    summary = ConversionSummary(format="ixi", out=str(out))
    wanted = []
    for item in pairs.split(","):
        src, _, tgt = item.strip().lower().partition(":")
        if src not in CONTRASTS or tgt not in CONTRASTS or src == tgt:
            raise ConversionError(f"bad contrast pair {item!r}: use 'source:target' with two of {CONTRASTS}")
        wanted.append((src, tgt))
    if not 0 < keep <= 1 or step < 1:
        raise ConversionError(f"keep must be in (0, 1] and step >= 1, got keep={keep}, step={step}")
    files: dict[str, dict[str, Path]] = defaultdict(dict)
    for path in sorted(root.rglob("*.nii*")):
        match = _NAME.match(path.name)
        if match:
            files[match["subject"]][match["contrast"].lower()] = path
    if not files:
        raise ConversionError(f"{root}: no IXI NIfTI files (named like IXI002-Guys-0828-T2.nii.gz)")
    splits = assign_splits(files, val_fraction, test_fraction, seed)
    records: list[Record] = []
    for subject, by_contrast in files.items():
        needed = sorted({c for pair in wanted for c in pair if c in by_contrast})
        volumes = {}
        for contrast in needed:
            try:
                volumes[contrast] = read_slices(by_contrast[contrast], keep, step)
            except (OSError, ValueError) as err:
                summary.unreadable_images.append((str(by_contrast[contrast]), str(err)))
        written: dict[str, list[str]] = {}
        for src, tgt in wanted:
            if src not in volumes or tgt not in volumes:
                summary.filtered["missing_contrast"] += 1
                continue
            (a, affine_a, shape_a), (b, affine_b, shape_b) = volumes[src], volumes[tgt]
            if shape_a != shape_b or not np.allclose(affine_a, affine_b, atol=1e-3):
                summary.filtered["unregistered_pair"] += 1
                continue
            for contrast, slices in ((src, a), (tgt, b)):
                if contrast not in written:
                    written[contrast] = []
                    for k, arr in enumerate(slices):
                        relative = f"images/{subject}_{contrast}_{k:03d}.png"
                        save_png(arr, out / relative)
                        written[contrast].append(relative)
            for k, (image, target) in enumerate(zip(written[src], written[tgt])):
                records.append(Record(
                    id=f"ixi-{subject}-{src}-{tgt}-{k:03d}", image=image, target_image=target, task="translate",
                    instruction=MRI_TRANSLATIONS[tgt], split=splits[subject], modality="mri", source="ixi",
                    text="", target_kind=tgt, source_kind=src, subject=subject, slice=k))
    if not records:
        summary.notes.append("no pair of registered volumes: nothing written")
    return finish(records, out, summary)
