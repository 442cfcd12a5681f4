"""From-scratch 2D U-Net baseline (methods-spec 5.2 step 5, 8.1): a configured ``monai.networks.nets.UNet``.

The spec's reference network (positional_cl ``network/unet2d.py`` [V]) is a plain 4-level U-Net with ``f`` base
channels; we use MONAI's residual U-Net with the same widths instead of copying that code (the repository has no
license), so the baseline is a well-tested, documented network. Defaults:

* ``channels=(16, 32, 64, 128, 256)``: f = 16 for CPU runs (methods-spec 8.1/9.3 [R]), doubling per level with a
  16f bottleneck as in 8.1;
* ``strides=(2, 2, 2, 2)``: four 2x down-samplings as in 8.1 (so H and W must be multiples of 16);
* ``num_res_units=2``: MONAI's residual units (MONAI ``UNet`` tutorials' setting);
* ``norm="batch"``: BatchNorm as in 8.1 -- its running statistics are federated state
  (see :mod:`fl_plugins.engine.finetune`).

Parameter names are MONAI's (``model.0.conv...``); the whole network is the supervised model, so there is no
``backbone.``/``decoder.`` split.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import UNet
from torch import nn

__all__ = ["build_unet", "UNET_DEFAULTS"]

#: Keyword defaults of :func:`build_unet` (reasons in the module docstring).
UNET_DEFAULTS: dict = {
    "in_channels": 1,
    "channels": (16, 32, 64, 128, 256),
    "strides": (2, 2, 2, 2),
    "num_res_units": 2,
    "norm": "batch",
    "dropout": 0.0,
}


def build_unet(
    num_classes: int,
    in_channels: int = 1,
    channels: Sequence[int] = (16, 32, 64, 128, 256),
    strides: Sequence[int] = (2, 2, 2, 2),
    num_res_units: int = 2,
    norm: str = "batch",
    dropout: float = 0.0,
) -> nn.Module:
    """Build the 2D MONAI U-Net baseline.

    Args:
        num_classes: output channels (segmentation classes including background), >= 2.
        in_channels: image channels (1 for the project's MR/CT slices).
        channels: feature channels per level, ``len(strides) + 1`` entries.
        strides: down-sampling stride per level; H and W must be multiples of their product.
        num_res_units: residual units per block (0 = plain conv blocks).
        norm: MONAI norm name ("batch", "instance", ...).
        dropout: dropout probability inside the blocks.

    Returns:
        ``monai.networks.nets.UNet`` mapping ``x [B, in_channels, H, W]`` to logits ``[B, num_classes, H, W]``.

    Raises:
        ValueError: on inconsistent settings.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + foreground), got {num_classes}")
    if len(channels) != len(strides) + 1:
        raise ValueError(f"channels needs len(strides) + 1 = {len(strides) + 1} entries, got {list(channels)}")
    if num_res_units < 0:
        raise ValueError(f"num_res_units must be >= 0, got {num_res_units}")
    return UNet(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=num_classes,
        channels=tuple(int(c) for c in channels),
        strides=tuple(int(s) for s in strides),
        num_res_units=num_res_units,
        norm=norm,
        dropout=dropout,
    )
