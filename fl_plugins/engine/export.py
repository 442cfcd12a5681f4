"""Export a pretrained backbone for fine-tuning: ``method.backbone()`` (DINO: the teacher's, methods-spec 2.7 [V]).

The file is a plain ``state_dict`` (name -> CPU tensor) with exactly the keys of
``fl_plugins.models.backbone.create_backbone(spec)``, written atomically, so both loaders accept it::

    load_backbone_state(create_backbone(spec), path)
    timm.create_model(spec.name, pretrained=True, pretrained_cfg_overlay={"file": path}, **spec.timm_kwargs())

Pretraining-only backbone parameters (DINOv2 ``mask_token``) and the heads are dropped.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from torch import nn

from fl_plugins.core.masked_vit import EXTRA_BACKBONE_KEYS
from fl_plugins.engine.checkpoint import atomic_torch_save

__all__ = ["backbone_state_dict", "export_backbone"]


def backbone_state_dict(method: nn.Module, which: Literal["teacher", "student"] | None = None) -> dict:
    """CPU clones of the method's backbone state without pretraining-only keys.

    Args:
        method: a Method; its ``backbone()`` is exported by default.
        which: for methods with a student and a teacher (DINO), export ``method.<which>["backbone"]`` instead.
    """
    if which is None:
        backbone = method.backbone()  # type: ignore[operator]
    elif which in ("teacher", "student") and hasattr(method, which):
        backbone = getattr(method, which)["backbone"]
    else:
        raise ValueError(f"which={which!r}: {type(method).__name__} has no {which!r} network; use the default")
    return {
        k: v.detach().to("cpu").clone().contiguous()
        for k, v in backbone.state_dict().items()
        if k not in EXTRA_BACKBONE_KEYS
    }


def export_backbone(
    method: nn.Module, path: str | os.PathLike, which: Literal["teacher", "student"] | None = None
) -> Path:
    """Write the method's backbone ``state_dict`` (see :func:`backbone_state_dict`) to ``path`` atomically."""
    path = Path(path)
    atomic_torch_save(backbone_state_dict(method, which), path)
    return path
