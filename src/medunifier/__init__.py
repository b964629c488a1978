"""medunifier: unified medical vision-language models (MedUnifier + UniMedVL ideas).

The public API, loaded on first use so that `import medunifier` (and `medunifier --help`) stays fast:

    from medunifier import MedUnifier, load_config, run_zeroshot
    model = MedUnifier.from_pretrained("runs/demo/run")
    run_zeroshot(model, "runs/demo/data/manifest_5x200.jsonl", prompts="chexpert5")
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "MedUnifier": "medunifier.model.medunifier",
    "MedUnifierConfig": "medunifier.config",
    "load_config": "medunifier.config",
    "ConfigError": "medunifier.config",
    "Processor": "medunifier.data.processor",
    "Synthesizer": "medunifier.generate.sampling",
    "train": "medunifier.train.loop",
    "run_retrieval": "medunifier.eval.retrieval",
    "run_zeroshot": "medunifier.eval.zeroshot",
    "run_finetune": "medunifier.eval.finetune",
    "run_report": "medunifier.eval.report",
    "run_vqa": "medunifier.eval.vqa",
    "run_synthesis": "medunifier.eval.synthesis",
    "run_edit_eval": "medunifier.eval.edit",
    "run_ablation": "medunifier.eval.ablation",
    "run_experts_ablation": "medunifier.eval.experts",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'medunifier' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
