"""Build a supervised model from a plain config dict (the form jobs and the CLI carry).

Config schema (``arch`` and ``num_classes`` always; other keys optional, defaults in brackets)::

    {"arch": "unet", "num_classes": 3,
     "in_channels": 1, "channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2],
     "num_res_units": 2, "norm": "batch", "dropout": 0.0, "spatial_dims": 2,
     "pretrained": null}                                                          # fl_plugins.models.unet
    {"arch": "vit_seg", "num_classes": 3, "backbone": {BackboneSpec fields},
     "pretrained": null, "feature_size": 16, "norm_name": "instance"}           # fl_plugins.models.vit_seg
    {"arch": "vit_classifier", "num_classes": 2, "backbone": {BackboneSpec fields},
     "pretrained": null, "head": "linear", "freeze_backbone": false,
     "spatial_dims": 2, "num_slices": 8}            # fl_plugins.models.classifier; 3D: models.slice_classifier
    {"arch": "cnn_classifier", "num_classes": 2, "spatial_dims": 2, "depth": 10,
     "in_channels": 1, "widen_factor": 0.25}                                     # fl_plugins.models.cnn_classifier

``pretrained`` is the path of an exported backbone ``state_dict`` (U-Net: an exported inpainting U-Net or U-Net
encoder; every tensor but the output block loads, see ``fl_plugins.models.unet.load_unet_pretrained``). In a FedAvg job the server's initial global
model overwrites the sites' weights in round 0, so the path must be readable where the server persistor builds the
model (and on the sites for a frozen, non-federated backbone).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from fl_plugins.models.backbone import BackboneSpec
from fl_plugins.models.classifier import ViTClassifier
from fl_plugins.models.cnn_classifier import build_cnn_classifier
from fl_plugins.models.unet import build_unet, load_unet_pretrained
from fl_plugins.models.vit_seg import ViTSegmenter

logger = logging.getLogger(__name__)

__all__ = ["build_model", "model_summary", "ARCH_KEYS", "TASK_OF_ARCH"]

_COMMON = ("arch", "num_classes")

#: Valid config keys per architecture.
ARCH_KEYS: dict[str, tuple[str, ...]] = {
    "unet": _COMMON + ("in_channels", "channels", "strides", "num_res_units", "norm", "dropout", "spatial_dims",
                       "pretrained"),
    "vit_seg": _COMMON + ("backbone", "pretrained", "feature_size", "norm_name"),
    "vit_classifier": _COMMON + ("backbone", "pretrained", "head", "freeze_backbone", "spatial_dims", "num_slices"),
    "cnn_classifier": _COMMON + ("spatial_dims", "depth", "in_channels", "widen_factor"),
}

#: Task each architecture solves ("segmentation" or "classification").
TASK_OF_ARCH: dict[str, str] = {"unet": "segmentation", "vit_seg": "segmentation", "vit_classifier": "classification",
                                 "cnn_classifier": "classification"}


def _spec(cfg: Mapping[str, Any]) -> BackboneSpec:
    b = cfg.get("backbone", {})
    if isinstance(b, BackboneSpec):
        return b
    if not isinstance(b, Mapping):
        raise ValueError(f"model config key 'backbone' must be a dict of BackboneSpec fields, got {type(b).__name__}")
    try:
        return BackboneSpec.from_dict(dict(b))
    except (TypeError, ValueError) as e:
        raise ValueError(f"model config key 'backbone': {e}") from e


def _build_unet(cfg: Mapping[str, Any]) -> nn.Module:
    kw = {k: v for k, v in cfg.items() if k not in _COMMON + ("pretrained",)}
    net = build_unet(num_classes=int(cfg["num_classes"]), **kw)
    if cfg.get("pretrained"):
        logger.info(load_unet_pretrained(net, str(cfg["pretrained"])))
    return net


def _build_vit_seg(cfg: Mapping[str, Any]) -> nn.Module:
    return ViTSegmenter(
        _spec(cfg),
        num_classes=int(cfg["num_classes"]),
        pretrained=cfg.get("pretrained"),
        feature_size=int(cfg.get("feature_size", 16)),
        norm_name=str(cfg.get("norm_name", "instance")),
    )


def _build_vit_classifier(cfg: Mapping[str, Any]) -> nn.Module:
    """2D: :class:`ViTClassifier`; ``spatial_dims=3``: the same 2D ViT over ``num_slices`` evenly spaced axial slices
    of each volume, embeddings averaged (:class:`~fl_plugins.models.slice_classifier.SliceViTClassifier`, the
    stage-wise job's 3D path; same keys, so a 2D export loads and the export is a 2D backbone)."""
    dims = cfg.get("spatial_dims", 2)
    if dims not in (2, 3) or isinstance(dims, bool):
        raise ValueError(f"model config key 'spatial_dims' must be 2 or 3, got {dims!r}")
    common = dict(num_classes=int(cfg["num_classes"]), head=str(cfg.get("head", "linear")),
                  pretrained=cfg.get("pretrained"), freeze_backbone=bool(cfg.get("freeze_backbone", False)))
    if dims == 3:
        from fl_plugins.models.slice_classifier import SliceViTClassifier

        return SliceViTClassifier(_spec(cfg), num_slices=cfg.get("num_slices", 8), **common)
    if "num_slices" in cfg:
        raise ValueError("model config key 'num_slices' needs spatial_dims=3 (it picks the slices of a volume)")
    return ViTClassifier(_spec(cfg), **common)


def _build_cnn_classifier(cfg: Mapping[str, Any]) -> nn.Module:
    return build_cnn_classifier(num_classes=int(cfg["num_classes"]), **{k: v for k, v in cfg.items() if k not in _COMMON})


_BUILDERS: dict[str, Callable[[Mapping[str, Any]], nn.Module]] = {
    "cnn_classifier": _build_cnn_classifier,
    "unet": _build_unet,
    "vit_seg": _build_vit_seg,
    "vit_classifier": _build_vit_classifier,
}


def build_model(cfg: Mapping[str, Any]) -> nn.Module:
    """Build a randomly initialised (or backbone-pretrained) model from a config dict.

    Args:
        cfg: model config (schema in the module docstring).

    Returns:
        the model; segmentation archs map ``[B, C, H, W]`` to ``[B, num_classes, H, W]``, the classifier to
        ``[B, num_classes]``.

    Raises:
        ValueError: unknown ``arch`` or unknown keys (the message names them and lists the valid ones), missing
            or invalid ``num_classes``, invalid backbone settings.
        fl_plugins.models.backbone.BackboneCheckpointError: ``pretrained`` file missing or not fitting.
    """
    if not isinstance(cfg, Mapping):
        raise ValueError(f"model config must be a dict, got {type(cfg).__name__}")
    arch = cfg.get("arch")
    if arch not in _BUILDERS:
        raise ValueError(f"model config key 'arch' has unknown value {arch!r}; valid: {sorted(_BUILDERS)} (pretraining methods are built by fl_plugins.methods.build)")
    unknown = sorted(set(cfg) - set(ARCH_KEYS[arch]))
    if unknown:
        raise ValueError(f"unknown model config key(s) {unknown} for arch {arch!r}; valid: {list(ARCH_KEYS[arch])}")
    nc = cfg.get("num_classes")
    if isinstance(nc, bool) or not isinstance(nc, int) or nc < 2:
        raise ValueError(f"model config key 'num_classes' must be an int >= 2, got {nc!r}")
    return _BUILDERS[arch](cfg)


def model_summary(model: nn.Module) -> str:
    """One line per top-level child: parameter count (trainable / total), plus a total line."""
    lines = []
    total = trainable = 0
    for name, child in model.named_children():
        n = sum(p.numel() for p in child.parameters())
        t = sum(p.numel() for p in child.parameters() if p.requires_grad)
        total, trainable = total + n, trainable + t
        lines.append(f"{name:<16s} {t:>12,d} / {n:>12,d}")
    direct = [p for p in model.parameters(recurse=False)]
    if direct:
        n = sum(p.numel() for p in direct)
        t = sum(p.numel() for p in direct if p.requires_grad)
        total, trainable = total + n, trainable + t
        lines.append(f"{'(own)':<16s} {t:>12,d} / {n:>12,d}")
    lines.append(f"{type(model).__name__}: {trainable:,d} trainable / {total:,d} parameters")
    return "\n".join(lines)
