"""Pure schedule functions of a server-owned GLOBAL step.

In federated training a client runs ``T`` local steps per round, so every schedule (LR, weight decay, teacher
momentum, teacher temperature) is indexed by ``global_step = round * T + t`` that the server owns
(methods-spec 2.7: "Schedules ... are functions of the *global* iteration"). No function here keeps state:
the same ``(step, ...)`` always gives the same value, on every site.

Conventions shared by all functions:

* ``step < 0``, a negative length, or a negative warm-up raise :class:`ValueError` naming the argument.
* Steps past the end of a schedule are clamped: the schedule stays at its final value (no warning: a site
  that joins late or runs extra steps must not crash or spam logs).
* A schedule of length 0 returns its final value.
* Warm-up, one convention for every schedule of the package (DINO/DINOv2 LR and teacher temperature, the
  fine-tuning LR of ``fl_plugins.engine.finetune``): a linear ramp over ``W`` steps whose value at step 0 is the
  start value (``0`` for a learning rate, as in DINO [0]) and which reaches the peak at step ``W``, where the
  warm-up ends and the decay (or the constant) begins: ``value(s) = start + (peak - start) * s / W`` for
  ``s < W``. (DINO's ``np.linspace`` reaches the peak one step earlier, at ``W - 1``.) ``W = 0``: no warm-up,
  step 0 has the peak value.

References:
    - [0] DINO ``utils.cosine_scheduler`` (facebookresearch/dino @ 7c446df): linear warm-up from
      ``start_warmup_value`` then ``final + 0.5 (base - final)(1 + cos(pi i / n))`` [V].
    - [1] DINO ``DINOLoss`` teacher temperature: ``linspace(warmup_teacher_temp, teacher_temp, warmup)`` then
      constant [V].
"""

from __future__ import annotations

import math

__all__ = ["cosine_schedule", "linear_warmup_then_constant", "cosine_with_warmup", "warmup_cosine_or_constant",
           "step_horizon"]


def step_horizon(steps_per_round: int, num_rounds: int) -> int:
    """The schedule horizon of a federated job: every local step of every round, ``steps_per_round * num_rounds``.

    The one rule for a method's or trainer's ``total_steps`` when a job leaves it unset (None): the job builders and
    the site handlers both call this, so the server's copy of a config and every site's agree. ``num_rounds`` below
    1 counts as 1 (a site told 0 rounds still has one round's schedule).

    Example:
        >>> step_horizon(5, 10), step_horizon(5, 0)
        (50, 5)
    """
    if isinstance(steps_per_round, bool) or int(steps_per_round) != steps_per_round or steps_per_round < 1:
        raise ValueError(f"steps_per_round must be an int >= 1, got {steps_per_round!r}")
    return int(steps_per_round) * max(1, int(num_rounds))


def _check_non_negative(**values: int) -> None:
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def cosine_schedule(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` (at step 0) to ``end`` (at ``step >= total_steps``).

    ``value = end + (start - end) * (1 + cos(pi * step / total_steps)) / 2`` (DINO ``cosine_scheduler`` without
    warm-up [V]). Used for the teacher momentum ``0.996 -> 1`` (DINO) / ``0.992 -> 1`` (DINOv2).

    Args:
        step: global step, ``>= 0``; clamped to ``total_steps``.
        total_steps: schedule length, ``>= 0``; ``0`` returns ``end``.
        start: value at step 0.
        end: value at ``total_steps`` and after.

    Example:
        >>> cosine_schedule(0, 100, 0.996, 1.0), cosine_schedule(100, 100, 0.996, 1.0)
        (0.996, 1.0)
    """
    _check_non_negative(step=step, total_steps=total_steps)
    if total_steps == 0 or step >= total_steps:
        return float(end)
    return float(end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * step / total_steps)))


def linear_warmup_then_constant(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear ramp ``start -> end`` over ``warmup_steps``, then constant ``end`` (teacher temperature).

    ``value = start + (end - start) * step / warmup_steps`` for ``step < warmup_steps``, else ``end``. DINO
    defaults: ``0.04 -> 0.04`` (code) or ``0.04 -> 0.07`` over 30 of 100 epochs (README / DINOv2) [V];
    "anything above 0.07 is unstable" (DINO help) [V]. Differs from DINO's ``linspace(start, end, n)`` only in
    that ``end`` is reached at step ``n`` instead of ``n - 1``.

    Args:
        step: global step, ``>= 0``.
        warmup_steps: length of the ramp, ``>= 0``; ``0`` returns ``end`` from step 0.
        start: value at step 0.
        end: value from ``warmup_steps`` on.
    """
    _check_non_negative(step=step, warmup_steps=warmup_steps)
    if step >= warmup_steps:
        return float(end)
    return float(start + (end - start) * step / warmup_steps)


def cosine_with_warmup(
    step: int,
    total_steps: int,
    warmup_steps: int,
    base_value: float,
    final_value: float,
    warmup_start_value: float = 0.0,
) -> float:
    """Linear warm-up ``warmup_start_value -> base_value`` then half-cosine ``base_value -> final_value``.

    The DINO/DINOv2 learning-rate (and, with ``warmup_steps=0``, weight-decay) schedule [V]:
    LR warms up for 10 of 100 epochs, then decays to ``min_lr = 1e-6``; WD goes ``0.04 -> 0.4``.

    Args:
        step: global step, ``>= 0``; clamped to ``total_steps`` (returns ``final_value`` after the end).
        total_steps: total schedule length including warm-up, ``>= warmup_steps``.
        warmup_steps: linear warm-up length, ``>= 0``.
        base_value: value at the end of the warm-up (peak LR).
        final_value: value at ``total_steps``.
        warmup_start_value: value at step 0 when ``warmup_steps > 0``.
    """
    _check_non_negative(step=step, total_steps=total_steps, warmup_steps=warmup_steps)
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} must be <= total_steps={total_steps}")
    if step < warmup_steps:
        return linear_warmup_then_constant(step, warmup_steps, warmup_start_value, base_value)
    return cosine_schedule(step - warmup_steps, total_steps - warmup_steps, base_value, final_value)


def warmup_cosine_or_constant(step: int, lr: float, warmup_steps: int, total_steps: int | None,
                              min_lr_ratio: float) -> float:
    """The learning rate of a method whose horizon may be unknown: linear warm-up from 0, then cosine decay to
    ``lr * min_lr_ratio`` at ``total_steps`` (:func:`cosine_with_warmup`), or constant ``lr`` when ``total_steps``
    is None (:func:`linear_warmup_then_constant`)."""
    if total_steps is None:
        return linear_warmup_then_constant(step, warmup_steps, 0.0, lr)
    return cosine_with_warmup(step, total_steps, warmup_steps, lr, lr * min_lr_ratio)
