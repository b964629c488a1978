"""Fixtures of the evaluator tests (the fakes live in eval_fakes.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from eval_fakes import FakeModel, make_band_manifest


@pytest.fixture
def fake_model() -> FakeModel:
    torch.manual_seed(0)
    return FakeModel().eval()


@pytest.fixture
def band_manifest(tmp_path: Path) -> Path:
    return make_band_manifest(tmp_path / "data", per_class=4)


@pytest.fixture
def split_manifest(tmp_path: Path) -> Path:
    return make_band_manifest(tmp_path / "splits", per_class=0, splits={"train": 10, "val": 4, "test": 4})


@pytest.fixture
def prompt_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.yaml"
    path.write_text(
        "template: '{severity} {subtype} {location}'\n"
        "max_prompts: 4\n"
        "classes:\n"
        "  atelectasis: {severity: ['', mild], subtype: [atelectasis, linear atelectasis], location: [at the base]}\n"
        "  cardiomegaly: {prompts: [cardiomegaly, enlarged cardiac silhouette]}\n"
        "  edema: {severity: ['', mild], subtype: [edema], location: ['', bilaterally]}\n"
    )
    return path
