"""Pluggable backbones for every method, from one config dict: ``build_backbone({"kind": ..., ...})``.

======================= ============================================= ==========================================
kind                    network                                       input -> output
======================= ============================================= ==========================================
``vit`` (default)       timm ViT (:class:`BackboneSpec` fields)        ``[B, C, H, W]`` -> ``[B, D]`` (CLS); 2D only
``unet_encoder``        MONAI U-Net contracting path                  ``[B, C, *S]`` -> ``[B, channels[-1]]``
                        (:class:`~fl_plugins.models.unet.UNetEncoder`)
``unet``                the whole MONAI U-Net (encoder and decoder),  ``[B, C, *S]`` -> ``[B, out_channels, *S]``
                        for methods that pretrain a decoder
======================= ============================================= ==========================================

``spatial_dims`` (2 or 3) selects slices or volumes where MONAI supports it (the U-Net kinds); timm's ViT is 2D.
The ``unet*`` kinds take :func:`~fl_plugins.models.unet.build_unet` arguments, so an encoder or a whole network
pretrained here loads into the segmentation U-Net of the fine-tuning job with the same settings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from fl_plugins.models.backbone import BackboneSpec, create_backbone
from fl_plugins.models.unet import UNetEncoder, build_unet

__all__ = ["build_backbone", "feature_dim", "BACKBONE_KINDS"]

_UNET_KEYS = ("in_channels", "channels", "strides", "num_res_units", "norm", "dropout", "spatial_dims")


def _vit(cfg: dict[str, Any]) -> nn.Module:
    dims = cfg.pop("spatial_dims", 2)
    if dims != 2:
        raise ValueError(f"backbone kind 'vit' (timm) is 2D only: spatial_dims must be 2, got {dims!r}; use kind "
                         "'unet_encoder' for volumes")
    return create_backbone(BackboneSpec.from_dict(cfg))


def _unet_kwargs(cfg: dict[str, Any], kind: str, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    unknown = sorted(set(cfg) - set(_UNET_KEYS) - set(extra))
    if unknown:
        raise ValueError(f"unknown backbone setting(s) {unknown} for kind {kind!r}; valid: {list(_UNET_KEYS + extra)}")
    return cfg


def _unet_encoder(cfg: dict[str, Any]) -> nn.Module:
    return UNetEncoder(**_unet_kwargs(cfg, "unet_encoder"))


def _unet(cfg: dict[str, Any]) -> nn.Module:
    kw = _unet_kwargs(cfg, "unet", extra=("out_channels",))
    out = int(kw.pop("out_channels", kw.get("in_channels", 1)))
    if out < 1:
        raise ValueError(f"backbone setting 'out_channels' must be >= 1, got {out}")
    # build_unet counts classes (>= 2); a reconstruction head may have 1 output channel, so build with MONAI directly
    from monai.networks.nets import UNet

    ref = build_unet(num_classes=2, **kw)  # validates the settings (the messages name them)
    return UNet(spatial_dims=ref.dimensions, in_channels=ref.in_channels, out_channels=out, channels=ref.channels,
                strides=ref.strides, num_res_units=ref.num_res_units, norm=ref.norm, dropout=ref.dropout)


#: kind -> builder (config without ``kind``)
BACKBONE_KINDS: dict[str, Callable[[dict[str, Any]], nn.Module]] = {
    "vit": _vit,
    "unet_encoder": _unet_encoder,
    "unet": _unet,
}


def build_backbone(cfg: Mapping[str, Any]) -> nn.Module:
    """Build the backbone described by ``cfg`` (``kind`` defaults to ``"vit"``).

    Raises:
        ValueError: unknown kind or setting, a 3D ViT, inconsistent U-Net settings (each names the setting).
    """
    if not isinstance(cfg, Mapping):
        raise ValueError(f"backbone config must be a dict, got {type(cfg).__name__}")
    c = dict(cfg)
    kind = c.pop("kind", "vit")
    if kind not in BACKBONE_KINDS:
        raise ValueError(f"backbone setting 'kind' has unknown value {kind!r}; valid: {sorted(BACKBONE_KINDS)}")
    return BACKBONE_KINDS[kind](c)


def feature_dim(backbone: nn.Module) -> int:
    """The width of the vector a :func:`build_backbone` backbone outputs per image (``[B, C, ...] -> [B, D]``): a timm
    ViT's ``embed_dim`` / ``num_features``, the U-Net encoder's ``embed_dim`` (its deepest channel count).

    Raises:
        ValueError: a module that declares neither (not a vector backbone, e.g. the whole U-Net).
    """
    dim = int(getattr(backbone, "embed_dim", 0) or getattr(backbone, "num_features", 0))
    if dim < 1:
        raise ValueError(f"{type(backbone).__name__} declares no feature width (embed_dim / num_features): not a "
                         "backbone with one vector per image")
    return dim
