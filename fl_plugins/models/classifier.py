"""ViT image classifier: shared timm backbone (``backbone.``) + linear or MLP head (``head.``).

Used for MedMNIST-style classification (methods-spec 6.3, 8.2). ``freeze_backbone=True`` is the linear-probe
protocol (methods-spec 8.2 "linear probe"): the backbone's parameters get ``requires_grad=False`` and it stays in
eval mode, so only ``head.`` is trained -- and only ``head.`` is federated state (see
:mod:`fl_plugins.engine.finetune`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fl_plugins.models.backbone import BackboneSpec, create_backbone, load_backbone_state

__all__ = ["ViTClassifier", "HEADS"]

#: Supported head kinds.
HEADS = ("linear", "mlp")


class ViTClassifier(nn.Module):
    """ViT classifier on the backbone's CLS embedding.

    Args:
        spec: backbone architecture.
        num_classes: number of classes, >= 2.
        head: "linear" (``Linear(D, K)``) or "mlp" (``Linear(D, D) -> GELU -> Linear(D, K)``; hidden width = D, the
            usual choice for a light non-linear probe).
        pretrained: path to an exported backbone ``state_dict`` (strict load via
            :func:`~fl_plugins.models.backbone.load_backbone_state`), or None.
        freeze_backbone: linear probe: backbone frozen (no gradients, eval mode).

    ``forward(x [B, in_chans, H, W]) -> logits [B, num_classes]``.
    """

    def __init__(
        self,
        spec: BackboneSpec,
        num_classes: int,
        head: str = "linear",
        pretrained: str | Path | None = None,
        freeze_backbone: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; valid: {list(HEADS)}")
        self.spec = spec
        self.freeze_backbone = bool(freeze_backbone)
        self.backbone = create_backbone(spec)
        if pretrained is not None:
            load_backbone_state(self.backbone, pretrained)
        dim = int(self.backbone.embed_dim)
        if head == "linear":
            self.head: nn.Module = nn.Linear(dim, num_classes)
        else:
            self.head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, num_classes))
        if self.freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> ViTClassifier:
        """Set train/eval mode; a frozen backbone always stays in eval mode (no dropout / drop-path)."""
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify.

        Args:
            x: images ``[B, in_chans, H, W]`` (2D only; H and W multiples of the patch size).

        Returns:
            logits ``[B, num_classes]``.
        """
        if x.ndim != 4:
            raise ValueError(
                f"ViTClassifier takes 2D images [B, C, H, W], got shape {tuple(x.shape)} (3D inputs need a 3D ViT)"
            )
        if self.freeze_backbone:
            with torch.no_grad():
                feats = self.backbone(x)
        else:
            feats = self.backbone(x)  # [B, D] CLS embedding (num_classes=0, global_pool="token")
        return self.head(feats)
