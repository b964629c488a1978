"""SynthCXR: a seeded, fast procedural generator of chest-radiograph-like images with reports.

Each image is a frontal chest film drawn in an attenuation-like space with vectorised numpy
(coordinate grids, soft ellipses, smooth noise upsampled from a coarse grid, distance fields for
lines), then tone-mapped: dark aerated lungs with vessel markings radiating from the hila, bright
mediastinum, heart, spine, ribs, clavicles and abdomen under the diaphragm domes. Patients vary in
body habitus (thorax width, soft-tissue thickness, breast shadows), lung shape and diaphragm
height, heart size, PA or portable AP projection (AP magnifies the heart), rotation, position,
exposure, contrast and noise.

API: `write_synthcxr(out, n, size, seed, workers, pairs=0, i2i=0)` writes a dataset (what `medunifier data synth`
runs); `synthesize(n, size, seed)` returns images and records in memory; `generate_sample`,
`sample_case` and `render` are the steps of one image; `generate_pair` / `synthesize_pairs` make
counterfactual pairs; `generate_i2i` makes image-to-image phantoms.

Layout: `sampling` (knobs, a case's patient and findings, seeds and splits), `primitives` (drawing on
coordinate grids), `anatomy` (the normal chest), `painters` (one painter a finding, looked up by name),
`render` (one film and one sample), `pairs` (counterfactual pairs), `i2i` (image-to-image phantoms) and
`writer` (chunks in worker processes, manifests and the summary).

Counterfactual pairs (stream 2): the same patient (identical parameters, noise seed and findings)
rendered once as drawn and once with one added finding of `PAIR_FINDINGS` (the five competition
findings and pneumothorax, with laterality, zone and severity). The added finding is painted last, so
the two images differ only inside that finding's region (`finding_region`, also written as a PNG):
elsewhere they are identical pixel for pixel. Each image has its own report and labels; an "edit"
record links them with a natural instruction ("add a moderate left pleural effusion").

Findings (names from `data/findings.py`) carry laterality (patient side: "right" is the image's
left), zone (upper/middle/lower) and severity (mild/moderate/severe):

- atelectasis: plate-like linear opacities; moderate/severe add volume loss (raised hemidiaphragm,
  mediastinal shift) and severe is a lobar collapse wedge.
- cardiomegaly: cardiothoracic ratio (CTR) above `cardiomegaly_ctr` (normal hearts use `normal_ctr`).
- consolidation: dense patchy opacity from a noise-modulated blob, air bronchograms when moderate/severe.
- edema: bilateral perihilar haze, thickened markings, Kerley B lines at the bases.
- pleural_effusion: fluid filling the costophrenic angle with a lateral meniscus, obscuring the dome.
- pneumothorax: a lucent rim without lung markings bounded by a thin visceral pleural line.
- nodule: a small round soft-edged opacity (diameter in mm in the report).
- support_devices: ET tube, central line, PICC, pacemaker box with leads, enteric tube.
- no_finding: 1 iff no other finding is present (support devices included).

Difficulty knobs live in `SynthConfig`: `prevalence` (per finding, missing names take the default;
no finding comes out at about 37%), `chf_boost` (edema raises the chance of cardiomegaly and effusion), `severity_weights`,
`subtle_fraction` and `subtle_contrast` (a fraction of positives drawn mild at reduced contrast, so
some lesions are really hard), `finding_contrast` (global opacity scale), `noise_std`, anatomy
ranges (`habitus`, `max_rotation_deg`, `normal_ctr`, `cardiomegaly_ctr`) and `mention_absent`
(how often a report states an absent finding).

Determinism: image i of stream s draws from `SeedSequence(seed, spawn_key=(s, i))`, so the output
does not depend on the number of workers, and PNGs are written with fixed settings: the same seed
gives byte-identical files. Stream 0 is the main set; stream 1 is the 5x200 evaluation set
(200 images for each CheXpert competition finding, that finding alone); stream 2 the pairs; stream 3 the
image-to-image phantoms.
"""

from __future__ import annotations

from medunifier.data.synthcxr.i2i import (
    I2I_PREVALENCE,
    I2I_SCALES,
    I2I_TRANSLATIONS,
    LOWRES_NOISE,
    MASK_NAMES,
    I2ISample,
    generate_i2i,
    i2i_config,
    i2i_records,
)
from medunifier.data.synthcxr.pairs import (
    CounterfactualPair,
    edit_instruction,
    finding_region,
    generate_pair,
    sample_pair,
    synthesize_pairs,
)
from medunifier.data.synthcxr.primitives import smooth_noise
from medunifier.data.synthcxr.render import IMAGE_KINDS, MASK_FINDINGS, generate_sample, render
from medunifier.data.synthcxr.sampling import (
    DEFAULT_PREVALENCE,
    EVAL_STREAM,
    I2I_STREAM,
    MAIN_STREAM,
    PAIR_FINDINGS,
    PAIR_STREAM,
    SIDE_SIGN,
    Case,
    SynthConfig,
    _rngs,
    eval_finding,
    sample_case,
)
from medunifier.data.synthcxr.writer import GENERATOR_VERSION, synthesize, write_synthcxr

__all__ = [
    "DEFAULT_PREVALENCE",
    "EVAL_STREAM",
    "GENERATOR_VERSION",
    "I2I_PREVALENCE",
    "I2I_SCALES",
    "I2I_STREAM",
    "I2I_TRANSLATIONS",
    "IMAGE_KINDS",
    "LOWRES_NOISE",
    "MAIN_STREAM",
    "MASK_FINDINGS",
    "MASK_NAMES",
    "PAIR_FINDINGS",
    "PAIR_STREAM",
    "SIDE_SIGN",
    "Case",
    "CounterfactualPair",
    "I2ISample",
    "SynthConfig",
    "_rngs",
    "edit_instruction",
    "eval_finding",
    "finding_region",
    "generate_i2i",
    "generate_pair",
    "generate_sample",
    "i2i_config",
    "i2i_records",
    "render",
    "sample_case",
    "sample_pair",
    "smooth_noise",
    "synthesize",
    "synthesize_pairs",
    "write_synthcxr",
]
