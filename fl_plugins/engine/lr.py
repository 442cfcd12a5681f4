"""Learning-rate schedule as a pure function of the (server-owned) global step.

In federated training the schedule position must not live on a site (methods-spec 1.2: schedule state is never
on the wire, it is derived from the round index), so the LR of a step is computed from
``global_step = round * steps_per_round + local_step`` alone.
"""

from __future__ import annotations

import math

__all__ = ["cosine_lr"]


def cosine_lr(step: int, total_steps: int, base: float, min_lr: float = 0.0, warmup: int = 0) -> float:
    """Linear warmup then half-cosine decay from ``base`` to ``min_lr`` (DINO ``utils.cosine_scheduler`` shape).

    * ``step < warmup``: ``base * (step + 1) / warmup`` (reaches ``base`` at the last warmup step; no zero-LR step);
    * ``warmup <= step < total_steps``: ``min_lr + (base - min_lr) * (1 + cos(pi * t)) / 2`` with
      ``t = (step - warmup) / (total_steps - warmup)``, so the first decay step has ``base``;
    * ``step >= total_steps``: ``min_lr``.

    Args:
        step: global optimizer step, >= 0.
        total_steps: schedule length in steps, >= 1.
        base: peak learning rate.
        min_lr: final learning rate.
        warmup: number of linear warmup steps, ``0 <= warmup <= total_steps``.

    Returns:
        the learning rate of ``step``.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup <= total_steps:
        raise ValueError(f"warmup must be in [0, total_steps={total_steps}], got {warmup}")
    if step < warmup:
        return base * (step + 1) / warmup
    if step >= total_steps:
        return min_lr
    t = (step - warmup) / (total_steps - warmup)
    return min_lr + 0.5 * (base - min_lr) * (1.0 + math.cos(math.pi * t))
