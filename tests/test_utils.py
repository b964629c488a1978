"""The shared helpers: one PSNR, one JSON encoding, one HTML table, one reading of rank and world size."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from medunifier.utils import (
    PSNR_CAP_DB,
    html_table,
    jsonable,
    launch_rank_world,
    process_group_rank_world,
    psnr_db,
    psnr_normalised,
)


def test_psnr_of_floats_and_tensors_agree_and_cap() -> None:
    assert psnr_db(0.01) == pytest.approx(20.0)
    assert psnr_db(25.0, peak=255.0) == pytest.approx(10 * math.log10(255**2 / 25))
    assert float(psnr_db(torch.tensor(0.01))) == pytest.approx(20.0, abs=1e-5)
    assert psnr_db(0.0) == PSNR_CAP_DB and psnr_db(1e-30) == PSNR_CAP_DB
    assert float(psnr_db(torch.tensor(0.0))) == PSNR_CAP_DB


def test_psnr_of_normalised_images_matches_the_formula() -> None:
    a = torch.zeros(1, 1, 4, 4)
    b = torch.full((1, 1, 4, 4), 0.2)  # normalised with std 0.5: a pixel difference of 0.1 on [0, 1]
    assert float(psnr_normalised(a, b, std=0.5)) == pytest.approx(20.0, abs=1e-4)


def test_psnr_of_normalised_images_takes_one_std_per_channel() -> None:
    a = torch.zeros(2, 3, 4, 4)
    b = torch.ones(2, 3, 4, 4)
    b[:, 1] = 2.0  # std 0.1 on channel 1: the same 0.2 difference on [0, 1] as channels 0 and 2 (std 0.2)
    assert float(psnr_normalised(a, b, std=[0.2, 0.1, 0.2])) == pytest.approx(10 * math.log10(1 / 0.04), abs=1e-4)
    assert float(psnr_normalised(a, b, std=[0.2, 0.2, 0.2])) < float(psnr_normalised(a, b, std=[0.2, 0.1, 0.2]))


def test_jsonable_turns_tensors_numpy_and_paths_into_json() -> None:
    value = {"t": torch.tensor([1.5, 2.0]), "s": torch.tensor(3), "n": np.float32(0.5), "i": np.int64(2),
             "a": np.arange(2), "p": Path("x/y"), "tup": (1, np.bool_(True)), 3: "key"}
    out = jsonable(value)
    assert out == {"t": [1.5, 2.0], "s": 3, "n": 0.5, "i": 2, "a": [0, 1], "p": "x/y", "tup": [1, True], "3": "key"}
    json.dumps(out)  # every value is a plain JSON type
    assert jsonable({"x": float("nan"), "y": torch.tensor(float("inf"))}, nonfinite_as_str=True) == \
        {"x": "nan", "y": "inf"}
    assert math.isnan(jsonable(float("nan")))  # kept a float unless asked


def test_html_table_escapes_and_formats() -> None:
    out = html_table("a <b>", ["x & y"], [[0.12345], ["<i>"]], cell=lambda v: f"{v:.2f}" if isinstance(v, float) else v)
    assert out == ("<h3>a &lt;b&gt;</h3><table><tr><th>x &amp; y</th></tr><tr><td>0.12</td></tr>"
                   "<tr><td>&lt;i&gt;</td></tr></table>")


def test_rank_and_world_without_a_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert launch_rank_world() == (1, 3)  # what torchrun set, before any process group exists
    assert process_group_rank_world() == (0, 1)  # collectives need a process group
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert launch_rank_world() == (0, 1)
