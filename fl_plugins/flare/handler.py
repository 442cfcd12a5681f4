"""The contract between thin FLARE adapters and pure, testable task handlers, and the handlers' shared base.

A task handler knows nothing about FLARE's engine, contexts or Shareables: it takes an ``FLModel`` and returns
an ``FLModel``. Tests drive handlers directly with ``FLModel`` objects; the executor
(:mod:`fl_plugins.flare.executor`) and the Client API script (``custom/fl_client.py``) only route tasks to them.

:class:`MethodHandler` is the one base every handler shares: it declares the tasks once (:attr:`TASKS`, read by the
executor and the job builder), loads the received global state into the method, runs the local steps, and answers
with exactly the method's federated state (float32) and the aggregation weight in ``meta``. Subclasses build the
pipeline ``datalist -> dataset -> views -> method -> optimiser -> monitors`` and name their monitor metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fl_plugins.wire import META_NUM_STEPS, TASK_SUBMIT_MODEL, TASK_TRAIN, TASK_VALIDATE

__all__ = ["TaskHandler", "SiteContext", "MethodHandler", "to_numpy", "to_torch"]


@dataclass
class SiteContext:
    """What a handler may know about where it runs (filled in by the executor or the client script)."""

    site_name: str
    datalist_path: str
    workspace_dir: str  # a folder the site may write into (checkpoints, caches)
    log_scalar: Callable[[str, float, int], None] = field(default=lambda tag, value, step: None)
    #: ``(tag, image, step)``: one image ``[C, H, W]`` (C = 1 or 3) float32 in [0, 1] for TensorBoard (the
    #: executor and the Client API script stream it to the server's ``tb_events/<site>/``, as the scalars)
    log_image: Callable[[str, np.ndarray, int], None] = field(default=lambda tag, image, step: None)


class TaskHandler(Protocol):
    """Pure task logic of one method on one site; state that persists between rounds lives on the handler."""

    TASKS: ClassVar[tuple[str, ...]]

    def tasks(self) -> dict[str, Callable[[FLModel], FLModel]]:
        """Task name -> handler function (FLModel in, FLModel out)."""
        ...


def to_numpy(sd: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Tensors -> float32 numpy arrays (what crosses the wire)."""
    return {k: v.detach().cpu().numpy().astype(np.float32, copy=False) for k, v in sd.items()}


def to_torch(params: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Received arrays -> tensors."""
    return {k: torch.as_tensor(np.asarray(v)) for k, v in params.items()}


class MethodHandler:
    """Shared task logic of every method on one site (FLModel in, FLModel out).

    Subclasses set ``self.method`` (a :class:`~fl_plugins.engine.method.Method`), ``self.site``,
    ``self.steps_per_round`` and ``self.num_train_items`` (the FedAvg weight) in ``__init__``, and implement
    :meth:`monitor` (metrics of the current model) and :meth:`local_train` (one round's local steps).
    """

    #: the tasks this handler answers; the executor routes them and the job builder sends exactly these
    TASKS: ClassVar[tuple[str, ...]] = (TASK_TRAIN, TASK_VALIDATE, TASK_SUBMIT_MODEL)
    #: ``meta`` key of the round's mean training loss
    LOSS_META_KEY: ClassVar[str] = "train_loss"

    method: Any
    site: SiteContext
    steps_per_round: int
    num_train_items: int

    def tasks(self) -> dict[str, Callable[[FLModel], FLModel]]:
        return {name: getattr(self, name) for name in self.TASKS}

    # -- to implement --------------------------------------------------------------------------------------------
    def monitor(self, rnd: int) -> dict[str, float]:
        """Metrics of the current (just received) model, logged and sent with the result."""
        return {}

    def local_train(self, global_step: int) -> dict[str, float]:  # pragma: no cover - abstract
        """Run ``steps_per_round`` local steps from ``global_step``; return stats (``loss`` among them)."""
        raise NotImplementedError

    def monitor_due(self, rnd: int) -> bool:
        """Whether :meth:`train` runs the monitor this round (default: every round)."""
        return True

    # -- shared --------------------------------------------------------------------------------------------------
    def load_global(self, model: FLModel) -> None:
        """Round start: load exactly the federated state (the method checks keys, shapes and values)."""
        self.method.load_federated_state_dict(to_torch(model.params))

    def federated_params(self) -> dict[str, np.ndarray]:
        return to_numpy(self.method.federated_state_dict())

    def log_stats(self, stats: dict[str, Any], rnd: int, prefix: str = "") -> None:
        for k, v in stats.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.site.log_scalar(prefix + k, float(v), rnd)

    def train(self, model: FLModel) -> FLModel:
        rnd = int(model.current_round or 0)
        t0 = time.perf_counter()
        self.load_global(model)
        metrics = self.monitor(rnd) if self.monitor_due(rnd) else {}
        self.log_stats(metrics, rnd)
        stats = self.local_train(rnd * self.steps_per_round)
        self.log_round(stats, rnd)
        self.site.log_scalar("round_seconds", time.perf_counter() - t0, rnd)
        return FLModel(
            params=self.federated_params(),
            params_type=ParamsType.FULL,
            metrics=metrics,
            meta={META_NUM_STEPS: self.num_train_items, self.LOSS_META_KEY: float(stats["loss"])},
        )

    def log_round(self, stats: dict[str, Any], rnd: int) -> None:
        """TensorBoard scalars of one round's training stats."""
        self.site.log_scalar(self.LOSS_META_KEY, float(stats["loss"]), rnd)

    def validate(self, model: FLModel) -> FLModel:
        self.load_global(model)
        metrics = self.monitor(int(model.current_round or 0))
        self.log_stats(metrics, int(model.current_round or 0))
        return FLModel(params={}, metrics=metrics)

    def submit_model(self, model: FLModel) -> FLModel:
        return FLModel(params=self.federated_params(), params_type=ParamsType.FULL)
