"""DINO self-distillation loss over multi-crop views (Caron et al. 2021; DINOv2 CLS loss).

    L = (1 / N_terms) * sum_{i < T} sum_{j < S, j != i} mean_b H(P_t^i[b], P_s^j[b])

with ``H(a, b) = -sum_k a_k log b_k``, ``P_s^j = softmax(g_s(x_j) / tau_s)`` and ``P_t^i`` the teacher targets
of global crop ``i`` (centred + sharpened, or Sinkhorn-Knopp). The student's first ``T`` views are the same
crops the teacher saw, so pairs ``i == j`` (same view) are skipped and ``N_terms = T * S - min(T, S)``; with
``T = 2`` globals and ``L`` locals, ``N_terms = 2 (2 + L) - 2`` (methods-spec 2.3 [V]).

DINOv2's CLS loss (methods-spec 3.3) is the same quantity: its "global" term pairs each student global with
the *other* teacher global (``cat(t[1], t[0])``) and scales by 2, its "local" term pairs every local with both
teacher globals, and both are divided by ``n_global_terms + n_local_terms = 2 + 2L``.

References:
    - [0] DINO, 2021, https://arxiv.org/abs/2104.14294 ; facebookresearch/dino @ 7c446df ``DINOLoss`` [V]
    - [1] DINOv2, 2023, https://arxiv.org/abs/2304.07193 ; ``dinov2/loss/dino_clstoken_loss.py`` [V]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fl_plugins.core.centering import CENTER_MOMENTUM, centered_teacher_probs, update_center

__all__ = ["STUDENT_TEMP", "dino_num_terms", "dino_cross_entropy", "dino_loss"]

STUDENT_TEMP = 0.1  # tau_s, DINO/DINOv2 [V]


def dino_num_terms(n_teacher_views: int, n_student_views: int) -> int:
    """``N_terms = T * S - min(T, S)``: all (teacher view, student view) pairs except same-view ones."""
    if n_teacher_views < 1 or n_student_views < 1:
        raise ValueError(
            f"need >= 1 teacher and >= 1 student view, got {n_teacher_views} teacher and {n_student_views} student"
        )
    return n_teacher_views * n_student_views - min(n_teacher_views, n_student_views)


def _stack_views(views: Sequence[Tensor] | Tensor, what: str) -> Tensor:
    stacked = views if isinstance(views, Tensor) else torch.stack(list(views))
    if stacked.dim() != 3:
        raise ValueError(f"{what} must be a list of [B, K] tensors or a [V, B, K] tensor, got {tuple(stacked.shape)}")
    return stacked


def dino_cross_entropy(
    teacher_probs: Sequence[Tensor] | Tensor,
    student_logits: Sequence[Tensor] | Tensor,
    student_temp: float = STUDENT_TEMP,
) -> Tensor:
    """Cross-entropy between teacher targets and student predictions, skipping same-view pairs.

    Args:
        teacher_probs: ``T`` tensors ``[B, K]`` (or ``[T, B, K]``): normalised teacher targets of the global
            crops (rows sum to 1; no gradient flows into them).
        student_logits: ``S`` tensors ``[B, K]`` (or ``[S, B, K]``): raw student head outputs, the first ``T``
            being the same crops as the teacher's.
        student_temp: ``tau_s > 0``.

    Returns:
        Scalar loss: sum over the ``N_terms`` cross-view pairs of the batch-mean cross-entropy, / ``N_terms``.

    Raises:
        ValueError: on mismatched shapes, or when no cross-view pair exists (e.g. one view in total).
    """
    if student_temp <= 0:
        raise ValueError(f"student_temp must be > 0, got {student_temp}")
    t = _stack_views(teacher_probs, "teacher_probs").detach()
    s = _stack_views(student_logits, "student_logits")
    if t.shape[1:] != s.shape[1:]:
        raise ValueError(f"teacher views [B, K]={tuple(t.shape[1:])} != student views [B, K]={tuple(s.shape[1:])}")
    n_t, n_s, batch = t.shape[0], s.shape[0], t.shape[1]
    n_terms = dino_num_terms(n_t, n_s)
    if n_terms == 0:
        raise ValueError(
            f"DINO loss needs at least one cross-view pair, got {n_t} teacher and {n_s} student view(s) "
            "(same-view pairs are skipped)"
        )
    log_p_s = F.log_softmax(s / student_temp, dim=-1)
    # ce[i, j] = sum_b H(P_t^i[b], P_s^j[b]); one matmul-like contraction over batch and prototypes
    ce = -torch.einsum("tbk,sbk->ts", t.to(log_p_s.dtype), log_p_s)
    same_view = torch.eye(n_t, n_s, dtype=torch.bool, device=ce.device)
    return ce.masked_fill(same_view, 0.0).sum() / (n_terms * batch)


def dino_loss(
    teacher_logits: Sequence[Tensor] | Tensor,
    student_logits: Sequence[Tensor] | Tensor,
    center: Tensor,
    teacher_temp: float,
    student_temp: float = STUDENT_TEMP,
    center_momentum: float = CENTER_MOMENTUM,
) -> tuple[Tensor, Tensor]:
    """DINO loss with softmax centering; returns the loss and the *new* centre (the input is not modified).

    The loss uses the centre as passed in (the value before this step), then the centre is updated from the
    teacher logits of this step: ``C' = m C + (1 - m) mean_{views, batch} t`` (DINO order of operations [V]).

    Args:
        teacher_logits: ``T`` tensors ``[B, K]`` (or ``[T, B, K]``): teacher head outputs on the global crops.
        student_logits: ``S`` tensors ``[B, K]`` (or ``[S, B, K]``): student head outputs, globals first.
        center: ``[K]`` centre (lives in the method's state as ``buffers.dino_center``).
        teacher_temp: ``tau_t``, from ``linear_warmup_then_constant(global_step, ...)``.
        student_temp: ``tau_s`` (0.1 [V]).
        center_momentum: ``m`` (0.9 [V]).

    Returns:
        ``(loss, new_center)``: scalar loss, ``[K]`` centre.
    """
    t = _stack_views(teacher_logits, "teacher_logits").detach()
    probs = centered_teacher_probs(t, center, teacher_temp)
    loss = dino_cross_entropy(probs, student_logits, student_temp)
    return loss, update_center(center, t, center_momentum)
