"""CNN classification baseline: a MONAI ResNet (2D images or 3D volumes), the honest baseline beside the ViT.

Defaults are CPU-sized: ResNet-10 (``layers=[1, 1, 1, 1]``, MONAI ``resnet10``) with a quarter of the standard widths
(``widen_factor=0.25``: 16/32/64/128 channels; the standard 64..512 is ``widen_factor=1``) and, for MedMNIST's small
images, a 3x3 stride-1 first convolution without max-pooling (the standard 7x7 stride-2 + pool would reduce 28 px
to 7 px before the first block).
"""

from __future__ import annotations

from monai.networks.nets import ResNet
from torch import nn

__all__ = ["build_cnn_classifier", "CNN_DEPTHS"]

#: depth -> residual blocks per stage (MONAI resnet10 / resnet18)
CNN_DEPTHS = {10: [1, 1, 1, 1], 18: [2, 2, 2, 2]}


def build_cnn_classifier(
    num_classes: int,
    spatial_dims: int = 2,
    depth: int = 10,
    in_channels: int = 1,
    widen_factor: float = 0.25,
) -> nn.Module:
    """A MONAI ResNet mapping ``[B, in_channels, *S]`` (``S`` = 2 or 3 spatial axes) to logits ``[B, num_classes]``.

    Raises:
        ValueError: a setting out of range (named with its value).
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"model setting 'spatial_dims' must be 2 or 3, got {spatial_dims!r}")
    if depth not in CNN_DEPTHS:
        raise ValueError(f"model setting 'depth' must be one of {sorted(CNN_DEPTHS)}, got {depth!r}")
    if not widen_factor > 0:
        raise ValueError(f"model setting 'widen_factor' must be > 0, got {widen_factor!r}")
    if in_channels < 1:
        raise ValueError(f"model setting 'in_channels' must be >= 1, got {in_channels!r}")
    return ResNet(block="basic", layers=CNN_DEPTHS[depth], block_inplanes=[64, 128, 256, 512],
                  spatial_dims=spatial_dims, n_input_channels=in_channels, conv1_t_size=3, conv1_t_stride=1,
                  no_max_pool=True, widen_factor=widen_factor, num_classes=num_classes)
