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

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fl_plugins.wire import META_NUM_STEPS, META_RUN_ID, TASK_SUBMIT_MODEL, TASK_TRAIN, TASK_VALIDATE

log = logging.getLogger(__name__)

#: the folder under a site's workspace root where sites keep their per-run state (``SiteContext.state_dir``)
SITE_STATE_DIR = "fl_plugins_state"

__all__ = ["SITE_STATE_DIR", "run_state_dir", "TaskHandler", "SiteContext", "MethodHandler", "to_numpy", "to_torch"]


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
    #: a folder that outlives the job (the site's workspace root ``/fl_plugins_state``): what the site keeps between
    #: rounds is saved there per run (``<state_dir>/<run id>/<site>.pt``) so a resumed job continues it; None = off
    state_dir: str | None = None


def run_state_dir(site: SiteContext, run_id: Any) -> str | None:
    """``<site.state_dir>/<run id>`` (the id made safe for a folder name), or None when either is missing."""
    if not site.state_dir or not run_id:
        return None
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(run_id))
    return os.path.join(site.state_dir, safe)


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

    # -- what the site keeps between rounds, across a resumed job ---------------------------------------------------
    def site_state(self) -> dict[str, Any]:
        """What this site keeps between rounds besides the global model: the optimiser (AdamW moments) and the
        method's site-persistent tensors (its state taxonomy's ``site`` part). Handlers with more override it."""
        opt = getattr(self, "optimizer", None)
        return {"optimizer": opt.state_dict() if opt is not None else None,
                "method_site": self.method.site_state_dict()}

    def load_site_state(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`site_state` returned (strict: a state of another set-up raises)."""
        opt = getattr(self, "optimizer", None)
        if opt is not None and state.get("optimizer") is not None:
            opt.load_state_dict(state["optimizer"])
        self.method.load_site_state_dict(state.get("method_site") or {})

    def _site_state_path(self, run_id: Any) -> str | None:
        folder = run_state_dir(self.site, run_id)
        return None if folder is None else os.path.join(folder, f"{self.site.site_name}.pt")

    def restore_site_state(self, run_id: Any, rnd: int) -> bool:
        """In a fresh process (the first round it sees is not round 0: a resumed job), load the state this site saved
        after round ``rnd - 1`` of the same run, if there is one; returns whether it did (logged either way)."""
        path = self._site_state_path(run_id)
        if path is None or not os.path.isfile(path):
            if rnd > 0:
                log.warning("site %s: round %d is its first in this process and no saved site state of run %s was "
                            "found%s: optimiser state starts fresh", self.site.site_name, rnd, run_id,
                            f" at {path}" if path else "")
            return False
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if int(saved.get("round", -1)) != rnd - 1:
            log.warning("site %s: the saved site state %s is of round %s, not %d: not loaded, optimiser state starts "
                        "fresh", self.site.site_name, path, saved.get("round"), rnd - 1)
            return False
        self.load_site_state(saved["state"])
        log.info("site %s: continued run %s at round %d with its saved site state %s", self.site.site_name, run_id,
                 rnd, path)
        return True

    def save_site_state(self, run_id: Any, rnd: int) -> None:
        """After round ``rnd``: a copy of the site's state is written atomically (a crash mid-write keeps the previous
        round's) by a background thread, so the round's answer does not wait for the disk (an fsync-ed U-Net
        optimiser state took 0.04 s); the next save waits for the previous one (:meth:`wait_site_state`)."""
        path = self._site_state_path(run_id)
        if path is None:
            return
        import copy

        from fl_plugins.engine.checkpoint import BackgroundSaver

        if getattr(self, "_state_writer", None) is None:  # one write at a time: the next save waits for this one
            self._state_writer = BackgroundSaver(f"site {self.site.site_name}: site state", on_error="log",
                                                 max_pending=1)
        self._state_writer.save({"round": int(rnd), "run_id": str(run_id), "state": copy.deepcopy(self.site_state())},
                                path)

    def wait_site_state(self) -> None:
        """Block until the last :meth:`save_site_state` is on disk; a failed write is logged, not raised (the state
        only serves a resume)."""
        if getattr(self, "_state_writer", None) is not None:
            self._state_writer.flush()

    def train(self, model: FLModel) -> FLModel:
        rnd = int(model.current_round or 0)
        run_id = (model.meta or {}).get(META_RUN_ID)
        t0 = time.perf_counter()
        self.load_global(model)
        if not getattr(self, "_trained_rounds", 0) and rnd > 0:
            self.restore_site_state(run_id, rnd)
        metrics = self.monitor(rnd) if self.monitor_due(rnd) else {}
        self.log_stats(metrics, rnd)
        stats = self.local_train(rnd * self.steps_per_round)
        self._trained_rounds = getattr(self, "_trained_rounds", 0) + 1
        self.save_site_state(run_id, rnd)
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
