"""Token-level forward of a timm ViT with optional iBOT masking (DINOv2 ``prepare_tokens_with_masks``).

Masked patch embeddings are replaced by a learnable ``mask_token`` *before* the positional embedding
(methods-spec 3.2 [V]). The token is registered on the backbone module itself (``backbone.mask_token``,
shape ``[1, D]``), so it appears in the method state as ``student.backbone.mask_token`` and is federated like
any backbone parameter (methods-spec 3.6). timm's ViT has no such parameter, so backbone export drops it
(:data:`EXTRA_BACKBONE_KEYS`).

The forward mirrors timm ``VisionTransformer.forward_features`` (patch_embed -> pos embed -> patch_drop ->
norm_pre -> blocks -> norm); it uses timm's ``_pos_embed`` (handles dynamic image size, class/register tokens,
``no_embed_class``). ``tests/core`` checks that the unmasked path equals timm's own ``forward``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["EXTRA_BACKBONE_KEYS", "add_mask_token", "forward_tokens"]

EXTRA_BACKBONE_KEYS = ("mask_token",)  # backbone state keys that timm's ViT does not have


def add_mask_token(backbone: nn.Module) -> nn.Parameter:
    """Register a zero-initialised ``mask_token [1, D]`` on a timm ViT (DINOv2 init: zeros [V])."""
    if hasattr(backbone, "mask_token"):
        raise ValueError("backbone already has a mask_token")
    token = nn.Parameter(torch.zeros(1, backbone.embed_dim))
    backbone.register_parameter("mask_token", token)
    return token


def forward_tokens(backbone: nn.Module, x: Tensor, masks: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Run a timm ViT and return the pooled CLS embedding and the patch tokens.

    Args:
        backbone: timm ``VisionTransformer`` (from ``fl_plugins.models.backbone.create_backbone``), with a
            ``mask_token`` when ``masks`` is given.
        x: ``[B, C, H, W]`` images, ``H, W`` multiples of the patch size.
        masks: optional ``[B, H/p, W/p]`` bool, True = replace that patch embedding by ``mask_token``.

    Returns:
        ``(cls [B, D], patches [B, N, D])`` after the final norm; ``cls`` equals ``backbone(x)`` when unmasked.
    """
    tokens = backbone.patch_embed(x)  # [B, h, w, D] (dynamic_img_size) or [B, N, D]
    if masks is not None:
        token = getattr(backbone, "mask_token", None)
        if token is None:
            raise ValueError("masks were given but the backbone has no mask_token (call add_mask_token)")
        if masks.shape[0] != tokens.shape[0] or masks[0].numel() != tokens[0].numel() // tokens.shape[-1]:
            raise ValueError(f"masks {tuple(masks.shape)} do not fit the patch grid of tokens {tuple(tokens.shape)}")
        m = masks.reshape(tokens.shape[:-1]).unsqueeze(-1)
        tokens = torch.where(m, token.to(tokens.dtype).expand_as(tokens), tokens)
    tokens = backbone._pos_embed(tokens)
    tokens = backbone.patch_drop(tokens)
    tokens = backbone.norm_pre(tokens)
    tokens = backbone.blocks(tokens)
    tokens = backbone.norm(tokens)
    cls = backbone.forward_head(tokens, pre_logits=True)
    return cls, tokens[:, backbone.num_prefix_tokens :]
