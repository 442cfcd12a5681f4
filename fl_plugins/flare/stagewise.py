"""Stage-wise federated fine-tuning (MedUniverse, methods-spec section 6): the server workflow and its base persistor.

One universal backbone ``B_s`` is improved stage by stage by sites that hold *different* classification tasks (2, 3,
5, ... classes; 2D images or 3D volumes). Heads are task-specific: they never cross the wire and are never averaged
(:mod:`fl_plugins.flare.stage_handler` keeps them on the sites).

Protocol (:class:`StagewiseController`)::

    B_0 <- the persistor's base (model.pretrained: an exported MAE backbone, flssl export-backbone; else random)
    report:  every connected site  -> report_task  -> meta {num_classes, spatial_dims, n_samples, n_val, task_name}
             (a site that fails or reports an invalid task is logged and takes part in no stage)
    for s in 0..num_stages-1:
        ask sites (schedule, below) -> stage_finetune: params B_s (backbone.* only), current_round = s,
                                       meta {stage, num_stages, head_shape [n_c, embed_dim], evaluate}
        each result is checked on arrival (StageAggregator.accept: stage closed / late, duplicate site, UpdateCheck's
        key set -- a head key is an unexpected key --, params type, shapes, dtype, NaN/Inf, weight), then the
        update-norm check over the accepted ones (StageAggregator.check_outliers)
        close the stage (rule below); cancel the tasks still standing
        B_{s+1} <- (1 - damping) B_s + damping * sum_c alpha_c theta_c   (alpha uniform or by samples)
        save stage_<s+1>_base.pt, FL_global_model.pt and the tables; validate B_{s+1} on every reporting site

**Schedule.** ``parallel``: at the start of the stage every eligible site (reported a valid task, connected) gets
the task at once. ``sequential``: one site at a time, in the order of the site names rotated by ``s * k_per_stage``
(so consecutive stages start with different sites); the next site is asked when the previous one answered, failed,
timed out or was lost. In both schedules every site is asked at most once per stage and every site of a stage
starts from the same ``B_s`` (it is not a relay).

**Stage-close rule** (checked every ``task_check_period`` seconds):

1. When ``k_per_stage`` results are accepted, the update-norm check runs over the accepted ones; outliers are
   rejected. If ``k_per_stage`` accepted results remain, the stage closes ("k_reached") with them.
2. Otherwise the stage waits while a result can still come: a site asked in this stage has not answered and its
   task is still standing (no time-out, ``stage_timeout``; not lost: the task of a site FLARE deems disconnected is
   cancelled), or, in
   ``sequential``, a site of the stage's order has not been asked yet (it is asked now).
3. When nothing can come any more, the norm check runs over the accepted results and the stage closes
   ("no_more_results") with the accepted results it has, fewer than ``k_per_stage``. With none, the base is kept
   unchanged (``B_{s+1} = B_s``, an error in the log; "empty" in the table).

Closing cancels the stage's standing tasks (``parallel`` with more sites than ``k_per_stage``: the slower sites'
work is discarded; FLARE drops their results, and any that reaches the aggregator is rejected as ``stage_closed``).
Every rejected result is logged (warning: site, stage, code, message) and listed in the stage's table entry; it is
never part of the average.

**Outputs** (server app folder, ``<server job workspace>/app_server/``, every file written atomically):

* ``stage_<b>_base.pt`` for every base ``b = 0..num_stages`` (0 = the initial base): ``{"state_dict": the timm
  backbone's tensors (no prefix), "stage": b, "prefix": "backbone.", "embed_dim", "made_by"}``; loadable as
  ``model.pretrained`` of ``finetune_cls`` or of another stage-wise job;
* ``stage_bases.json``: the settings, every site's task, every base file, and per stage: sites asked, contributors,
  their weights ``alpha`` and sample counts, rejections (site, code, message), cancelled and lost sites, close
  reason;
* ``stage_metrics.json`` + a table in the server log: every task at every base (validation metrics of the base with
  the site's own head: ``val_accuracy``, ``val_balanced_accuracy``, ``val_auc``). Base 0 comes from the stage-0
  results (the head is then fresh, or restored by a restarted site: chance level is expected), base ``b >= 1`` from
  the ``validate`` phase after stage ``b - 1`` (every reporting site, also those not in the stage); with
  ``validate_every_stage=False`` from stage ``b``'s results and, for the last base, a final ``validate``;
* server TensorBoard (the job's ``TBAnalyticsReceiver``, ``tb_events/<server>/``): ``<task>/<site>/<metric>`` at
  step = the base index, and ``stage/accepted``, ``stage/rejected`` per stage; each site also writes
  ``<task>/val_*`` to its own ``tb_events/<site>/``.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from typing import Any

import numpy as np
from nvflare.apis.controller_spec import Task
from nvflare.apis.fl_constant import FLContextKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.workflows.model_controller import ModelController

from fl_plugins.flare import nvflare_internals
from fl_plugins.flare.controllers import DEFAULT_ROUND_TIMEOUT, SiteLiveness, UpdateValidation, plain_metrics
from fl_plugins.flare.persistor import ConfigModelPersistor
from fl_plugins.flare.resume import RoundCheckpoint
from fl_plugins.flare.stage_aggregator import WEIGHTINGS, StageAggregator, check_damping
from fl_plugins.flare.update_check import DEFAULT_NORM_BOUND, Rejection, check_norm_bound, site_of
from fl_plugins.wire import (
    META_EVALUATE,
    META_HEAD_SHAPE,
    META_N_SAMPLES,
    META_N_VAL,
    META_NUM_CLASSES,
    META_NUM_STAGES,
    META_RUN_ID,
    META_SPATIAL_DIMS,
    META_STAGE,
    META_TASK_NAME,
    TASK_REPORT_TASK,
    TASK_STAGE_FINETUNE,
    TASK_VALIDATE,
)

__all__ = ["SCHEDULES", "StageBasePersistor", "StagewiseController", "embed_dim_of", "report_problem", "stage_task"]

#: how a stage's sites are asked
SCHEDULES = ("parallel", "sequential")
BACKBONE_PREFIX = "backbone."


def _int_at_least(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def report_problem(meta: dict[str, Any] | None) -> str | None:
    """Why a site's ``report_task`` answer is not a usable task (None: it is)."""
    meta = meta or {}
    nc = meta.get(META_NUM_CLASSES)
    if isinstance(nc, bool) or not isinstance(nc, int) or nc < 2:
        return f"{META_NUM_CLASSES}={nc!r} (a head needs an int >= 2)"
    dims = meta.get(META_SPATIAL_DIMS)
    if dims not in (2, 3) or isinstance(dims, bool):
        return f"{META_SPATIAL_DIMS}={dims!r} (2 or 3)"
    n = meta.get(META_N_SAMPLES)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        return f"{META_N_SAMPLES}={n!r} (an int >= 1: labelled training items)"
    name = meta.get(META_TASK_NAME)
    if not isinstance(name, str) or not name:
        return f"{META_TASK_NAME}={name!r} (a non-empty string)"
    return None


def embed_dim_of(base: dict[str, Any]) -> int | None:
    """The ViT embedding width of a base (``backbone.cls_token`` or ``backbone.norm.weight``), or None."""
    for key in ("backbone.cls_token", "backbone.norm.weight", "backbone.pos_embed"):
        if key in base:
            return int(np.asarray(base[key]).shape[-1])
    return None


def stage_task(base: dict[str, Any], stage: int, num_stages: int, num_classes: int, embed_dim: int | None,
               evaluate: bool, run_id: Any = None) -> FLModel:
    """The ``stage_finetune`` task of one site: the base (backbone keys, FULL), ``current_round`` = the stage, and
    ``meta`` ``{stage, num_stages, evaluate, run_id[, head_shape = [num_classes, embed_dim]]}``."""
    meta: dict[str, Any] = {META_STAGE: stage, META_NUM_STAGES: num_stages, META_EVALUATE: evaluate,
                            META_RUN_ID: run_id}
    if embed_dim is not None:
        meta[META_HEAD_SHAPE] = [int(num_classes), int(embed_dim)]
    return FLModel(params=base, params_type=ParamsType.FULL, current_round=stage, total_rounds=num_stages, meta=meta)


def _finite_or_none(value: Any) -> Any:
    """JSON-safe metrics: NaN/Inf -> None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


class StageBasePersistor(ConfigModelPersistor):
    """The stage-wise server's base: only the backbone (``backbone.*``), built from the job's ``model`` section
    (:func:`~fl_plugins.engine.stagewise.build_base_backbone`; ``model.pretrained`` = an exported backbone, read on
    the server). Writes ``FL_global_model.pt`` (the last base) as nvflare's ``PTFileModelPersistor`` does.

    Args:
        model_config: the job's ``model`` section (``arch`` vit_classifier, ``backbone``, ``head``, ``pretrained``;
            ``num_classes`` is each site's own and not used here).
        seed: seed of a random base (no ``pretrained``).
    """

    def __init__(self, model_config: dict[str, Any], seed: int = 0,
                 global_model_file_name: str = "FL_global_model.pt") -> None:
        super().__init__(model_config=model_config, seed=seed, global_model_file_name=global_model_file_name)

    def _build(self) -> Any:
        from fl_plugins.engine.stagewise import build_base_backbone

        return build_base_backbone(self.model_config, self.seed)


class StagewiseController(SiteLiveness, UpdateValidation, RoundCheckpoint, ModelController):
    """Stage-wise federated fine-tuning of one base backbone (see the module docstring).

    Args:
        num_clients: the job's ``min_clients`` (SiteLiveness' messages; FLARE stops a job below it).
        num_stages: stages, >= 1.
        k_per_stage: accepted results that close a stage, >= 1.
        schedule: ``"parallel"`` or ``"sequential"``.
        weighting: ``"uniform"`` or ``"samples"`` (:class:`~fl_plugins.flare.stage_aggregator.StageAggregator`).
        damping: ``eta`` in (0, 1].
        norm_bound: update-norm bound (> 1) relative to the median of the other accepted results'; None = off.
        validate_every_stage: validate every new base on every reporting site (else only the last one).
        stage_timeout / report_timeout / validation_timeout: seconds a site's task may take (0 = ``round_timeout``).
        round_timeout: the default for every task without its own timeout; a site that misses it is skipped until it
            reconnects or sends a late result (:class:`~fl_plugins.flare.controllers.SiteLiveness`; 0 = no limit).
        resume_from: a ``round_checkpoint.pt`` of a crashed run of this job (written after every stage): start with
            the stage after its last completed one, its base, its tables (:mod:`fl_plugins.flare.resume`); the
            sites' heads continue from their per-run copies.
        key_metric: the metric of the log table.
        persistor_id / task_check_period: ``ModelController``'s.

    Raises:
        ValueError: a setting out of range (named with its value).
    """

    BASE_FILE = "stage_{}_base.pt"
    BASES_TABLE = "stage_bases.json"
    METRICS_TABLE = "stage_metrics.json"
    #: nvflare 2.9's job-config hook (``FedJobConfig._get_args``; :data:`~fl_plugins.flare.nvflare_internals.INTERNALS`)
    _always_serialize_args = ("num_stages", "k_per_stage", "schedule", "weighting", "damping", "norm_bound")

    def __init__(
        self,
        num_clients: int = 1,
        num_stages: int = 2,
        k_per_stage: int = 2,
        schedule: str = "parallel",
        weighting: str = "uniform",
        damping: float = 1.0,
        norm_bound: float | None = DEFAULT_NORM_BOUND,
        validate_every_stage: bool = True,
        stage_timeout: int = 0,
        report_timeout: int = 0,
        validation_timeout: int = 0,
        key_metric: str = "val_accuracy",
        persistor_id: str = "persistor",
        task_check_period: float = 0.5,
        round_timeout: int = DEFAULT_ROUND_TIMEOUT,
        resume_from: str | None = None,
    ) -> None:
        _int_at_least("num_clients", num_clients, 1)
        _int_at_least("num_stages", num_stages, 1)
        _int_at_least("k_per_stage", k_per_stage, 1)
        for name, value in (("stage_timeout", stage_timeout), ("report_timeout", report_timeout),
                            ("validation_timeout", validation_timeout)):
            _int_at_least(name, value, 0)
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {list(WEIGHTINGS)}, got {weighting!r}")
        if not isinstance(validate_every_stage, bool):
            raise ValueError(f"validate_every_stage must be a bool, got {validate_every_stage!r}")
        # a site error is the site's result, not the job's end: the stage-close rule handles it
        super().__init__(persistor_id=persistor_id, task_check_period=task_check_period, ignore_result_error=True)
        self.num_clients = num_clients
        self.num_stages = num_stages
        self.k_per_stage = k_per_stage
        self.schedule = schedule
        self.weighting = weighting
        self.damping = check_damping(damping)
        self.norm_bound = check_norm_bound(norm_bound)
        self.validate_every_stage = validate_every_stage
        self.stage_timeout = stage_timeout
        self.report_timeout = report_timeout
        self.validation_timeout = validation_timeout
        self.key_metric = key_metric
        self.stage_aggregator = StageAggregator(weighting=weighting, damping=self.damping, norm_bound=self.norm_bound)
        self.init_site_liveness(round_timeout=round_timeout)
        self.init_round_checkpoint(resume_from)
        self.current_round: int | None = None
        self.tasks: dict[str, dict[str, Any]] = {}  # site -> its reported task
        self.embed_dim: int | None = None
        self._stage_lock = threading.RLock()
        self._capture: list[Task] | None = None
        self._stage_tasks: dict[str, Task] = {}
        self._answered: set[int] = set()  # id() of stage tasks whose site answered (result or error)
        self._bases: list[dict[str, Any]] = []
        self._stages: list[dict[str, Any]] = []
        self._metrics: dict[str, dict[int, dict[str, Any]]] = {}  # site -> base index -> metrics
        self._app_dir: str | None = None

    # ------------------------------------------------------------------------------------------------ plumbing

    def set_communicator(self, communicator: Any) -> None:
        """The job's ``task_check_period`` reaches the server's task monitor (see FedAvgWithFinalValidation)."""
        super().set_communicator(communicator)
        nvflare_internals.set_task_check_period(communicator, nvflare_internals.task_check_period(self))

    def broadcast(self, task: Task, *args: Any, **kwargs: Any) -> None:
        """``Controller.broadcast``; the stage's per-site tasks are kept to know which results can still come."""
        if self._capture is not None:
            self._capture.append(task)
        super().broadcast(task, *args, **kwargs)

    def _process_result(self, client_task: Any, fl_ctx: Any) -> None:
        """nvflare's result handling (the callback runs inside), then: this task's site has answered (also with an
        error, which nvflare logs and ignores: ``ignore_result_error``). Overrides nvflare 2.9's private
        ``BaseModelController._process_result`` (listed in :data:`~fl_plugins.flare.nvflare_internals.INTERNALS`)."""
        try:
            super()._process_result(client_task, fl_ctx)
        finally:
            with self._stage_lock:
                self._answered.add(id(client_task.task))

    def _app_root(self) -> str:
        """The server app folder (read once: results arrive with other contexts)."""
        if self._app_dir is None:
            self._app_dir = str(self.fl_ctx.get_prop(FLContextKey.APP_ROOT) or ".")
        return self._app_dir

    # -- resume (fl_plugins.flare.resume) -----------------------------------------------------------------------
    def resume_state(self) -> dict[str, Any]:
        """The tables so far (bases written, stage records, every site's metrics at every base)."""
        return {"bases": self._bases, "stages": self._stages,
                "metrics": {site: {str(b): m for b, m in per.items()} for site, per in self._metrics.items()}}

    def restore_resume_state(self, extra: dict[str, Any]) -> None:
        self._bases = list(extra.get("bases") or [])
        self._stages = list(extra.get("stages") or [])
        self._metrics = {site: {int(b): m for b, m in per.items()} for site, per in (extra.get("metrics") or {}).items()}

    def _log_rejection(self, r: Rejection) -> None:
        self.log_warning(self.fl_ctx, f"stage {r.round}: rejected the result of {r.site} ({r.code}): {r.message}; "
                                      "left out of the stage aggregate", fire_event=False)

    # ------------------------------------------------------------------------------------------------ workflow

    def run(self) -> None:
        try:
            self._run_stages()
        finally:
            self.flush_files()

    def _run_stages(self) -> None:
        self._phase = "the set-up"
        self._app_root()
        model = self.load_model()
        if model is None:
            return
        base = {k: np.asarray(v) for k, v in (model.params or {}).items()}
        others = sorted(k for k in base if not k.startswith(BACKBONE_PREFIX))
        if not base or others:
            self.panic(f"the stage-wise base must hold backbone.* keys only, got {len(base)} keys"
                       f"{f', e.g. {others[:3]}' if others else ''}")
            return
        self.embed_dim = embed_dim_of(base)
        first = 0
        if self.resume_from:
            ckpt = self.read_resume_checkpoint(self.num_stages, FLModel(params=base))
            assert ckpt is not None
            base, first = {k: np.asarray(v) for k, v in ckpt["params"].items()}, int(ckpt["round"]) + 1
        else:
            self._save_base(0, base, "the initial base")
        self.tasks = self.collect_reports()
        if not self.tasks:
            self.panic("no site reported a valid task: nothing to fine-tune (see the sites' logs)")
            return
        for s in range(first, self.num_stages):
            if self.abort_signal.triggered:
                return
            agg = self.run_stage(s, base)
            if agg is None:
                return
            base = {k: np.asarray(v) for k, v in agg.params.items()}
            self._save_base(s + 1, base, f"stage {s}")
            self.save_model(FLModel(params=base, params_type=ParamsType.FULL, meta={META_STAGE: s + 1}))
            if self.validate_every_stage or s == self.num_stages - 1:
                self.validate_base(s + 1, base)
            self._write_tables()
            self.write_round_checkpoint(FLModel(params=base, params_type=ParamsType.FULL), s, self.num_stages)
        self._phase = "the end"
        self.info("stage-wise fine-tuning finished:\n" + self.metrics_table_text())

    def collect_reports(self) -> dict[str, dict[str, Any]]:
        """Ask every connected site for its task; returns site -> task of the valid reports (others logged)."""
        self._phase = "the task reports"
        alive, gone = self.connected_sites()
        if gone:
            self.log_warning(self.fl_ctx, f"task reports: skipping disconnected site(s) {gone}", fire_event=False)
        if not alive:
            return {}
        results = self.send_model_and_wait(task_name=TASK_REPORT_TASK,
                                           data=FLModel(params={}, meta={META_NUM_STAGES: self.num_stages}),
                                           targets=alive, timeout=self.report_timeout)
        tasks: dict[str, dict[str, Any]] = {}
        for r in results:
            site = site_of(r)
            problem = report_problem(r.meta)
            if problem:
                self.log_error(self.fl_ctx, f"site {site} reported an invalid task: {problem}; it takes part in no "
                                            "stage", fire_event=False)
                continue
            m = r.meta
            tasks[site] = {META_TASK_NAME: m[META_TASK_NAME], META_NUM_CLASSES: int(m[META_NUM_CLASSES]),
                           META_SPATIAL_DIMS: int(m[META_SPATIAL_DIMS]), META_N_SAMPLES: int(m[META_N_SAMPLES]),
                           META_N_VAL: m.get(META_N_VAL)}
        silent = sorted(set(alive) - {site_of(r) for r in results})
        if silent:
            self.log_error(self.fl_ctx, f"site(s) {silent} did not report their task (failed or timed out: see their "
                                        "logs); they take part in no stage", fire_event=False)
        listing = ", ".join(f"{s}: {t[META_TASK_NAME]} ({t[META_NUM_CLASSES]} classes, {t[META_SPATIAL_DIMS]}D, "
                            f"{t[META_N_SAMPLES]} samples)" for s, t in sorted(tasks.items()))
        self.info(f"site tasks: {listing}")
        if tasks and len(tasks) < self.k_per_stage:
            self.log_warning(self.fl_ctx, f"only {len(tasks)} site(s) reported a task but k_per_stage="
                                          f"{self.k_per_stage}: every stage will close with fewer results",
                             fire_event=False)
        return tasks

    # ------------------------------------------------------------------------------------------------ one stage

    def _stage_order(self, s: int) -> list[str]:
        alive, gone = self.connected_sites()
        eligible = [x for x in sorted(self.tasks) if x in alive]
        lost = sorted(set(self.tasks) & set(gone))
        if lost:
            self.log_warning(self.fl_ctx, f"stage {s}: skipping disconnected site(s) {lost}", fire_event=False)
        if self.schedule == "sequential" and eligible:
            r = (s * self.k_per_stage) % len(eligible)
            eligible = eligible[r:] + eligible[:r]
        return eligible

    def _ask(self, site: str, s: int, base: dict[str, np.ndarray]) -> None:
        data = stage_task(base, s, self.num_stages, int(self.tasks[site][META_NUM_CLASSES]), self.embed_dim,
                          evaluate=not (self.validate_every_stage and s > 0), run_id=self.run_id)
        self._capture = []
        try:
            self.send_model(task_name=TASK_STAGE_FINETUNE, data=data, targets=[site], timeout=self.stage_timeout,
                            callback=self._on_stage_result)
            with self._stage_lock:
                self._stage_tasks[site] = self._capture[-1]
        finally:
            self._capture = None

    def _on_stage_result(self, result: FLModel) -> bool:
        """A site's ``stage_finetune`` result: checked by the aggregator; False (not accepted) when rejected."""
        with self._stage_lock:
            agg = self.stage_aggregator
            rejection = agg.accept(result)
            if rejection is not None:
                self._log_rejection(rejection)
                return False
            site = site_of(result)
            if result.metrics and agg.stage is not None:
                self._record_metrics(site, agg.stage, result.metrics)
            self.info(f"stage {agg.stage}: accepted the result of {site} ({agg.n_accepted} of {self.k_per_stage})")
            return True

    def _outstanding(self) -> list[str]:
        return [site for site, task in self._stage_tasks.items()
                if id(task) not in self._answered and task.completion_status is None]

    def _drop_lost(self, s: int) -> list[str]:
        """Cancel the standing task of every asked site FLARE deems disconnected (its result can no longer come; a
        task never picked up would otherwise wait for it)."""
        with self._stage_lock:
            lost = [(site, self._stage_tasks[site]) for site in self._outstanding()
                    if self.get_client_disconnect_time(site)]
        for site, task in lost:
            self.cancel_task(task)
            self.log_warning(self.fl_ctx, f"stage {s}: site {site} is lost (FLARE deems it disconnected): its result "
                                          "can no longer come", fire_event=False)
        return [site for site, _ in lost]

    def run_stage(self, s: int, base: dict[str, np.ndarray]) -> FLModel | None:
        """Run stage ``s`` from ``base`` until the close rule holds; the aggregate (None when aborted)."""
        self._phase = f"stage {s}"
        self.current_round = s
        t0 = time.perf_counter()
        agg = self.stage_aggregator
        order = self._stage_order(s)
        with self._stage_lock:
            self._stage_tasks = {}
            self._answered = set()
            agg.open(s, base)
        self.info(f"stage {s} of {self.num_stages}: {self.schedule}, closes at {self.k_per_stage} accepted results; "
                  f"sites {order}")
        queue = list(order)
        if self.schedule == "parallel":
            for site in queue:
                self._ask(site, s, base)
            queue = []
        reason = None
        while reason is None:
            if self.abort_signal.triggered:
                self._cancel_stage(s)
                return None
            self._drop_lost(s)
            ask = None
            with self._stage_lock:
                if agg.n_accepted >= self.k_per_stage:
                    for r in agg.check_outliers():
                        self._log_rejection(r)
                    if agg.n_accepted >= self.k_per_stage:
                        reason = "k_reached"
                if reason is None and not self._outstanding():
                    if queue:
                        ask = queue.pop(0)
                    else:
                        for r in agg.check_outliers():
                            self._log_rejection(r)
                        reason = "no_more_results" if agg.n_accepted else "empty"
                if reason is not None:
                    agg.close()
            if ask is not None:
                self._ask(ask, s, base)
            elif reason is None:
                time.sleep(nvflare_internals.task_check_period(self))
        cancelled = self._cancel_stage(s)
        with self._stage_lock:
            lost = sorted(site for site, t in self._stage_tasks.items()
                          if id(t) not in self._answered and self.get_client_disconnect_time(site))
        result = agg.aggregate()
        meta = result.meta
        n_samples = {c.site: c.n_samples for c in agg.accepted}
        entry = {"stage": s, "close_reason": reason, "schedule": self.schedule, "asked": sorted(self._stage_tasks),
                 "contributors": meta["contributors"], "weights": meta["weights"], "n_samples": n_samples,
                 "rejected": [{"site": r.site, "code": r.code, "message": r.message} for r in agg.rejections],
                 "cancelled": cancelled, "lost": lost, "base_in": self.BASE_FILE.format(s), "base_out": self.BASE_FILE.format(s + 1),
                 "seconds": round(time.perf_counter() - t0, 3)}
        self._stages.append(entry)
        weights = ", ".join(f"{k}: {v:.4g}" for k, v in meta["weights"].items())
        rejected = f" {meta['rejected_reasons']}" if meta["nr_rejected"] else ""
        msg = (f"stage {s} closed ({reason}): {meta['nr_aggregated']} result(s) aggregated from {meta['contributors']}"
               f" with weights {{{weights}}}, {meta['nr_rejected']} rejected{rejected}"
               f"{f', cancelled {cancelled}' if cancelled else ''}")
        if reason == "empty":
            self.log_error(self.fl_ctx, f"{msg}; no result: the base stays unchanged", fire_event=False)
        else:
            self.info(msg)
        self.log_server_scalar("stage/accepted", meta["nr_aggregated"], s)
        self.log_server_scalar("stage/rejected", meta["nr_rejected"], s)
        return result

    def _cancel_stage(self, s: int) -> list[str]:
        """Cancel this stage's standing tasks; returns their sites."""
        with self._stage_lock:
            standing = [(site, t) for site, t in self._stage_tasks.items()
                        if t.completion_status is None and id(t) not in self._answered]
        for _, task in standing:
            self.cancel_task(task)
        sites = sorted(site for site, _ in standing)
        if sites:
            self.info(f"stage {s}: cancelled the task of {sites} (the stage is closed; their results are dropped)")
        return sites

    # ------------------------------------------------------------------------------------------------ metrics

    def validate_base(self, b: int, base: dict[str, np.ndarray]) -> None:
        """Scores of base ``b`` with every reporting site's own head."""
        self._phase = f"the validation of base {b}"
        alive, _ = self.connected_sites()
        targets = [x for x in sorted(self.tasks) if x in alive]
        if not targets:
            return
        data = FLModel(params=base, params_type=ParamsType.FULL, current_round=b, total_rounds=self.num_stages,
                       meta={META_STAGE: b, META_RUN_ID: self.run_id})
        results = self.send_model_and_wait(task_name=TASK_VALIDATE, data=data, targets=targets,
                                           timeout=self.validation_timeout)
        for r in results:
            self._record_metrics(site_of(r), b, r.metrics or {})
        missing = sorted(set(targets) - {site_of(r) for r in results})
        if missing:
            self.log_warning(self.fl_ctx, f"base {b}: no validation result from {missing}", fire_event=False)

    def _record_metrics(self, site: str, b: int, metrics: dict[str, Any]) -> None:
        m = plain_metrics(dict(metrics))
        self._metrics.setdefault(site, {})[int(b)] = m
        task = self.tasks.get(site, {}).get(META_TASK_NAME, site)
        for k, v in m.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self.log_server_scalar(f"{task}/{site}/{k}", v, int(b))

    def metrics_table(self) -> dict[str, Any]:
        """Every task at every base: ``{"key_metric", "bases": [0..S], "sites": {site: {task..., "metrics": {b:
        {...}}}}, "table": {"<task> (<site>)": [key metric per base, None when not measured]}}``."""
        bases = list(range(self.num_stages + 1))
        sites, table = {}, {}
        for site in sorted(set(self.tasks) | set(self._metrics)):
            task = self.tasks.get(site, {})
            per = self._metrics.get(site, {})
            sites[site] = {**task, "metrics": {str(b): per[b] for b in sorted(per)}}
            name = f"{task.get(META_TASK_NAME, '?')} ({site})"
            table[name] = [per.get(b, {}).get(self.key_metric) for b in bases]
        return _finite_or_none({"key_metric": self.key_metric, "bases": bases, "sites": sites, "table": table})

    def metrics_table_text(self) -> str:
        t = self.metrics_table()
        width = max([len(n) for n in t["table"]] + [len("task (site)")])
        head = f"{'task (site)':<{width}} | " + " | ".join(f"base {b:>3}" for b in t["bases"])
        rows = [f"{n:<{width}} | " + " | ".join(f"{'-':>8}" if v is None else f"{v:8.4f}" for v in vals)
                for n, vals in t["table"].items()]
        return f"{self.key_metric} of every task at every base (0 = the initial base)\n" + "\n".join([head, *rows])

    # ------------------------------------------------------------------------------------------------ files

    def _save_base(self, b: int, base: dict[str, np.ndarray], made_by: str) -> None:
        import torch

        from fl_plugins.engine.checkpoint import atomic_torch_save

        state = {k[len(BACKBONE_PREFIX):]: torch.as_tensor(np.array(v)) for k, v in base.items()}
        name = self.BASE_FILE.format(b)
        atomic_torch_save({"state_dict": state, "stage": int(b), "prefix": BACKBONE_PREFIX,
                           "embed_dim": self.embed_dim, "made_by": made_by}, os.path.join(self._app_root(), name))
        self._bases.append({"base": int(b), "file": name, "made_by": made_by})
        self._write_tables()

    def settings(self) -> dict[str, Any]:
        return {"num_stages": self.num_stages, "k_per_stage": self.k_per_stage, "schedule": self.schedule,
                "weighting": self.weighting, "damping": self.damping, "norm_bound": self.norm_bound,
                "validate_every_stage": self.validate_every_stage, "embed_dim": self.embed_dim}

    def _write_tables(self) -> None:
        from fl_plugins.atomic_io import atomic_write_json

        root = self._app_root()
        bases = {"settings": self.settings(), "tasks": self.tasks, "bases": self._bases, "stages": self._stages}
        atomic_write_json(_finite_or_none(json.loads(json.dumps(bases, default=str))),
                          os.path.join(root, self.BASES_TABLE))
        atomic_write_json(self.metrics_table(), os.path.join(root, self.METRICS_TABLE))
