"""SynthCXR output pinned to fixed digests: a change to sampling, painting, rendering, pairs, image-to-image
phantoms or writing that moves a single pixel or record byte fails here.

The digests hold for this numpy build; a deliberate change to what the generator draws updates them (and
`GENERATOR_VERSION`) together.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from medunifier.data.findings import FINDINGS
from medunifier.data.synthcxr import IMAGE_KINDS, render, sample_case, synthesize, write_synthcxr
from medunifier.data.synthcxr.painters import DEVICE_PAINTERS, PAINTERS
from medunifier.data.synthcxr.sampling import SynthConfig, sample_finding

WRITTEN = "44beff8667e601f01613cf1e0b686b8ebf5771995a841da3979b4c4570d32e97"
RENDERED = "c2511797cab03f16d7d58ab64d4a61266f4e43eff0b18290d792562dc25190c4"
IN_MEMORY = "117854a090edcac94734f4c8be0cf85718abbc0f4d950044ecfd1f1da819b3ef"


def test_written_dataset_matches_its_digest(tmp_path: Path) -> None:
    write_synthcxr(tmp_path, n=24, size=32, seed=11, workers=2, per_class_5x200=2, pairs=8, i2i=4)
    digest = hashlib.sha256()
    for path in sorted(tmp_path.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(tmp_path)).encode())
            digest.update(path.read_bytes())
    assert digest.hexdigest() == WRITTEN


def test_every_finding_and_image_kind_renders_to_its_digest() -> None:
    digest = hashlib.sha256()
    for i, name in enumerate(n for n in FINDINGS if n != "no_finding"):
        for repeat in range(3):
            case = sample_case(np.random.default_rng([5, i, repeat]), only=name)
            for kind in IMAGE_KINDS:
                masks: dict[str, np.ndarray] = {}
                image = render(case, 48, np.random.default_rng([6, i, repeat]), kind, masks)
                digest.update((image * 255 + 0.5).astype(np.uint8).tobytes())
                for key in sorted(masks):
                    digest.update(key.encode())
                    digest.update(masks[key].tobytes())
    assert digest.hexdigest() == RENDERED


def test_in_memory_images_and_records_match_their_digest() -> None:
    images, records = synthesize(30, size=40, seed=3)
    payload = images.tobytes() + json.dumps(records, sort_keys=True).encode()
    assert hashlib.sha256(payload).hexdigest() == IN_MEMORY


def test_every_finding_and_device_has_a_painter() -> None:
    assert set(PAINTERS) == set(FINDINGS) - {"no_finding"}
    rng = np.random.default_rng(0)
    kinds = set()
    for _ in range(200):
        kinds |= set(sample_finding("support_devices", rng, SynthConfig()).params["devices"])
    assert kinds == set(DEVICE_PAINTERS)
