"""Converters from public datasets' official layouts to the manifest format (design.md section 3).

`CONVERTERS[name](root, out, **options)` writes `out/manifest.jsonl`, `out/images/` and
`out/conversion.json`, and returns a `ConversionSummary`. `convert` checks the options against
the converter first, so that an option that does not apply to a format is an error, not ignored.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medunifier.data.converters.chexpert import convert_chexpert
from medunifier.data.converters.common import ConversionError, ConversionSummary
from medunifier.data.converters.covidx import convert_covidx
from medunifier.data.converters.iu_xray import convert_iu_xray
from medunifier.data.converters.medmnist import convert_medmnist
from medunifier.data.converters.mimic_cxr import convert_mimic_cxr
from medunifier.data.converters.mri import convert_ixi
from medunifier.data.converters.rsna import convert_rsna
from medunifier.data.converters.siim import convert_siim
from medunifier.data.converters.slake import convert_slake
from medunifier.data.converters.vqa_rad import convert_vqa_rad

CONVERTERS: dict[str, Callable[..., ConversionSummary]] = {
    "mimic-cxr": convert_mimic_cxr,
    "iu-xray": convert_iu_xray,
    "chexpert": convert_chexpert,
    "rsna": convert_rsna,
    "siim": convert_siim,
    "covidx": convert_covidx,
    "vqa-rad": convert_vqa_rad,
    "slake": convert_slake,
    "medmnist": convert_medmnist,
    "ixi": convert_ixi,
}


def options_of(fmt: str) -> list[str]:
    """The keyword options a format's converter accepts."""
    params = inspect.signature(CONVERTERS[fmt]).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def convert(fmt: str, root: str | Path, out: str | Path, **options: Any) -> ConversionSummary:
    """Run the converter of `fmt`; raises ConversionError for an unknown format or an option it does not take."""
    if fmt not in CONVERTERS:
        raise ConversionError(f"unknown format {fmt!r}; one of {', '.join(CONVERTERS)}")
    accepted = options_of(fmt)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConversionError(f"option(s) {', '.join(unknown)} do not apply to {fmt} (it takes: {', '.join(accepted)})")
    return CONVERTERS[fmt](Path(root), Path(out), **options)


__all__ = ["CONVERTERS", "ConversionError", "ConversionSummary", "convert", "options_of"]
