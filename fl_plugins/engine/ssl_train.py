"""Framework-free local SSL training: run exactly ``num_steps`` optimiser steps from a server-owned global step.

One step (DINO ``train_one_epoch`` order [V]): set LR / weight decay for ``global_step`` -> ``training_step``
(teacher temperature from the global step, centres updated) -> ``backward`` -> clip the student gradient
norm -> drop the last-layer gradients during the freeze -> ``optimizer.step()`` -> teacher EMA with the
momentum of the global step.

Gradient clipping: one global norm over the student's parameters (``torch.nn.utils.clip_grad_norm_``, as
DINOv2 [V]); DINO v1 clips each parameter tensor to norm 3.0 separately [V] (documented difference).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

__all__ = ["SSLStepMethod", "adamw_param_groups", "build_optimizer", "run_local_steps"]


class SSLStepMethod(Protocol):
    """What :func:`run_local_steps` needs from a method (``DINOMethod`` implements it)."""

    config: Any  # has lr_at / weight_decay_at / teacher_momentum_at (global step) and clip_grad
    student: nn.Module

    def training_step(
        self, views: Sequence[Tensor], global_step: int, **kw: Any
    ) -> tuple[Tensor, dict[str, float]]: ...

    def cancel_last_layer_gradients(self, global_step: int) -> bool: ...

    def update_teacher(self, global_step: int) -> float: ...

    def train(self, mode: bool = True) -> Any: ...


def adamw_param_groups(module: nn.Module) -> list[dict[str, Any]]:
    """Trainable parameters split as DINO ``get_params_groups`` [V]: no weight decay on biases and 1-D tensors.

    Each group carries ``apply_weight_decay`` so :func:`run_local_steps` knows where to write the scheduled WD.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "apply_weight_decay": True},
        {"params": no_decay, "weight_decay": 0.0, "apply_weight_decay": False},
    ]


def build_optimizer(method: SSLStepMethod, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW over the student's trainable parameters (betas [V]); LR/WD are set per step by the schedules."""
    cfg = method.config
    return torch.optim.AdamW(
        adamw_param_groups(method.student), lr=cfg.lr_at(0), weight_decay=cfg.weight_decay_at(0), betas=betas
    )


def _batches(loader_iter: Iterable[Any]) -> Iterator[Any]:
    """Yield batches; a re-iterable (e.g. a DataLoader) is restarted when exhausted, an iterator is not."""
    if iter(loader_iter) is loader_iter:  # a one-shot iterator
        yield from loader_iter  # type: ignore[misc]
        return
    while True:
        n = 0
        for batch in loader_iter:
            n += 1
            yield batch
        if n == 0:
            return


def _unpack(batch: Any, device: torch.device) -> tuple[list[Tensor], dict[str, Any]]:
    if isinstance(batch, Mapping):
        views, extra = batch["views"], {k: batch[k] for k in ("masks",) if batch.get(k) is not None}
    else:
        views, extra = batch, {}
    views = [v.to(device, non_blocking=True) for v in views]
    return views, {k: v.to(device) for k, v in extra.items()}


def run_local_steps(
    method: SSLStepMethod,
    loader_iter: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    num_steps: int,
    global_step: int,
) -> dict[str, float]:
    """Run exactly ``num_steps`` steps numbered ``global_step .. global_step + num_steps - 1``.

    Args:
        method: e.g. ``DINOMethod``; put in train mode here.
        loader_iter: yields batches ``[g1, g2, l1..lL]`` (list of ``[B, C, H, W]``) or ``{"views": [...],
            "masks": [2B, h, w]}``. A re-iterable (DataLoader) is cycled over epochs; a one-shot iterator that
            runs out before ``num_steps`` raises ``ValueError``.
        optimizer: typically :func:`build_optimizer`; groups with ``apply_weight_decay=False`` keep WD 0.
        num_steps: ``>= 0`` local steps this round.
        global_step: server-owned step index of the first local step (``>= 0``).

    Returns:
        Means over the steps of ``loss`` and every stat of ``training_step``, plus the schedule values of the
        last step (``lr``, ``weight_decay``, ``teacher_momentum``), ``num_steps``, ``frozen_last_layer_steps``
        and ``global_step`` (the step index to start the next round from).

    Raises:
        FloatingPointError: on a non-finite loss (names the global step).
    """
    if num_steps < 0 or global_step < 0:
        raise ValueError(f"num_steps and global_step must be >= 0, got {num_steps} and {global_step}")
    cfg = method.config
    method.train()
    device = next(method.student.parameters()).device
    params = [p for p in method.student.parameters() if p.requires_grad]
    sums: dict[str, float] = {}
    last: dict[str, float] = {}
    frozen = 0
    batches = _batches(loader_iter)
    for i in range(num_steps):
        step = global_step + i
        try:
            batch = next(batches)
        except StopIteration:
            raise ValueError(
                f"loader_iter ran out after {i} of num_steps={num_steps} steps; pass a DataLoader (it is re-iterated) "
                "or an endless iterator"
            ) from None
        views, extra = _unpack(batch, device)
        lr, wd = cfg.lr_at(step), cfg.weight_decay_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
            if group.get("apply_weight_decay", True):
                group["weight_decay"] = wd
        loss, stats = method.training_step(views, step, **extra)
        if not math.isfinite(stats.get("loss", float(loss.detach()))):
            raise FloatingPointError(f"non-finite SSL loss {stats.get('loss')} at global step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        frozen += int(method.cancel_last_layer_gradients(step))
        optimizer.step()
        momentum = method.update_teacher(step)
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        last = {"lr": lr, "weight_decay": wd, "teacher_momentum": momentum}
    out = {k: v / num_steps for k, v in sums.items()} if num_steps else {}
    out.update(last)
    out.update({"num_steps": num_steps, "frozen_last_layer_steps": frozen, "global_step": global_step + num_steps})
    return out
