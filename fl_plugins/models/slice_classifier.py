"""One 2D ViT backbone for 2D images and 3D volumes: the classifier of stage-wise fine-tuning (MedUniverse).

:class:`SliceViTClassifier` is a :class:`~fl_plugins.models.classifier.ViTClassifier` (``backbone.`` = timm ViT,
``head.`` = linear/MLP head) that also takes volumes ``[B, C, D, H, W]``: it picks ``num_slices`` evenly spaced axial
slices (all of them when ``num_slices`` is None or >= D), runs every slice through the *same* 2D backbone
(``[B * S, C, H, W] -> [B * S, E]``, CLS embeddings), averages the S embeddings of each volume and classifies
the mean with the head.

Why the 2D backbone over slices, not MONAI's 3D ViT: stage-wise fine-tuning improves **one** universal backbone with
sites of different tasks, and a 3D ViT has other weights (a 3D patch embedding, other position embeddings), so its
update could not be averaged with the 2D sites' backbones; the base would split in two. Over slices, a 3D site
trains and returns exactly the 2D backbone's keys and shapes. Mean pooling has no parameters, so every trainable
tensor is either the shared backbone (federated) or the site's head (kept on the site). What it loses: the 3D
context between slices (each slice is seen alone); a volume task that needs it (e.g. shape across slices) is
better served by a 3D model trained outside the stage-wise base.

:class:`BaseBackbone` holds only the backbone (``backbone.*`` keys): the server's view of the base.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fl_plugins.models.backbone import BackboneSpec, create_backbone, load_backbone_state
from fl_plugins.models.classifier import ViTClassifier

__all__ = ["BaseBackbone", "SliceViTClassifier", "slice_indices"]


def slice_indices(depth: int, num_slices: int | None) -> torch.Tensor:
    """``num_slices`` evenly spaced indices in ``range(depth)`` (first and last included), or every index when
    ``num_slices`` is None or >= ``depth``."""
    if depth < 1:
        raise ValueError(f"a volume needs >= 1 slice, got depth {depth}")
    if num_slices is None or num_slices >= depth:
        return torch.arange(depth)
    if num_slices < 1:
        raise ValueError(f"num_slices must be >= 1 or None, got {num_slices}")
    return torch.linspace(0, depth - 1, num_slices).round().long()


class SliceViTClassifier(ViTClassifier):
    """ViT classifier of 2D images ``[B, C, H, W]`` and, slice by slice with mean pooling, of volumes
    ``[B, C, D, H, W]`` (see the module docstring).

    Args:
        spec / num_classes / head / pretrained / freeze_backbone: :class:`ViTClassifier`'s.
        num_slices: slices per volume (evenly spaced along D); None = every slice.
    """

    def __init__(self, spec: BackboneSpec, num_classes: int, head: str = "linear",
                 pretrained: str | Path | None = None, freeze_backbone: bool = False,
                 num_slices: int | None = 8) -> None:
        super().__init__(spec, num_classes, head=head, pretrained=pretrained, freeze_backbone=freeze_backbone)
        if num_slices is not None and (isinstance(num_slices, bool) or not isinstance(num_slices, int)
                                       or num_slices < 1):
            raise ValueError(f"num_slices must be an int >= 1 or None, got {num_slices!r}")
        self.num_slices = num_slices

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's embedding ``[B, E]`` of images ``[B, C, H, W]`` or volumes ``[B, C, D, H, W]`` (the mean of
        the selected slices' embeddings)."""
        if x.ndim == 4:
            return self.backbone(x)
        if x.ndim != 5:
            raise ValueError(f"SliceViTClassifier takes images [B, C, H, W] or volumes [B, C, D, H, W], got shape "
                             f"{tuple(x.shape)}")
        b, c, d, h, w = x.shape
        idx = slice_indices(d, self.num_slices).to(x.device)
        s = int(idx.numel())
        slices = x.index_select(2, idx).permute(0, 2, 1, 3, 4).reshape(b * s, c, h, w)
        return self.backbone(slices).reshape(b, s, -1).mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` of images or volumes."""
        if self.freeze_backbone:
            with torch.no_grad():
                feats = self.embed(x)
        else:
            feats = self.embed(x)
        return self.head(feats)


class BaseBackbone(nn.Module):
    """Only the backbone (``state_dict`` keys ``backbone.*``, as in :class:`SliceViTClassifier`): the stage-wise
    server's base model, optionally loaded from an exported backbone (``pretrained``, strict)."""

    def __init__(self, spec: BackboneSpec, pretrained: str | Path | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = create_backbone(spec)
        if pretrained is not None:
            load_backbone_state(self.backbone, pretrained)

    @property
    def embed_dim(self) -> int:
        return int(self.backbone.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)
