"""Framework-free local training, evaluation and checkpoint helpers (no ``nvflare`` imports).

Re-exports are resolved lazily (PEP 562), so ``import fl_plugins.engine.checkpoint`` stays light (no MONAI/timm).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "ClassificationMetric",
    "FinetuneConfig",
    "FinetuneTrainer",
    "SegmentationMetric",
    "accuracy",
    "atomic_torch_save",
    "atomic_write_text",
    "dice_per_class",
    "evaluate_checkpoint",
    "evaluate_model",
    "federated_keys",
    "non_federated_regex",
]

_WHERE = {
    "ClassificationMetric": "metrics",
    "SegmentationMetric": "metrics",
    "accuracy": "metrics",
    "dice_per_class": "metrics",
    "FinetuneConfig": "finetune",
    "FinetuneTrainer": "finetune",
    "evaluate_checkpoint": "finetune",
    "evaluate_model": "finetune",
    "federated_keys": "finetune",
    "non_federated_regex": "finetune",
    "atomic_torch_save": "checkpoint",
    "atomic_write_text": "checkpoint",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"fl_plugins.engine.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
