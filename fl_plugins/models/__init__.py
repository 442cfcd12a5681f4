"""Models: the shared timm ViT backbone, the MONAI U-Net baseline, ViT segmenter/classifier and the factory."""

from __future__ import annotations

from fl_plugins.models.backbone import BackboneCheckpointError, BackboneSpec, create_backbone, load_backbone_state
from fl_plugins.models.classifier import ViTClassifier
from fl_plugins.models.factory import ARCH_KEYS, TASK_OF_ARCH, build_model, model_summary
from fl_plugins.models.unet import build_unet
from fl_plugins.models.vit_seg import UnetrDecoder2d, ViTSegmenter, evenly_spaced_blocks

__all__ = [
    "ARCH_KEYS",
    "BackboneCheckpointError",
    "BackboneSpec",
    "TASK_OF_ARCH",
    "UnetrDecoder2d",
    "ViTClassifier",
    "ViTSegmenter",
    "build_model",
    "build_unet",
    "create_backbone",
    "evenly_spaced_blocks",
    "load_backbone_state",
    "model_summary",
]
