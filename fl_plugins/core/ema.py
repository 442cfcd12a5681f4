"""Exponential moving average of parameters (DINO/DINOv2 teacher update).

``theta_t <- m * theta_t + (1 - m) * theta_s`` after every optimiser step, ``m`` from a cosine schedule of the
global step (DINO ``momentum_teacher = 0.996 -> 1`` [V]; DINOv2 ``0.992 -> 1`` [V]).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["update_momentum"]


@torch.no_grad()
def update_momentum(student: nn.Module, teacher: nn.Module, m: float) -> None:
    """In-place EMA of ``teacher``'s parameters toward ``student``'s: ``t <- m t + (1 - m) s``.

    Only parameters are averaged (as in DINO); buffers are left alone. Parameters are paired in
    ``parameters()`` order, so both modules must have the same architecture. One fused
    ``torch._foreach_lerp_`` call: ``m = 1`` keeps the teacher bit-exactly, ``m = 0`` copies the student
    bit-exactly.

    Args:
        student: source module (not modified).
        teacher: EMA module, updated in place.
        m: momentum in ``[0, 1]``.

    Raises:
        ValueError: if ``m`` is outside ``[0, 1]`` or the parameter lists differ in length or shape.
    """
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"EMA momentum m must be in [0, 1], got {m}")
    s_params = list(student.parameters())
    t_params = list(teacher.parameters())
    if len(s_params) != len(t_params):
        raise ValueError(f"student has {len(s_params)} parameters but teacher has {len(t_params)}")
    for i, (s, t) in enumerate(zip(s_params, t_params)):
        if s.shape != t.shape:
            raise ValueError(f"parameter #{i}: student shape {tuple(s.shape)} != teacher shape {tuple(t.shape)}")
    if not t_params:
        return
    # lerp(t, s, w) = t + w (s - t) with w = 1 - m; exact at w = 0 and w = 1.
    torch._foreach_lerp_([t.data for t in t_params], [s.data for s in s_params], 1.0 - m)
