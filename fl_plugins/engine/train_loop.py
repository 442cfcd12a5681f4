"""Framework-free local training of any :class:`~fl_plugins.engine.method.Method`: exactly ``num_steps`` optimiser
steps from a server-owned global step.

One step (DINO ``train_one_epoch`` order [V], generalised through the method's hooks): set LR / weight decay for
``global_step`` -> ``method.training_step(batch, step, rng)`` -> ``backward`` -> clip the global gradient norm
(``method.clip_grad``; ``torch.nn.utils.clip_grad_norm_`` as DINOv2 [V]; DINO v1 clips each tensor to 3.0 [V],
a documented difference) -> ``method.after_backward(step)`` (DINO: last-layer freeze) -> ``optimizer.step()`` ->
``method.after_step(step)`` (DINO: teacher EMA).

The protocol (:mod:`fl_plugins.engine.method`) is duck-typed: any object with the methods used here works.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["adamw_param_groups", "build_optimizer", "run_local_steps", "batch_to"]


def adamw_param_groups(module: nn.Module) -> list[dict[str, Any]]:
    """Trainable parameters split as DINO ``get_params_groups`` [V]: no weight decay on biases and 1-D tensors.

    Each group carries ``apply_weight_decay`` so :func:`run_local_steps` knows where to write a scheduled WD.
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


def build_optimizer(
    method: Any,
    kind: str = "adamw",
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float | None = None,
) -> torch.optim.Optimizer:
    """AdamW (or Adam) over ``method.parameter_groups()``; LR (and a scheduled WD) are set per step.

    Args:
        method: a Method.
        kind: ``"adamw"`` or ``"adam"``.
        betas: Adam betas ([V] DINO defaults).
        weight_decay: initial weight decay of the decayed group (default ``method.weight_decay_at(0)`` or 0).

    Raises:
        ValueError: unknown ``kind`` or no trainable parameter.
    """
    groups = [g for g in method.parameter_groups() if g["params"]]
    if not groups:
        raise ValueError(f"{type(method).__name__} has no trainable parameters")
    if kind not in ("adamw", "adam"):
        raise ValueError(f"optimizer must be 'adamw' or 'adam', got {kind!r}")
    wd = weight_decay if weight_decay is not None else (method.weight_decay_at(0) or 0.0)
    cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    return cls(groups, lr=method.lr_at(0), weight_decay=wd, betas=betas)


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


def batch_to(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor (in lists, tuples and dicts) moved to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: batch_to(v, device) for k, v in batch.items()}
    if isinstance(batch, Sequence) and not isinstance(batch, str):
        return type(batch)(batch_to(v, device) for v in batch) if isinstance(batch, tuple) else [
            batch_to(v, device) for v in batch]
    return batch


def run_local_steps(
    method: Any,
    loader_iter: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    num_steps: int,
    global_step: int,
    rng: torch.Generator | None = None,
) -> dict[str, float]:
    """Run exactly ``num_steps`` steps numbered ``global_step .. global_step + num_steps - 1``.

    Args:
        method: a Method; put in train mode here.
        loader_iter: yields the method's batches. A re-iterable (DataLoader) is cycled over epochs; a one-shot
            iterator that runs out before ``num_steps`` raises ``ValueError``.
        optimizer: typically :func:`build_optimizer`; groups with ``apply_weight_decay=False`` keep WD 0.
        num_steps: ``>= 0`` local steps this round.
        global_step: server-owned step index of the first local step (``>= 0``).
        rng: generator for the method's random choices (augmentation, masks); default one seeded with
            ``global_step``.

    Returns:
        Means over the steps of every stat of ``training_step`` (``loss`` among them); the last step's schedule
        values (``lr``, ``weight_decay`` when scheduled) and hook outputs (e.g. DINO ``teacher_momentum``);
        ``num_steps`` and ``global_step`` (the step index to start the next round from).

    Raises:
        FloatingPointError: on a non-finite loss (names the global step).
    """
    if num_steps < 0 or global_step < 0:
        raise ValueError(f"num_steps and global_step must be >= 0, got {num_steps} and {global_step}")
    rng = rng if rng is not None else torch.Generator().manual_seed(global_step)
    method.train()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    device = params[0].device if params else torch.device("cpu")
    sums: dict[str, float] = {}
    last: dict[str, float] = {}
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
        lr, wd = method.lr_at(step), method.weight_decay_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
            if wd is not None and group.get("apply_weight_decay", True):
                group["weight_decay"] = wd
        loss, stats = method.training_step(batch_to(batch, device), step, rng)
        value = stats.get("loss", float(loss.detach()))
        if not math.isfinite(value):
            raise FloatingPointError(f"non-finite training loss {value} at global step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = method.clip_grad
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        hooks = dict(method.after_backward(step))
        optimizer.step()
        hooks.update(method.after_step(step))
        stats = dict(stats, loss=value)
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        last = {"lr": lr, **({"weight_decay": wd} if wd is not None else {}), **hooks}
    out = {k: v / num_steps for k, v in sums.items()} if num_steps else {}
    out.update(last)
    out.update({"num_steps": num_steps, "global_step": global_step + num_steps})
    return out
