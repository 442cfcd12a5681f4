"""Pure-torch building blocks of the SSL methods (no ``nvflare``, no ``torch.distributed``).

One concept per module: ``schedules`` (pure functions of the global step), ``ema`` (teacher update),
``centering`` (DINO centre, Sinkhorn-Knopp), ``dino_loss``, ``ibot_loss``, ``koleo``, ``masking`` (iBOT block
masks), ``masked_vit`` (timm ViT token forward with mask token), ``heads`` (DINO projection head).

Names are re-exported lazily (PEP 562) so that importing e.g. ``fl_plugins.core.schedules`` does not import
lightly/timm.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "cosine_schedule": "schedules",
    "linear_warmup_then_constant": "schedules",
    "cosine_with_warmup": "schedules",
    "update_momentum": "ema",
    "CENTER_MOMENTUM": "centering",
    "centered_teacher_probs": "centering",
    "update_center": "centering",
    "sinkhorn_knopp": "centering",
    "STUDENT_TEMP": "dino_loss",
    "dino_num_terms": "dino_loss",
    "dino_cross_entropy": "dino_loss",
    "dino_loss": "dino_loss",
    "ibot_patch_weights": "ibot_loss",
    "ibot_patch_loss": "ibot_loss",
    "KOLEO_WEIGHT": "koleo",
    "koleo_loss": "koleo",
    "MASK_RATIO_MIN_MAX": "masking",
    "MASK_SAMPLE_PROBABILITY": "masking",
    "BlockMaskGenerator": "masking",
    "sample_ibot_masks": "masking",
    "EXTRA_BACKBONE_KEYS": "masked_vit",
    "add_mask_token": "masked_vit",
    "forward_tokens": "masked_vit",
    "build_dino_head": "heads",
    "copy_dino_head": "heads",
    "last_layer_parameters": "heads",
    "cancel_last_layer_gradients": "heads",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
