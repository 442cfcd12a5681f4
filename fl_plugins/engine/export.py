"""Export a pretrained ViT backbone for fine-tuning (methods-spec 2.7: teacher backbone by default [V]).

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


def backbone_state_dict(method: nn.Module, which: Literal["teacher", "student"] = "teacher") -> dict:
    """CPU clones of ``method.<which>.backbone``'s state without pretraining-only keys."""
    if which not in ("teacher", "student"):
        raise ValueError(f"which={which!r} is not one of ['teacher', 'student']")
    backbone = getattr(method, which)["backbone"]
    return {
        k: v.detach().to("cpu").clone().contiguous()
        for k, v in backbone.state_dict().items()
        if k not in EXTRA_BACKBONE_KEYS
    }


def export_backbone(
    method: nn.Module, path: str | os.PathLike, which: Literal["teacher", "student"] = "teacher"
) -> Path:
    """Write the ``which`` backbone's ``state_dict`` to ``path`` atomically; returns the path."""
    path = Path(path)
    atomic_torch_save(backbone_state_dict(method, which), path)
    return path
