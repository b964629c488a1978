"""Which mixed precision a run uses: `train.mixed_precision` "auto" picks bf16 where the hardware does it natively.

On a CPU with AVX512-BF16 or AMX, bf16 matrix products and a `tiny` training step run well faster than in
float32 (`benchmarks/bench_precision.py` measures both); on a CPU without them bf16 is emulated and slower
than float32, so "auto" keeps float32 there.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

Precision = Literal["no", "bf16", "fp16"]


def native_bf16(device_type: str) -> bool:
    """True where bf16 matrix products are native: a CUDA GPU that supports bf16, or a CPU with AVX512-BF16/AMX."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        cpu = torch.cpu
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)
    return False


def resolve_mixed_precision(setting: str, device_type: str | None = None) -> Precision:
    """`train.mixed_precision` -> what Accelerate is given ("auto": bf16 when native on the device, else "no")."""
    if setting != "auto":
        return setting  # type: ignore[return-value]
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    return "bf16" if native_bf16(device_type) else "no"


def autocast(setting: str, device_type: str = "cpu") -> contextlib.AbstractContextManager:
    """The autocast context a run with this setting trains under (outside Accelerate: calibration, probes)."""
    precision = resolve_mixed_precision(setting, device_type)
    if precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device_type, dtype=dtype)
