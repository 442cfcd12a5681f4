"""iBOT masked-patch self-distillation loss (DINOv2 patch-level term).

    L_iBOT = -(1 / N_img) * sum_b (1 / |M_b|) * sum_{i in M_b} sum_k p_t,i^k log p_s,i^k

over the ``N_img`` student global crops (images with an empty mask contribute 0 but still count in
``N_img``, as in DINOv2's ``forward_masked`` which divides by ``masks.shape[0]`` [V]): a per-image mean over
its masked patches, then a mean over images, so small masks are not down-weighted. DINOv2 then scales by
``2 * (1 / n_global_crops) = 1`` for two global crops (methods-spec 3.3 [V]).

The teacher targets use their own centre, ``buffers.ibot_center`` (EMA 0.9 over the teacher logits of the
masked patches), or Sinkhorn-Knopp over the masked patches.

References:
    - [0] iBOT, 2021, https://arxiv.org/abs/2111.07832
    - [1] DINOv2 ``dinov2/loss/ibot_patch_loss.py`` @ b8931f7 [V]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fl_plugins.core.dino_loss import STUDENT_TEMP

__all__ = ["ibot_patch_weights", "ibot_patch_loss"]


def ibot_patch_weights(masks: Tensor) -> Tensor:
    """Weight ``1 / |M_b|`` of every masked patch, in ``masks[masks]`` order.

    Args:
        masks: ``[N_img, ...]`` bool, True = masked patch (e.g. ``[N_img, h, w]`` or ``[N_img, h * w]``).

    Returns:
        ``[M]`` float weights, ``M = masks.sum()``; the weights of one image sum to 1.
    """
    if masks.dtype != torch.bool:
        raise ValueError(f"masks must be a bool tensor, got {masks.dtype}")
    flat = masks.reshape(masks.shape[0], -1)
    per_image = flat.sum(dim=1, keepdim=True).clamp(min=1).float()
    return (1.0 / per_image).expand_as(flat)[flat]


def ibot_patch_loss(
    teacher_probs: Tensor,
    student_logits: Tensor,
    masks: Tensor,
    student_temp: float = STUDENT_TEMP,
) -> Tensor:
    """Masked-patch cross-entropy: per-image mean over masked patches, then mean over all ``N_img`` images.

    Args:
        teacher_probs: ``[M, K]`` teacher targets of the masked patches (rows sum to 1), in ``masks[masks]``
            order (image-major, then row-major patch order).
        student_logits: ``[M, K]`` student head outputs of the same patches.
        masks: ``[N_img, h, w]`` (or ``[N_img, h * w]``) bool, ``masks.sum() == M``.
        student_temp: ``tau_s > 0``.

    Returns:
        Scalar loss (0 with a graph when no patch is masked).
    """
    if student_temp <= 0:
        raise ValueError(f"student_temp must be > 0, got {student_temp}")
    if teacher_probs.shape != student_logits.shape or teacher_probs.dim() != 2:
        raise ValueError(
            f"teacher_probs {tuple(teacher_probs.shape)} and student_logits {tuple(student_logits.shape)} "
            "must both be [M, K]"
        )
    n_masked = int(masks.sum())
    if n_masked != teacher_probs.shape[0]:
        raise ValueError(f"masks select {n_masked} patches but {teacher_probs.shape[0]} patch outputs were given")
    n_images = masks.shape[0]
    if n_images == 0:
        raise ValueError("masks must cover at least one image")
    ce = -(teacher_probs.detach() * F.log_softmax(student_logits / student_temp, dim=-1)).sum(dim=-1)  # [M]
    return (ce * ibot_patch_weights(masks).to(ce.dtype)).sum() / n_images
