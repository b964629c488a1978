"""`train.mixed_precision: auto`: bf16 exactly where the device computes it natively."""

from __future__ import annotations

import pytest
import torch

from medunifier.config import ConfigError, load_config
from medunifier.train import precision
from medunifier.train.precision import autocast, resolve_mixed_precision


def _cpu_features(monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


@pytest.mark.parametrize(("avx512_bf16", "amx", "expected"), [(True, False, "bf16"), (False, True, "bf16"),
                                                               (False, False, "no")])
def test_auto_follows_the_cpu(monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool, amx: bool, expected: str) -> None:
    _cpu_features(monkeypatch, avx512_bf16, amx)
    assert resolve_mixed_precision("auto", "cpu") == expected
    with autocast("auto", "cpu"):
        y = torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4))
    assert y.dtype == (torch.bfloat16 if expected == "bf16" else torch.float32)


def test_explicit_settings_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    _cpu_features(monkeypatch, False, False)
    assert [resolve_mixed_precision(s, "cpu") for s in ("no", "bf16", "fp16")] == ["no", "bf16", "fp16"]
    assert not precision.native_bf16("mps")


def test_config_takes_auto_and_refuses_unknown_precisions() -> None:
    assert load_config("tiny", ["train.mixed_precision=auto"]).train.mixed_precision == "auto"
    assert load_config("tiny", ["train.mixed_precision=no"]).train.mixed_precision == "no"  # YAML's false
    with pytest.raises(ConfigError, match="mixed_precision"):
        load_config("tiny", ["train.mixed_precision=fp8"])
