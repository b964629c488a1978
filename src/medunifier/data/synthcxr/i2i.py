"""Image-to-image phantoms of SynthCXR: one phantom rendered as radiograph, bone-suppressed and bone image, with
low-resolution copies and finding masks, and the translate, upscale and segment records that pair them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from medunifier.data.images import resize_array
from medunifier.data.reports import report_text, write_report
from medunifier.data.synthcxr.render import IMAGE_KINDS, MASK_FINDINGS, render
from medunifier.data.synthcxr.sampling import I2I_STREAM, Case, SynthConfig, pick, sample_case, split_of

__all__ = [
    "I2I_PREVALENCE", "I2I_SCALES", "I2I_TRANSLATIONS", "LOWRES_NOISE", "MASK_NAMES", "I2ISample", "generate_i2i",
    "i2i_config", "i2i_records",
]

I2I_SCALES = (2, 4)  # low-resolution factors of the upscale pairs
I2I_TRANSLATIONS = {"soft_tissue": ("translate to a bone-suppressed image", "suppress the bones",
                                    "show the soft tissue only"),
                    "bone": ("translate to a dual-energy bone image", "show the bones only", "make a bone image")}
LOWRES_NOISE = 0.01  # std of the detector noise added to a low-resolution image (on the [0, 1] scale)
# The segmented findings are uncommon in the main set; the image-to-image stream draws them more often so
# that every mask finding has positives to learn from (the other prevalences stay the default).
I2I_PREVALENCE = {"pleural_effusion": 0.3, "pneumothorax": 0.15}
MASK_NAMES = {"heart": "the heart", "pleural_effusion": "the pleural effusion", "pneumothorax": "the pneumothorax",
              "consolidation": "the consolidation", "nodule": "the nodule"}


@dataclass
class I2ISample:
    """One phantom rendered every way the image-to-image tasks need (uint8 (S, S) images unless noted).

    `images` holds the IMAGE_KINDS; `lowres[k]` is the radiograph at S // k (antialiased downsample plus
    `LOWRES_NOISE`); `masks` the bool (S, S) outlines of the mask findings present ("heart" always), plus
    "lungs" and "bone_region" (where the soft-tissue image may differ from the radiograph).
    """

    images: dict[str, np.ndarray]
    lowres: dict[int, np.ndarray]
    masks: dict[str, np.ndarray]
    case: Case
    record: dict[str, Any]  # the radiograph's report record (no image path)


def i2i_config(config: SynthConfig | None = None) -> SynthConfig:
    """The config of the image-to-image stream: `config` with the mask findings at `I2I_PREVALENCE`."""
    cfg = config or SynthConfig()
    return SynthConfig(**{**asdict(cfg), "prevalence": {**cfg.prevalence, **I2I_PREVALENCE}})


def generate_i2i(seed: int, index: int, size: int = 64, config: SynthConfig | None = None) -> I2ISample:
    """Phantom `index` of `I2I_STREAM`: its radiograph, soft-tissue and bone images (one picture stream, so
    they agree pixel for pixel outside the bones), low-resolution copies and finding masks."""
    cfg = i2i_config(config)
    case_seq, image_seq, text_seq, lowres_seq = np.random.SeedSequence(
        entropy=seed, spawn_key=(I2I_STREAM, index)).spawn(4)
    case = sample_case(np.random.default_rng(case_seq), cfg)
    masks: dict[str, np.ndarray] = {}
    floats = {kind: render(case, size, np.random.default_rng(image_seq), kind, masks if kind == "radiograph" else None)
              for kind in IMAGE_KINDS}
    lowres_rng = np.random.default_rng(lowres_seq)
    lowres = {}
    for k in I2I_SCALES:
        small = resize_array(floats["radiograph"], size // k)
        small = small + LOWRES_NOISE * lowres_rng.standard_normal(small.shape).astype(np.float32)
        lowres[k] = (np.clip(small, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    findings, impression = write_report(case.findings, np.random.default_rng(text_seq),
                                        mention_absent=cfg.mention_absent)
    record = {
        "text": report_text(findings, impression), "findings": findings, "impression": impression,
        "labels": case.labels(), "split": split_of(index, cfg.split_fractions), "modality": "cxr",
        "source": "synthcxr", "finding_details": [f.to_json() for f in case.findings], "seed": seed, "index": index,
    }
    images = {kind: (im * 255.0 + 0.5).astype(np.uint8) for kind, im in floats.items()}
    return I2ISample(images, lowres, masks, case, record)


def i2i_records(sample: I2ISample, paths: dict[str, str]) -> list[dict[str, Any]]:
    """The translate, upscale and segment records of one phantom, with image paths from `paths` (keys
    "radiograph", "soft_tissue", "bone", "x2", "x4", "mask_<finding>")."""
    index = sample.record["index"]
    rng = np.random.default_rng([sample.record["seed"], index, I2I_STREAM])  # instruction phrasing only
    base = dict(sample.record)
    prefix = f"synthcxr-i2i-{index:06d}"
    out = []
    for kind, phrasings in I2I_TRANSLATIONS.items():
        out.append({**base, "id": f"{prefix}-{kind}", "task": "translate", "image": paths["radiograph"],
                    "target_image": paths[kind], "instruction": pick(rng, phrasings), "target_kind": kind})
    for k in I2I_SCALES:
        phrase = pick(rng, (f"upscale x{k}", f"increase the resolution {k}x", f"super-resolve by {k}"))
        out.append({**base, "id": f"{prefix}-x{k}", "task": "upscale", "image": paths[f"x{k}"],
                    "target_image": paths["radiograph"], "instruction": phrase, "scale": k})
    for name in MASK_FINDINGS:
        if name in sample.masks:
            verb = pick(rng, ("outline", "segment", "mark"))
            out.append({**base, "id": f"{prefix}-mask-{name}", "task": "segment", "image": paths["radiograph"],
                        "mask": paths[f"mask_{name}"], "instruction": f"{verb} {MASK_NAMES[name]}",
                        "mask_finding": name})
    return out
