"""ViT encoder + UNETR-style decoder for 2D segmentation (methods-spec 5.2 step 3 [R]).

Encoder: the shared timm ViT of :mod:`fl_plugins.models.backbone` (so an exported SSL backbone loads unchanged).
Decoder (after UNETR, Hatamizadeh et al. 2022; MONAI ``UNETR``, built from MONAI's 2D blocks):

* hidden states of 4 evenly spaced blocks (blocks {3, 6, 9, 12} of a 12-block ViT, see
  :func:`evenly_spaced_blocks`) are read with timm's ``forward_intermediates`` as feature maps
  ``[B, D, H/p, W/p]``; the deepest one is the backbone's final, LayerNorm-ed output (the representation SSL
  pretraining trained), the three shallower ones are raw block outputs as in UNETR;
* the deepest map is progressively up-sampled by ``log2(p)`` ``UnetrUpBlock`` s (2x transposed conv, concat skip,
  residual conv block); at a resolution ``(H/p) * 2^j`` the skip is the sum of the shallower hidden states brought
  there by ``UnetrPrUpBlock`` (shallower block -> higher resolution, as UNETR's z3/z6/z9; when ``p < 16`` there are
  fewer resolutions than hidden states and the shallowest ones share the finest skip level below full
  resolution), and at full resolution the skip is a conv block on the input image (UNETR's ``encoder1``);
* a 1x1 conv (``UnetOutBlock``) gives per-pixel logits.

Widths follow UNETR: ``feature_size * 2^(log2(p) - j)`` channels after up-step ``j`` (p=16: 8F, 4F, 2F, F).

Parameter name prefixes: ``backbone.`` (the timm ViT) and ``decoder.`` (everything else). Methods-spec 1.2 names
supervised heads ``task_head.``; the segmentation decoder is called ``decoder.`` here because it is a multi-scale
network that also reads the input image, not a head on the pooled embedding. Aggregation regexes should use
``^decoder\\.`` for it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from torch import nn

from fl_plugins.models.backbone import BackboneSpec, create_backbone, load_backbone_state

__all__ = ["ViTSegmenter", "UnetrDecoder2d", "evenly_spaced_blocks", "SUPPORTED_PATCH_SIZES"]

#: Patch sizes the decoder supports: powers of two with log2(p) - 1 <= 3 skip resolutions for the 3 shallower
#: hidden states (p=16 is exactly UNETR; 8 and 4 share skip levels; larger p would leave skip levels empty).
SUPPORTED_PATCH_SIZES = (4, 8, 16)


def evenly_spaced_blocks(depth: int, n: int = 4) -> list[int]:
    """0-based indices of ``n`` evenly spaced transformer blocks, the last one being the final block.

    ``depth=12`` gives ``[2, 5, 8, 11]`` (UNETR's blocks 3, 6, 9, 12); shallow ViTs repeat blocks
    (``depth=2`` -> ``[0, 0, 1, 1]``).

    Args:
        depth: number of blocks of the ViT, >= 1.
        n: number of blocks to pick.

    Returns:
        ``n`` non-decreasing indices in ``[0, depth - 1]``.
    """
    if depth < 1 or n < 1:
        raise ValueError(f"depth and n must be >= 1, got depth={depth}, n={n}")
    return [math.ceil(depth * k / n) - 1 for k in range(1, n + 1)]


class UnetrDecoder2d(nn.Module):
    """UNETR-style 2D decoder from 4 ViT feature maps and the input image (see module docstring).

    Args:
        in_chans: image channels (input skip).
        embed_dim: ViT width ``D``.
        patch_size: ViT patch size ``p``, one of :data:`SUPPORTED_PATCH_SIZES`.
        num_classes: output classes (including background).
        feature_size: UNETR base width ``F``; 16 is MONAI ``UNETR``'s and the UNETR paper's default.
        norm_name: MONAI norm of the conv blocks; "instance" is MONAI ``UNETR``'s default (and keeps the decoder
            free of BatchNorm running statistics).
        res_block: residual conv blocks (MONAI ``UNETR`` default True).
    """

    def __init__(
        self,
        in_chans: int,
        embed_dim: int,
        patch_size: int,
        num_classes: int,
        feature_size: int = 16,
        norm_name: str = "instance",
        res_block: bool = True,
    ) -> None:
        super().__init__()
        if patch_size not in SUPPORTED_PATCH_SIZES:
            raise ValueError(
                f"UNETR-style decoder supports patch sizes {SUPPORTED_PATCH_SIZES}, got patch_size={patch_size}"
            )
        if feature_size < 1:
            raise ValueError(f"feature_size must be >= 1, got {feature_size}")
        n_up = int(math.log2(patch_size))
        self.n_up = n_up

        def width(level: int) -> int:  # channels at resolution (H/p) * 2^level
            return feature_size * 2 ** (n_up - level)

        # hidden state i (0 = shallowest of the 3 skip states) goes to resolution level 3 - i, capped at n_up - 1
        self.skip_levels = [min(3 - i, n_up - 1) for i in range(3)]
        self.input_skip = UnetrBasicBlock(2, in_chans, feature_size, kernel_size=3, stride=1, norm_name=norm_name,
                                          res_block=res_block)
        self.skips = nn.ModuleList(
            UnetrPrUpBlock(2, embed_dim, width(lvl), num_layer=lvl - 1, kernel_size=3, stride=1,
                           upsample_kernel_size=2, norm_name=norm_name, conv_block=True, res_block=res_block)
            for lvl in self.skip_levels
        )
        self.ups = nn.ModuleList(
            UnetrUpBlock(2, embed_dim if j == 1 else width(j - 1), width(j), kernel_size=3, upsample_kernel_size=2,
                         norm_name=norm_name, res_block=res_block)
            for j in range(1, n_up + 1)
        )
        self.out = UnetOutBlock(2, feature_size, num_classes)

    def forward(self, image: torch.Tensor, hidden: list[torch.Tensor]) -> torch.Tensor:
        """Decode.

        Args:
            image: input ``[B, C, H, W]``.
            hidden: 4 feature maps ``[B, D, H/p, W/p]``, shallow to deep.

        Returns:
            logits ``[B, num_classes, H, W]``.
        """
        if len(hidden) != 4:
            raise ValueError(f"expected 4 hidden feature maps, got {len(hidden)}")
        skip_at: dict[int, torch.Tensor] = {}
        for lvl, block, z in zip(self.skip_levels, self.skips, hidden[:3], strict=True):
            s = block(z)
            skip_at[lvl] = s if lvl not in skip_at else skip_at[lvl] + s
        skip_at[self.n_up] = self.input_skip(image)
        x = hidden[3]
        for j, up in enumerate(self.ups, start=1):
            x = up(x, skip_at[j])
        return self.out(x)


class ViTSegmenter(nn.Module):
    """timm ViT encoder (``backbone.``) + UNETR-style decoder (``decoder.``) for 2D segmentation.

    Args:
        spec: backbone architecture (its ``patch_size`` must be one of :data:`SUPPORTED_PATCH_SIZES`).
        num_classes: output classes including background, >= 2.
        pretrained: path to an exported backbone ``state_dict`` (loaded strictly with
            :func:`~fl_plugins.models.backbone.load_backbone_state`, which names the file and offending keys on a
            mismatch), or None for random initialisation.
        feature_size: decoder base width (see :class:`UnetrDecoder2d`).
        norm_name: decoder norm (see :class:`UnetrDecoder2d`).

    ``forward(x [B, in_chans, H, W]) -> logits [B, num_classes, H, W]``; H and W must be multiples of the patch
    size (other sizes than ``spec.img_size`` work: the backbone interpolates its position embedding).
    """

    def __init__(
        self,
        spec: BackboneSpec,
        num_classes: int,
        pretrained: str | Path | None = None,
        feature_size: int = 16,
        norm_name: str = "instance",
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + foreground), got {num_classes}")
        self.spec = spec
        self.backbone = create_backbone(spec)
        if pretrained is not None:
            load_backbone_state(self.backbone, pretrained)
        self.block_indices = evenly_spaced_blocks(spec.depth)
        self.decoder = UnetrDecoder2d(
            in_chans=spec.in_chans,
            embed_dim=int(self.backbone.embed_dim),
            patch_size=spec.patch_size,
            num_classes=num_classes,
            feature_size=feature_size,
            norm_name=norm_name,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segment.

        Args:
            x: images ``[B, in_chans, H, W]``, H and W multiples of the patch size.

        Returns:
            logits ``[B, num_classes, H, W]``.
        """
        if x.ndim != 4:
            raise ValueError(f"ViTSegmenter expects [B, C, H, W] images, got shape {tuple(x.shape)}")
        p = self.spec.patch_size
        h, w = x.shape[-2:]
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        shallow = sorted(set(self.block_indices[:3]))
        final, inter = self.backbone.forward_intermediates(
            x, indices=shallow, norm=False, output_fmt="NCHW", intermediates_only=False
        )
        by_block = dict(zip(shallow, inter, strict=True))
        # final: [B, prefix + (H/p)(W/p), D] after the backbone's final LayerNorm -> [B, D, H/p, W/p]
        tokens = final[:, self.backbone.num_prefix_tokens :]
        deep = tokens.transpose(1, 2).reshape(x.shape[0], -1, h // p, w // p)
        hidden = [by_block[i] for i in self.block_indices[:3]] + [deep]
        return self.decoder(x, hidden)
