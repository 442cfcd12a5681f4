"""From-scratch U-Net baseline (methods-spec 5.2 step 5, 8.1): a configured ``monai.networks.nets.UNet``, 2D (default)
or 3D (``spatial_dims=3``), and its encoder as a backbone (:class:`UNetEncoder`) whose weights load into it.

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

import torch
from monai.networks.nets import UNet
from torch import nn

__all__ = ["build_unet", "UNET_DEFAULTS", "UNetEncoder", "load_unet_pretrained", "OUTPUT_BLOCK_PREFIX"]

#: Keyword defaults of :func:`build_unet` (reasons in the module docstring).
UNET_DEFAULTS: dict = {
    "in_channels": 1,
    "channels": (16, 32, 64, 128, 256),
    "strides": (2, 2, 2, 2),
    "num_res_units": 2,
    "norm": "batch",
    "dropout": 0.0,
    "spatial_dims": 2,
}


def build_unet(
    num_classes: int,
    in_channels: int = 1,
    channels: Sequence[int] = (16, 32, 64, 128, 256),
    strides: Sequence[int] = (2, 2, 2, 2),
    num_res_units: int = 2,
    norm: str = "batch",
    dropout: float = 0.0,
    spatial_dims: int = 2,
) -> nn.Module:
    """Build the MONAI U-Net baseline (2D slices or 3D volumes).

    Args:
        num_classes: output channels (segmentation classes including background), >= 2.
        in_channels: image channels (1 for the project's MR/CT slices).
        channels: feature channels per level, ``len(strides) + 1`` entries.
        strides: down-sampling stride per level; H and W must be multiples of their product.
        num_res_units: residual units per block (0 = plain conv blocks).
        norm: MONAI norm name ("batch", "instance", ...).
        dropout: dropout probability inside the blocks.
        spatial_dims: 2 (``[B, C, H, W]``) or 3 (``[B, C, D, H, W]``).

    Returns:
        ``monai.networks.nets.UNet`` mapping ``x [B, in_channels, *spatial]`` to logits
        ``[B, num_classes, *spatial]``.

    Raises:
        ValueError: on inconsistent settings.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + foreground), got {num_classes}")
    if len(channels) != len(strides) + 1:
        raise ValueError(f"channels needs len(strides) + 1 = {len(strides) + 1} entries, got {list(channels)}")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if num_res_units < 0:
        raise ValueError(f"num_res_units must be >= 0, got {num_res_units}")
    return UNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=num_classes,
        channels=tuple(int(c) for c in channels),
        strides=tuple(int(s) for s in strides),
        num_res_units=num_res_units,
        norm=norm,
        dropout=dropout,
    )


class UNetEncoder(nn.Module):
    """The contracting path of :func:`build_unet` as a backbone: ``x [B, C, *spatial]`` -> ``[B, channels[-1]]``
    (global average of the bottom block's features).

    Its ``state_dict`` keys are exactly the U-Net's own keys for the down blocks and the bottom block
    (``model.0.*``, ``model.1.submodule.0.*``, ...; the up blocks are removed), so a pretrained encoder loads into
    the segmentation U-Net of ``finetune_seg_unet`` with ``load_state_dict(encoder_sd, strict=False)`` and fills
    every encoder tensor of it.

    Args:
        unet_kwargs: :func:`build_unet` arguments other than ``num_classes`` (the decoder's output is not built).
    """

    def __init__(self, **unet_kwargs: object) -> None:
        super().__init__()
        unet = build_unet(num_classes=2, **unet_kwargs)  # type: ignore[arg-type]
        self.spatial_dims = int(unet_kwargs.get("spatial_dims", 2))  # type: ignore[call-overload]
        self.embed_dim = int(unet.channels[-1])
        block: nn.Module = unet.model
        while True:  # MONAI nests Sequential(down, SkipConnection(sub), up); the innermost sub is the bottom block
            block[2] = nn.Identity()  # drop the up block (no parameters left on the expanding path)
            sub = block[1].submodule
            if isinstance(sub, nn.Sequential) and len(sub) == 3:
                block = sub
                continue
            break
        self.model = unet.model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(f"UNetEncoder(spatial_dims={self.spatial_dims}) takes [B, C, {'D, ' * (self.spatial_dims == 3)}H, W] "
                             f"input, got shape {tuple(x.shape)}")
        block: nn.Module = self.model
        while True:
            x = block[0](x)
            sub = block[1].submodule
            if isinstance(sub, nn.Sequential) and len(sub) == 3:
                block = sub
                continue
            x = sub(x)
            break
        return x.flatten(2).mean(-1)


#: The U-Net's output block: MONAI nests ``Sequential(down, SkipConnection(...), up)``; the outermost ``up``
#: (``model.2``) maps to the output channels, so its shapes depend on ``num_classes`` (or, for inpainting, on the
#: image channels) and it is the one part a pretrained U-Net may not fill.
OUTPUT_BLOCK_PREFIX = "model.2."


def load_unet_pretrained(net: nn.Module, path: str) -> str:
    """Load a pretrained U-Net (U-Net inpainting export, or an encoder export of :class:`UNetEncoder`) into the
    segmentation U-Net ``net``; returns a one-paragraph report of what was loaded and what starts fresh.

    Every tensor of the file must be a tensor of ``net`` with the same shape, except the output block
    (``model.2.*``), which stays randomly initialised when its shape differs (another number of output channels).
    Tensors of ``net`` absent from the file (the expanding path, for an encoder export) stay as built.

    Raises:
        fl_plugins.models.backbone.BackboneCheckpointError: file missing or unreadable, keys of another
            architecture, shape mismatches outside the output block (named with the file), nothing loadable.
    """
    from fl_plugins.models.backbone import BackboneCheckpointError, read_state_dict_file

    obj = read_state_dict_file(path, "pretrained U-Net checkpoint (model.pretrained)")
    own = net.state_dict()
    unexpected = sorted(set(obj) - set(own))
    mismatched = [k for k in sorted(set(obj) & set(own)) if obj[k].shape != own[k].shape]
    bad_shape = [f"{k}: checkpoint {tuple(obj[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched
                 if not k.startswith(OUTPUT_BLOCK_PREFIX)]
    if unexpected or bad_shape:
        raise BackboneCheckpointError(
            f"pretrained U-Net checkpoint {path!r} (model.pretrained) does not fit this U-Net (is it another "
            f"architecture, or other channels/strides/num_res_units?): {len(unexpected)} unexpected key(s) "
            f"{unexpected[:5]}, {len(bad_shape)} shape mismatch(es) {bad_shape[:3]}")
    load = {k: v for k, v in obj.items() if k not in mismatched}
    if not any(not k.endswith("num_batches_tracked") for k in load):
        raise BackboneCheckpointError(f"pretrained U-Net checkpoint {path!r} (model.pretrained) has no tensor this "
                                      "U-Net can take")
    net.load_state_dict(load, strict=False)
    fresh = sorted(set(own) - set(load))
    n_loaded = sum(int(v.numel()) for v in load.values())
    n_fresh = sum(int(own[k].numel()) for k in fresh)
    return (f"pretrained U-Net {path}: loaded {len(load)} tensors ({n_loaded:,d} values); randomly initialised "
            f"{len(fresh)} tensors ({n_fresh:,d} values)"
            + (f", e.g. {fresh[:3]}" if fresh else "")
            + (" (the output block: another number of output channels)" if mismatched else ""))
