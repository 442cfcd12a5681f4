"""ViT backbones from timm for 1-channel medical images.

Every ViT in the project (DINO/DINOv2 student and teacher, MAE encoder, UNETR-style segmentation encoder,
classifier) is built here, so an exported backbone ``state_dict`` always fits ``create_backbone`` with the
same :class:`BackboneSpec`, and timm itself can load it::

    timm.create_model(spec.name, pretrained=True, pretrained_cfg_overlay={"file": path}, **spec.timm_kwargs())
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from fl_plugins.strict_config import StrictConfig

__all__ = ["BackboneSpec", "create_backbone", "load_backbone_state", "read_state_dict_file", "BackboneCheckpointError"]

logger = logging.getLogger(__name__)


class BackboneCheckpointError(ValueError):
    """A backbone checkpoint does not fit the backbone (names the file and the offending keys)."""


@dataclass(frozen=True)
class BackboneSpec(StrictConfig):
    """Architecture of a timm ViT backbone; strict ``from_dict`` / ``to_dict`` from
    :class:`~fl_plugins.strict_config.StrictConfig` (section ``"backbone"``).

    Defaults are the CPU-scale setting of methods-spec 9.3 [R]: ViT-tiny width (192-d, 3 heads, timm
    ``vit_tiny_patch16_224``), patch 8 at 64x64 pixels (64 tokens), 6 blocks.
    """

    SECTION = "backbone"

    name: str = "vit_tiny_patch16_224"
    img_size: int = 64
    patch_size: int = 8
    in_chans: int = 1
    depth: int = 6
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in timm.list_models():
            close = [m for m in timm.list_models("vit_*") if self.name.split("_")[1:2] and self.name.split("_")[1] in m]
            raise ValueError(
                f"backbone name {self.name!r} is not a timm model; try one of {close[:5] or timm.list_models('vit_*')[:5]}"
            )
        if self.patch_size <= 0 or self.img_size % self.patch_size != 0:
            raise ValueError(
                f"img_size={self.img_size} must be a positive multiple of patch_size={self.patch_size}"
            )
        if self.in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {self.in_chans}")
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")

    def timm_kwargs(self) -> dict:
        """Keyword arguments for ``timm.create_model`` (besides the model name)."""
        return {
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "in_chans": self.in_chans,
            "depth": self.depth,
            "drop_path_rate": self.drop_path_rate,
            "num_classes": 0,  # no classifier: forward() returns the pooled CLS embedding [B, D]
            "dynamic_img_size": True,  # multi-crop: local crops are smaller than global ones
        }


def create_backbone(spec: BackboneSpec) -> nn.Module:
    """Build a randomly initialised timm ViT; ``forward(x[B,C,H,W]) -> [B, embed_dim]``."""
    return timm.create_model(spec.name, pretrained=False, **spec.timm_kwargs())


def read_state_dict_file(path: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A ``state_dict`` (name -> tensor) from a ``.pt``/``.pth`` file: a raw state dict or a dict with a
    ``state_dict``/``model`` entry; :class:`BackboneCheckpointError` naming ``what`` and the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise BackboneCheckpointError(f"{what} {str(path)!r} does not exist")
    try:  # the format first: torch.save's zip with a data.pkl (nothing is unpickled before)
        with zipfile.ZipFile(path) as z:
            ok = any(n == "data.pkl" or n.endswith("/data.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        ok = False
    if not ok:
        raise BackboneCheckpointError(f"{what} {str(path)!r} is not a PyTorch checkpoint (torch.save's zip of "
                                      "tensors): give the file 'flssl export-backbone' wrote")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused a global: it would have run code
        raise BackboneCheckpointError(f"{what} {str(path)!r} holds Python objects besides tensors; only tensors are "
                                      f"loaded, since unpickling other objects can run code "
                                      f"({str(e).strip().splitlines()[-1][:200]})") from e
    except Exception as e:  # a damaged zip
        raise BackboneCheckpointError(f"cannot read {what} {str(path)!r}: {e}") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BackboneCheckpointError(f"{what} {str(path)!r} does not hold a state_dict (name -> tensor)")
    return obj


def load_backbone_state(backbone: nn.Module, path: str | Path) -> None:
    """Load an exported backbone ``state_dict`` (a ``.pt``/``.pth`` file) into ``backbone``, strictly.

    Accepts a raw state dict or a dict with a ``state_dict``/``model`` entry. Raises
    :class:`BackboneCheckpointError` naming the file, the missing/unexpected keys and shape mismatches.
    """
    obj = read_state_dict_file(path, "pretrained backbone checkpoint")
    own = backbone.state_dict()
    missing = sorted(set(own) - set(obj))
    unexpected = sorted(set(obj) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(obj[k].shape)} vs backbone {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(obj))
        if obj[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) {missing[:5]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) {unexpected[:5]}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es) {mismatched[:3]}")
        raise BackboneCheckpointError(
            f"pretrained backbone checkpoint {str(path)!r} does not fit the backbone: " + "; ".join(parts)
        )
    backbone.load_state_dict(obj, strict=True)
    n = sum(int(v.numel()) for v in obj.values())
    logger.info("pretrained backbone %s: loaded all %d tensors (%d values) into the backbone", path, len(obj), n)
