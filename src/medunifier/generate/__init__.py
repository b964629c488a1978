"""medunifier.generate: text-conditioned code priors, text-to-image sampling, counterfactual editing.

`Synthesizer` (sampling.py) is loaded lazily so that importing the priors stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Synthesizer"]


def __getattr__(name: str) -> Any:
    if name == "Synthesizer":
        from medunifier.generate.sampling import Synthesizer

        return Synthesizer
    raise AttributeError(f"module 'medunifier.generate' has no attribute {name!r}")
