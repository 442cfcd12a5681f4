"""The ``Method`` protocol every federated method implements, and a base class with its defaults.

It lives in the engine layer because the engine's loop runs it; methods (``fl_plugins.methods``) implement it.

A method is one ``nn.Module`` that owns every tensor of its objective (networks, EMA copies, centres, heads) and
declares, for each ``state_dict`` key, what federation does with it (the *state taxonomy*, style habit H6):

========== ============================================================ ==========================================
class      meaning                                                      who handles it
========== ============================================================ ==========================================
federated  sent to the server and aggregated each round                 ``federated_state_dict`` / ``load_...``
site       kept on the site between rounds, never sent                  ``site_state_dict`` / ``load_site_...``
rebuilt    recomputed at round start from the federated state           ``load_federated_state_dict``
========== ============================================================ ==========================================

Every ``state_dict`` key is in exactly one class (``check_taxonomy``). Optimiser state, schedules (pure functions
of the server-owned global step) and data streams are outside ``state_dict`` and never on the wire.

One local step, as :func:`fl_plugins.engine.train_loop.run_local_steps` runs it::

    lr/wd <- method.lr_at(step) / method.weight_decay_at(step)
    loss, stats = method.training_step(batch, step, rng)
    loss.backward(); clip(method.clip_grad); method.after_backward(step)   # e.g. DINO's last-layer freeze
    optimizer.step(); method.after_step(step)                             # e.g. the EMA teacher update
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from fl_plugins.engine.train_loop import adamw_param_groups

__all__ = ["Method", "MethodBase", "TAXONOMY_CLASSES", "check_taxonomy", "load_state_subset", "state_subset",
           "taxonomy_from_regex"]

#: The three state classes, in order.
TAXONOMY_CLASSES = ("federated", "site", "rebuilt")


@runtime_checkable
class Method(Protocol):
    """What the engine, the task handlers and the FLARE adapters need from a method."""

    config: Any

    def state_module(self) -> nn.Module:
        """The module whose ``state_dict`` keys are the wire keys (the taxonomy partitions them)."""
        ...

    def state_taxonomy(self) -> dict[str, list[str]]:
        """``{"federated", "site", "rebuilt"}`` -> sorted ``state_dict`` keys (a partition of them)."""
        ...

    def federated_state_dict(self) -> dict[str, Tensor]: ...

    def load_federated_state_dict(self, sd: Mapping[str, Any]) -> None: ...

    def site_state_dict(self) -> dict[str, Tensor]: ...

    def load_site_state_dict(self, sd: Mapping[str, Any]) -> None: ...

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimiser parameter groups over the trainable parameters."""
        ...

    def training_step(self, batch: Any, global_step: int, rng: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """Loss of one batch (graph attached) and float statistics (``"loss"`` among them)."""
        ...

    def after_backward(self, global_step: int) -> dict[str, float]: ...

    def after_step(self, global_step: int) -> dict[str, float]: ...

    def lr_at(self, global_step: int) -> float: ...

    def weight_decay_at(self, global_step: int) -> float | None: ...

    @property
    def clip_grad(self) -> float | None: ...

    def backbone(self) -> nn.Module:
        """The network to monitor (k-NN) and to export for fine-tuning."""
        ...

    def train(self, mode: bool = True) -> Any: ...


def check_taxonomy(taxonomy: Mapping[str, Sequence[str]], keys: Sequence[str]) -> None:
    """Raise ``ValueError`` unless ``taxonomy`` partitions ``keys`` into exactly the classes ``TAXONOMY_CLASSES``."""
    if set(taxonomy) != set(TAXONOMY_CLASSES):
        raise ValueError(f"state taxonomy classes must be {list(TAXONOMY_CLASSES)}, got {sorted(taxonomy)}")
    seen: dict[str, str] = {}
    for cls in TAXONOMY_CLASSES:
        for k in taxonomy[cls]:
            if k in seen:
                raise ValueError(f"state key {k!r} is in two taxonomy classes: {seen[k]!r} and {cls!r}")
            seen[k] = cls
    missing = sorted(set(keys) - set(seen))
    unknown = sorted(set(seen) - set(keys))
    if missing or unknown:
        raise ValueError(f"state taxonomy does not cover the state_dict: unclassified {missing[:5]}, "
                         f"not in state_dict {unknown[:5]}")


def taxonomy_from_regex(keys: Sequence[str], site_regex: str | None) -> dict[str, list[str]]:
    """Taxonomy with ``site`` = keys matching ``site_regex``, ``federated`` = the rest, nothing rebuilt."""
    rx = re.compile(site_regex) if site_regex else None
    site = sorted(k for k in keys if rx and rx.search(k))
    return {"federated": sorted(set(keys) - set(site)), "site": site, "rebuilt": []}


def _coerce(value: Any, like: Tensor) -> Tensor:
    """A received value (tensor or array) as a tensor of ``like``'s dtype."""
    return torch.as_tensor(value if isinstance(value, Tensor) else np.asarray(value), dtype=like.dtype)


def state_subset(module: nn.Module, keys: Sequence[str]) -> dict[str, Tensor]:
    """CPU copies of ``module``'s ``state_dict`` tensors ``keys`` (in that order)."""
    sd = module.state_dict()
    return {k: sd[k].detach().to("cpu", copy=True) for k in keys}


def load_state_subset(module: nn.Module, sd: Mapping[str, Any], keys: Sequence[str], what: str,
                      finite: bool = True) -> None:
    """Copy ``sd`` (tensors or arrays) into ``module``'s tensors ``keys`` in place, strictly: the exact key set and
    shapes (one ``ValueError`` naming ``what``, the missing and unexpected keys and the shape mismatches), and, with
    ``finite``, no NaN/Inf in a floating tensor."""
    own = module.state_dict()
    missing = sorted(set(keys) - set(sd))
    unexpected = sorted(set(sd) - set(keys))
    incoming = {k: _coerce(sd[k], own[k]) for k in keys if k in sd}
    bad_shape = [f"{k}: got {tuple(v.shape)}, expected {tuple(own[k].shape)}" for k, v in incoming.items()
                 if tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or bad_shape:
        raise ValueError(f"{what} does not match: missing {missing[:5]} ({len(missing)}), unexpected "
                         f"{unexpected[:5]} ({len(unexpected)}), shape mismatches {bad_shape[:3]}")
    if finite:
        bad = [k for k, v in incoming.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise ValueError(f"{what} has non-finite values in {bad[:5]}")
    with torch.no_grad():
        for k, v in incoming.items():
            own[k].copy_(v)


class MethodBase(nn.Module):
    """Defaults for a :class:`Method`: a flat taxonomy (everything federated unless :attr:`site_regex` matches),
    strict loading (exact key set, shapes, finite values), AdamW-style groups (no decay on biases and 1-D
    tensors), no hooks, constant LR ``config.lr`` and no gradient clipping. Subclasses implement
    :meth:`training_step` and :meth:`backbone`, and override what differs."""

    #: regex of ``state_dict`` keys kept on the site (never sent); None = every key is federated
    site_regex: str | None = None

    def state_module(self) -> nn.Module:
        """The module whose ``state_dict`` keys are the wire keys (default: the method itself; a method that wraps
        one network, like fine-tuning, returns that network so the keys carry no wrapper prefix)."""
        return self

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config

    # -- state taxonomy ------------------------------------------------------------------------------------------
    def state_taxonomy(self) -> dict[str, list[str]]:
        return taxonomy_from_regex(list(self.state_module().state_dict()), self.site_regex)

    def _subset(self, keys: Sequence[str]) -> dict[str, Tensor]:
        return state_subset(self.state_module(), keys)

    def _load_subset(self, sd: Mapping[str, Any], keys: Sequence[str], what: str) -> None:
        load_state_subset(self.state_module(), sd, keys, f"{type(self).__name__}: {what}", finite=True)

    def federated_state_dict(self) -> dict[str, Tensor]:
        return self._subset(self.state_taxonomy()["federated"])

    def load_federated_state_dict(self, sd: Mapping[str, Any]) -> None:
        self._load_subset(sd, self.state_taxonomy()["federated"], "received federated state")

    def site_state_dict(self) -> dict[str, Tensor]:
        return self._subset(self.state_taxonomy()["site"])

    def load_site_state_dict(self, sd: Mapping[str, Any]) -> None:
        self._load_subset(sd, self.state_taxonomy()["site"], "site state")

    # -- optimisation --------------------------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        return adamw_param_groups(self)

    def training_step(self, batch: Any, global_step: int, rng: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError(f"{type(self).__name__} must implement training_step")

    def after_backward(self, global_step: int) -> dict[str, float]:
        return {}

    def after_step(self, global_step: int) -> dict[str, float]:
        return {}

    def lr_at(self, global_step: int) -> float:
        return float(self.config.lr)

    def weight_decay_at(self, global_step: int) -> float | None:
        return None  # leave the optimiser's weight decay as it is

    @property
    def clip_grad(self) -> float | None:
        return None

    def backbone(self) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} must implement backbone()")
