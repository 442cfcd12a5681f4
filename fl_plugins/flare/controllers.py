"""Server workflows.

``FedAvgWithFinalValidation`` is nvflare's ``FedAvg`` with three changes:

* **Every round goes to every connected site** (``sites_per_round=None``, the default). nvflare's ``FedAvg`` sends
  each round to a *random* ``num_clients`` of the connected sites; here ``num_clients`` is the *minimum* number of
  sites a round needs (the job's ``min_clients``) and ``sites_per_round`` an optional sample size.
* **A site that is lost mid-round is dropped, the round goes on.** When FLARE deems a site disconnected (its
  heartbeats stopped for the server's ``heart_beat_timeout``, then the job's ``dead_client_grace_period``; FLARE
  fires ``EventType.CLIENT_DISCONNECTED``), the site is removed from the targets of this workflow's standing tasks,
  so the round completes with the results of the remaining sites (FLARE's own ``BcastTaskManager`` then sees every
  remaining target answered). Later rounds skip it (``get_client_disconnect_time``); if it reconnects
  (``CLIENT_RECONNECTED``) it takes part again from the next round. The server log names the site, the round and
  the sites that remain. When fewer than ``min_clients`` sites remain FLARE itself stops the job
  (``FINISHED:EXECUTION_EXCEPTION``, "Aborting job due to deployment policy violation"); ``sample_clients`` also
  refuses to start a round with fewer than ``num_clients`` sites (the run ends with an error naming them).
* **Every result is validated** before it is averaged (:mod:`fl_plugins.flare.update_check`: key set, shapes,
  dtypes, finite values, the round, the update norm relative to the other sites'): when the ``train`` task is sent
  the aggregator is told the round's global model (``expect``); a rejected result is logged (site, round, reason)
  and left out, its metrics do not score the best model, the round's rejected count goes to the server's
  TensorBoard (``rejected_updates``, per reason ``rejected_updates/<code>``, step = the round, through the job's
  ``TBAnalyticsReceiver``: ``tb_events/<server name>/``) and to the aggregate's meta (``nr_aggregated``,
  ``nr_rejected``, ``rejected_reasons``). If every result of a round is rejected the global model stays unchanged
  for that round (error log, no crash). Without an ``aggregator`` the controller uses
  :class:`~fl_plugins.flare.aggregators.WeightedAverage` (nvflare's built-in weighted mean, validated) instead of
  nvflare's built-in streaming average, which validates nothing.
* **Final validation:** after the last round, the final global model is sent to every connected site with the
  task ``validate`` and the per-site metrics are written to ``<server app dir>/final_metrics.json`` (atomically)
  and the server log. Without it the last aggregate would never be evaluated (in FedAvg, sites validate the model
  they *receive*, i.e. the previous round's aggregate).

Checked against nvflare 2.9.0: ``WFCommServer._check_dead_clients`` / ``get_client_disconnect_time`` /
``client_is_active``, ``BcastTaskManager.check_task_exit`` (a broadcast task with ``min_responses=0`` ends when
the number of answered client tasks reaches ``len(task.targets)``), ``ServerJsonConfigurator`` (a workflow
controller is an event handler of the job), ``FedAvg.run`` (calls ``sample_clients(self.num_clients)`` each round).
"""

from __future__ import annotations

import json
import os
import random
import threading
from typing import Any

from nvflare.apis.controller_spec import Task, TaskCompletionStatus
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.workflows.fedavg import FedAvg

from fl_plugins.engine.checkpoint import atomic_write_text
from fl_plugins.flare import nvflare_internals
from fl_plugins.flare.aggregators import META_NR_AGGREGATED, META_NR_REJECTED, META_REJECTED_REASONS, WeightedAverage
from fl_plugins.flare.resume import RoundCheckpoint, ServerFiles
from fl_plugins.flare.update_check import Rejection, site_of
from fl_plugins.wire import META_CLIENT_NAME, META_RUN_ID, TASK_VALIDATE

__all__ = ["DEFAULT_MEMORY_GC_ROUNDS", "DEFAULT_ROUND_TIMEOUT", "BestModelSelection", "FedAvgWithFinalValidation", "FinalValidation", "NotEnoughSitesError", "SiteLiveness",
           "UpdateValidation", "plain_metrics"]

#: Seconds a site may take to answer one task (a round's training, a validation, a stage) before the round goes on
#: without it (job setting ``fl.round_timeout``; 0 = no limit). An hour: far above a round of the ready jobs on a
#: CPU (minutes), short enough that a hung site costs an hour, not the job.
DEFAULT_ROUND_TIMEOUT = 3600

#: Rounds between nvflare's memory clean-ups (``gc.collect`` + ``malloc_trim``) on the server and on the sites (job
#: settings ``fl.server_memory_gc_rounds`` / ``fl.client_memory_gc_rounds``; 0 = off). One clean-up took 0.1-0.25 s
#: in a process holding torch, MONAI and a U-Net (2 CPU cores): every 10th round keeps it under 0.025 s a round;
#: benchmarks/memory_soak.py measures the memory it keeps flat.
DEFAULT_MEMORY_GC_ROUNDS = 10

#: The analytics event the job's server-side ``TBAnalyticsReceiver`` writes (the sites' scalars arrive as it too).
SERVER_TB_EVENT = "fed.analytix_log_stats"


class NotEnoughSitesError(RuntimeError):
    """Fewer connected sites than a round needs; raised from ``sample_clients`` (FLARE then ends the run)."""


def plain_metrics(value: Any) -> Any:
    """``value`` with numpy/torch scalars turned into Python numbers (``.item()``), recursively through dicts, lists
    and tuples, so that site metrics can be averaged and written as JSON (e.g. nvflare's ``NPValidator`` reports
    ``numpy.float32``). Anything else that JSON cannot hold becomes its ``str``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): plain_metrics(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_metrics(v) for v in value]
    item = getattr(value, "item", None)
    if callable(item):
        try:
            out = item()
        except (TypeError, ValueError, RuntimeError):  # not a one-element array/tensor
            out = None
        if isinstance(out, (bool, int, float)):
            return out
    return str(value)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float))


def _check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = f"an int >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {what}, got {value!r}")


class SiteLiveness:
    """Mixin for any nvflare ``ModelController``: every round goes to every connected site (or a random
    ``sites_per_round`` of them), a site FLARE deems disconnected is dropped from the standing tasks so the round
    completes with the others, and later rounds skip it while ``num_clients`` sites remain (see the module
    docstring). Put it before the controller class in the bases and call :meth:`init_site_liveness` in
    ``__init__``; the controller's ``num_clients`` is the minimum number of sites a round needs."""

    num_clients: int

    def init_site_liveness(self, sites_per_round: int | None = None,
                           round_timeout: int = DEFAULT_ROUND_TIMEOUT) -> None:
        _check_int("round_timeout", round_timeout, 0)
        self.sites_per_round = sites_per_round
        self.round_timeout = round_timeout
        self._phase: str | None = None  # "round <n>" / "the final validation", for log messages
        self._own_tasks: list[Task] = []  # tasks this workflow broadcast (the standing ones are pruned lazily)
        self._own_tasks_lock = threading.Lock()
        #: site -> where it last failed to answer in time; skipped until it reconnects or sends a late result
        self.unresponsive: dict[str, str] = {}

    def _site_names(self) -> list[str]:
        """Every site of the job (FLARE's job participants, dead or alive), sorted."""
        engine = getattr(self, "engine", None)
        if engine is None:
            return []
        return sorted(c.name for c in engine.get_clients())

    def connected_sites(self) -> tuple[list[str], list[str]]:
        """(connected, disconnected) site names: FLARE's job participants split by ``get_client_disconnect_time``;
        a site that did not answer a task within ``round_timeout`` (:attr:`unresponsive`) counts as disconnected."""
        alive, gone = [], []
        for name in self._site_names():
            (gone if self.get_client_disconnect_time(name) or name in self.unresponsive else alive).append(name)
        return alive, gone

    def sample_clients(self, num_clients: int | None = None) -> list[str]:
        """Sites for the next round: every connected site (or a random ``sites_per_round`` of them).

        ``num_clients`` (what ``FedAvg.run`` passes) is ignored: the minimum is ``self.num_clients`` and the sample
        size ``self.sites_per_round``.

        Raises:
            NotEnoughSitesError: fewer than ``self.num_clients`` sites are connected.
        """
        del num_clients
        where = self._where()
        alive, gone = self.connected_sites()
        silent = [s for s in gone if s in self.unresponsive]
        lost = [s for s in gone if s not in self.unresponsive]
        if lost:
            self.log_warning(self.fl_ctx, f"{where}: skipping disconnected site(s) {lost}", fire_event=False)
        for site in silent:
            self.log_warning(self.fl_ctx, f"{where}: skipping {site}: it did not answer {self.unresponsive[site]} "
                                          f"within round_timeout={self.round_timeout}s and has not been heard of since "
                                          f"(nvflare 2.9.0 does not give a FLARE client restarted during a job its part "
                                          f"of the job back); it takes part again if it reconnects or sends a late "
                                          f"result", fire_event=False)
        if len(alive) < self.num_clients:
            raise NotEnoughSitesError(
                f"{where}: only {len(alive)} connected site(s) {alive} (disconnected: {gone}); "
                f"a round needs at least {self.num_clients} (num_clients, the job's min_clients)"
            )
        chosen = alive
        if self.sites_per_round is not None and self.sites_per_round < len(alive):
            chosen = sorted(random.sample(alive, self.sites_per_round))
            self.log_info(self.fl_ctx, f"{where}: sampled {len(chosen)} of {len(alive)} connected sites")
        self.log_info(self.fl_ctx, f"{where}: sending to {len(chosen)} site(s): {chosen}")
        return chosen

    def _where(self) -> str:
        if self._phase:
            return self._phase
        return f"round {self.current_round}" if self.current_round is not None else "before round 0"

    # ------------------------------------------------------------------------------------------------ events

    def broadcast(self, task: Task, *args: Any, **kwargs: Any) -> None:
        """``Controller.broadcast``, remembering ``task`` so a lost site can be dropped from its targets, with the
        round timeout (:meth:`_watch`)."""
        self._watch(task)
        super().broadcast(task, *args, **kwargs)

    def broadcast_and_wait(self, task: Task, *args: Any, **kwargs: Any) -> None:
        """``Controller.broadcast_and_wait``, remembering ``task`` (see :meth:`broadcast`)."""
        self._watch(task)
        super().broadcast_and_wait(task, *args, **kwargs)

    def _watch(self, task: Task) -> None:
        """Remember ``task``; give it ``round_timeout`` when it has no timeout of its own; when it ends by timing out,
        its targets that sent no result become :attr:`unresponsive` (logged with the site, the phase and the
        timeout)."""
        self._remember(task)
        if not task.timeout and self.round_timeout:
            task.timeout = self.round_timeout
        where = self._where()
        inner = task.task_done_cb

        def done(task: Task, fl_ctx: FLContext) -> None:
            if task.completion_status == TaskCompletionStatus.TIMEOUT:
                self.mark_unresponsive(task, where, fl_ctx)
            if inner is not None:
                inner(task=task, fl_ctx=fl_ctx)

        task.task_done_cb = done

    def mark_unresponsive(self, task: Task, where: str, fl_ctx: FLContext) -> list[str]:
        """The targets of a timed-out ``task`` without a result: skipped from now on (see :meth:`sample_clients`)."""
        answered = {ct.client.name for ct in task.client_tasks if ct.result_received_time is not None}
        silent = sorted(set(task.targets or []) - answered)
        for site in silent:
            self.unresponsive[site] = f"{where} (task {task.name!r})"
        if silent:
            alive, _ = self.connected_sites()
            self.log_warning(fl_ctx, f"{where}: task {task.name!r} timed out after round_timeout={task.timeout}s "
                                     f"without a result from {silent}: the round goes on with the results it has; "
                                     f"{len(alive)} site(s) remain: {alive}", fire_event=False)
        return silent

    def process_result_of_unknown_task(self, client: Any, task_name: str, client_task_id: str, result: Any,
                                       fl_ctx: FLContext) -> None:
        """A result for a task that already ended (it came after ``round_timeout``): discarded (it belongs to a round
        that is over), and its site, alive after all, takes part again from the next round."""
        site = getattr(client, "name", str(client))
        was = self.unresponsive.pop(site, None)
        self.log_warning(fl_ctx, f"{self._where()}: late result of {site} for task {task_name!r} discarded (its task "
                                 f"had ended{f': {was}' if was else ''}); {site} takes part again from the next round",
                         fire_event=False)

    def _remember(self, task: Task) -> None:
        with self._own_tasks_lock:
            self._own_tasks = [t for t in self._own_tasks if t.is_standing] + [task]

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        super().handle_event(event_type, fl_ctx)
        if event_type == EventType.CLIENT_DISCONNECTED:
            site = fl_ctx.get_prop(FLContextKey.DISCONNECTED_CLIENT_NAME)
            if site:
                self.drop_site(str(site), fl_ctx)
        elif event_type == EventType.CLIENT_RECONNECTED:
            site = fl_ctx.get_prop(FLContextKey.RECONNECTED_CLIENT_NAME)
            if site:
                self.unresponsive.pop(str(site), None)
                self.log_info(fl_ctx, f"site {site} reconnected during {self._where()}: it takes part again from the "
                                      "next round")

    def drop_site(self, site: str, fl_ctx: FLContext) -> list[str]:
        """Stop waiting for ``site``: remove it from the targets of this workflow's standing tasks.

        A broadcast task (``min_responses=0``) ends once the answered client tasks reach ``len(task.targets)``
        (``BcastTaskManager.check_task_exit``), so the round completes with the other sites' results. The targets
        list is replaced, not mutated (other threads read it). Returns the names of the tasks changed.
        """
        changed = []
        with self._own_tasks_lock:
            for task in self._own_tasks:
                targets = task.targets
                if task.is_standing and targets and site in targets:
                    task.targets = [t for t in targets if t != site]
                    changed.append(task.name)
        alive, gone = self.connected_sites()
        alive = [s for s in alive if s != site]
        total = len(alive) + len(set(gone) | {site})
        dropped = f"dropped from the standing task(s) {changed}" if changed else "no standing task waited for it"
        msg = (f"site {site} deemed disconnected by FLARE during {self._where()}: {dropped}; "
               f"{len(alive)} of {total} sites remain: {alive}")
        if len(alive) < self.num_clients:
            self.log_error(fl_ctx, f"{msg}; fewer than the {self.num_clients} needed (min_clients): FLARE stops the "
                                   "job", fire_event=False)
        else:
            self.log_warning(fl_ctx, f"{msg}; the job goes on with them", fire_event=False)
        return changed


class FinalValidation:
    """Mixin for any nvflare ``ModelController``: :meth:`run_final_validation` sends a model to every connected site
    with the task ``validate`` and writes the per-site metrics (and their mean) to
    ``<server app dir>/final_metrics.json`` atomically and to the server log. Call :meth:`init_final_validation`
    in ``__init__``; uses :meth:`SiteLiveness.connected_sites`."""

    def init_final_validation(self, final_validation: bool = True, validation_timeout: int = 0) -> None:
        _check_int("validation_timeout", validation_timeout, 0)
        if not isinstance(final_validation, bool):
            raise ValueError(f"final_validation must be a bool, got {final_validation!r}")
        self.final_validation = final_validation
        self.validation_timeout = validation_timeout

    def run_final_validation(self, params: dict[str, Any], params_type: Any, current_round: int,
                             total_rounds: int) -> dict[str, Any] | None:
        """Validate ``params`` on every connected site; returns the summary written (None if no site)."""
        self._phase = "the final validation"
        model = FLModel(params=params, params_type=params_type)
        model.current_round = current_round
        model.total_rounds = total_rounds
        alive, gone = self.connected_sites()
        if gone:
            self.log_warning(self.fl_ctx, f"final validation: skipping disconnected site(s) {gone}", fire_event=False)
        if not alive:
            self.log_error(self.fl_ctx, "final validation: no connected site", fire_event=False)
            return None
        results = self.send_model_and_wait(
            task_name=TASK_VALIDATE, data=model, targets=alive, timeout=self.validation_timeout
        )
        per_site = {}
        for r in results:
            site = (r.meta or {}).get(META_CLIENT_NAME, "?")
            per_site[site] = plain_metrics(r.metrics or {})
        summary: dict[str, Any] = {"round": model.current_round, "sites": per_site}
        keys = sorted({k for m in per_site.values() for k, v in m.items() if _is_number(v)})
        summary["mean"] = {
            k: sum(m[k] for m in per_site.values() if _is_number(m.get(k)))
            / max(1, sum(_is_number(m.get(k)) for m in per_site.values()))
            for k in keys
        }
        app_root = self.fl_ctx.get_prop(FLContextKey.APP_ROOT) or "."
        atomic_write_text(json.dumps(summary, indent=2), os.path.join(app_root, "final_metrics.json"))
        self.info(f"final validation of the global model: {json.dumps(summary)}")
        return summary


class BestModelSelection(ServerFiles):
    """Mixin for any nvflare ``ModelController``: the best global model, chosen right.

    A site's ``train`` result reports metrics of the model it *received* (the previous aggregate, or the initial
    model in the first round), and the final validation scores the last aggregate. So every global model the sites
    validated is a candidate, the last aggregate included, and the candidate saved is the model that was scored,
    not the aggregate made after it. Its score is the unweighted mean of ``key_metric`` over the sites that report
    it (every site counts once, whatever its size). The model (federated keys, as on the wire) and its score are
    saved together in ``<server app dir>/best_FL_global_model.pt`` (``{"model": ..., "best": {"aggregate",
    "round", "score", "sites"}}``; ``aggregate`` = the round whose aggregate it is, -1 = the initial model),
    atomically, and in ``best_metric.json``. Call :meth:`init_best_model` in ``__init__``.
    """

    BEST_MODEL_FILE = "best_FL_global_model.pt"
    BEST_METRIC_FILE = "best_metric.json"

    def init_best_model(self, key_metric: str | None) -> None:
        if key_metric is not None and (not isinstance(key_metric, str) or not key_metric):
            raise ValueError(f"key_metric must be a metric name or None, got {key_metric!r}")
        self.key_metric = key_metric
        self.best: dict[str, Any] | None = None

    def consider_candidate(self, params: dict[str, Any], aggregate: int, per_site: dict[str, dict[str, Any]],
                           when: str) -> bool:
        """Save ``params`` as the best model if its score beats the best so far; returns whether it did."""
        if not self.key_metric:
            return False
        values = {s: float(m[self.key_metric]) for s, m in per_site.items() if _is_number(m.get(self.key_metric))}
        if not values:
            self.log_warning(self.fl_ctx, f"{when}: no site reported {self.key_metric!r}; not a best-model candidate",
                             fire_event=False)
            return False
        score = sum(values.values()) / len(values)
        if self.best is not None and score <= self.best["score"]:
            return False
        import torch

        self.best = {"aggregate": int(aggregate), "round": when, "score": score, "key_metric": self.key_metric,
                     "sites": values}
        app_root = self.fl_ctx.get_prop(FLContextKey.APP_ROOT) or "."
        state = {k: torch.as_tensor(v).clone() for k, v in params.items()}
        self.files.save({"model": state, "best": dict(self.best)}, os.path.join(app_root, self.BEST_MODEL_FILE))
        self.files.write_text(json.dumps(self.best, indent=2), os.path.join(app_root, self.BEST_METRIC_FILE))
        self.info(f"new best global model: the {'initial model' if aggregate < 0 else f'aggregate of round {aggregate}'}"
                  f", mean {self.key_metric} {score:.4f} over {sorted(values)} ({when})")
        return True


class UpdateValidation:
    """Mixin for any nvflare ``ModelController`` that aggregates with an ``aggregator`` following the validation
    contract of :mod:`fl_plugins.flare.aggregators` (``expect``, ``accept_model`` returning a
    :class:`~fl_plugins.flare.update_check.Rejection`, ``round_rejections``, ``rejected_counts``).

    Call :meth:`expect_results` with the global model when a round's training task is sent and
    :meth:`report_rejections` after the aggregate is made: it logs the round's rejections, writes the count to the
    server's TensorBoard and returns the counts for the aggregate's meta. An aggregator without ``expect`` (e.g.
    one of nvflare's) is used as it is.
    """

    def expect_results(self, global_model: FLModel, current_round: int | None) -> None:
        agg = getattr(self, "aggregator", None)
        if agg is None or not hasattr(agg, "expect"):
            return
        if getattr(agg, "fl_ctx", None) is None:  # an aggregator passed as an argument gets no START_RUN event
            agg.fl_ctx = self.fl_ctx
        agg.expect(global_model, current_round)

    def report_rejections(self, current_round: int, received: int) -> dict[str, Any]:
        """Log and record the round's rejected results; returns ``{nr_aggregated, nr_rejected, rejected_reasons}``."""
        agg = getattr(self, "aggregator", None)
        rejections: list[Rejection] = list(getattr(agg, "round_rejections", None) or [])
        reasons: dict[str, int] = {}
        for r in rejections:
            reasons[r.code] = reasons.get(r.code, 0) + 1
        counts = {META_NR_AGGREGATED: max(0, received - len(rejections)), META_NR_REJECTED: len(rejections),
                  META_REJECTED_REASONS: reasons}
        if rejections:
            sites = ", ".join(f"{r.site} ({r.code})" for r in rejections)
            total = dict(getattr(agg, "rejected_counts", {}) or {})
            msg = (f"round {current_round}: {len(rejections)} of {received} result(s) rejected and left out of the "
                   f"average: {sites}; rejected so far in this job, per reason: {total}")
            if counts[META_NR_AGGREGATED] == 0:
                self.log_error(self.fl_ctx, f"{msg}; no result left: the global model stays unchanged this round",
                               fire_event=False)
            else:
                self.log_warning(self.fl_ctx, msg, fire_event=False)
        self.log_server_scalar("rejected_updates", len(rejections), current_round)
        for code, n in reasons.items():
            self.log_server_scalar(f"rejected_updates/{code}", n, current_round)
        return counts

    def log_server_scalar(self, tag: str, value: float, step: int) -> None:
        """One scalar in the server's TensorBoard (the job's ``TBAnalyticsReceiver`` writes it under the server's
        name); a job without a receiver ignores it. Never fails the round."""
        engine = getattr(self, "engine", None)
        if engine is None:
            return
        try:
            from nvflare.apis.analytix import AnalyticsDataType, LogWriterName
            from nvflare.apis.utils.analytix_utils import create_analytic_dxo, send_analytic_dxo

            dxo = create_analytic_dxo(tag=tag, value=float(value), data_type=AnalyticsDataType.SCALAR,
                                      writer=LogWriterName.TORCH_TB, global_step=int(step))
            with engine.new_context() as ctx:
                send_analytic_dxo(self, dxo=dxo, fl_ctx=ctx, event_type=SERVER_TB_EVENT)
        except Exception as e:  # TensorBoard is a report, not part of the round
            self.log_warning(self.fl_ctx, f"cannot write {tag!r} to the server's TensorBoard: {e}", fire_event=False)


class FedAvgWithFinalValidation(SiteLiveness, FinalValidation, BestModelSelection, UpdateValidation, RoundCheckpoint,
                                FedAvg):
    """FedAvg over all connected sites, dropping lost sites, validating every result, + final validation (see the
    module docstring).

    Other arguments are ``FedAvg``'s (``num_rounds``, ``persistor_id``, ``task_check_period``, ...).

    Args:
        num_clients: minimum number of connected sites a round needs; set it to the job's ``min_clients``.
            (In nvflare's ``FedAvg`` it is the number of sites sampled per round; here that is ``sites_per_round``.)
        sites_per_round: sites that train in each round: ``None`` (default) = every connected site; ``k`` = a random
            ``k`` of them each round (``>= num_clients``).
        final_validation: run the extra ``validate`` phase after the last round.
        validation_timeout: seconds to wait for the validation results (0 = ``round_timeout``).
        round_timeout: seconds a site may take to answer a task before the round goes on without it; the site is then
            skipped until it reconnects or sends a late result (0 = no limit; default :data:`DEFAULT_ROUND_TIMEOUT`).
        resume_from: a ``round_checkpoint.pt`` of a crashed run of this job (absolute, or relative to the server
            app's ``config/`` folder): start after its last completed round (:mod:`fl_plugins.flare.resume`).
        memory_gc_rounds: nvflare's server memory clean-up (``gc.collect`` + ``malloc_trim``) every N rounds
            (0 = off; default :data:`DEFAULT_MEMORY_GC_ROUNDS`).
        key_metric: the site metric that picks the best global model (:class:`BestModelSelection`); None = off.
        aggregator: a ``ModelAggregator``; None = :class:`~fl_plugins.flare.aggregators.WeightedAverage` with its
            default update-norm bound (jobs pass one with the job's ``fl.update_norm_bound``).

    Raises:
        ValueError: a setting out of range (the message names it and its value).
    """

    def __init__(
        self,
        *args: Any,
        num_clients: int = 1,
        sites_per_round: int | None = None,
        final_validation: bool = True,
        validation_timeout: int = 0,
        key_metric: str | None = None,
        round_timeout: int = DEFAULT_ROUND_TIMEOUT,
        resume_from: str | None = None,
        memory_gc_rounds: int = DEFAULT_MEMORY_GC_ROUNDS,
        **kwargs: Any,
    ) -> None:
        _check_int("num_clients", num_clients, 1)
        _check_int("sites_per_round", sites_per_round, 1, allow_none=True)
        if sites_per_round is not None and sites_per_round < num_clients:
            raise ValueError(
                f"sites_per_round must be >= num_clients ({num_clients}, the minimum number of sites per round), "
                f"got {sites_per_round}"
            )
        super().__init__(*args, num_clients=num_clients, memory_gc_rounds=memory_gc_rounds, **kwargs)
        if self.aggregator is None:  # nvflare's built-in streaming average validates nothing
            if self.aggregation_weights:
                raise ValueError("aggregation_weights needs nvflare's built-in average, which validates nothing; "
                                 f"pass an aggregator instead (got {self.aggregation_weights!r})")
            self.aggregator = WeightedAverage(exclude_vars=self.exclude_vars)
        self.init_site_liveness(sites_per_round, round_timeout)
        self.init_final_validation(final_validation, validation_timeout)
        self.init_best_model(key_metric)
        self.init_round_checkpoint(resume_from)
        self.total_rounds = self.start_round + self.num_rounds  # the job's rounds, counted from round 0
        self._last_model: FLModel | None = None
        self._round_metrics: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------------------------------------ workflow

    def set_communicator(self, communicator: Any) -> None:
        """nvflare 2.9's ``Controller.set_communicator`` sets ``communicator.task_check_period``, but the server's
        task monitor sleeps ``communicator._task_check_period`` (default 0.2 s), so the job's ``task_check_period``
        never took effect: a finished round was noticed 0.08-0.1 s late (benchmarks/fl_overhead.py --breakdown).
        The job's period is written there (:func:`~fl_plugins.flare.nvflare_internals.set_task_check_period`)."""
        super().set_communicator(communicator)
        nvflare_internals.set_task_check_period(communicator, nvflare_internals.task_check_period(self))

    def save_model(self, model: FLModel) -> None:
        """The persistor's save, then the round checkpoint (:mod:`fl_plugins.flare.resume`)."""
        self._last_model = model
        self.persist_model(model)
        if self.current_round is not None:
            self.write_round_checkpoint(model, int(self.current_round), self.total_rounds)

    def persist_model(self, model: FLModel) -> None:
        """``FedAvg.save_model``: the job's persistor (``FL_global_model.pt``)."""
        super().save_model(model)

    def send_model(self, task_name: str = "train", data: FLModel | None = None, *args: Any, **kwargs: Any) -> None:
        """``ModelController.send_model``; for the round's training task, the aggregator is first told the global
        model it will check the results against (``FedAvg.run`` resets the aggregator just before)."""
        if task_name == self.task_name and data is not None:
            self.expect_results(data, self.current_round)
            data.meta = {**(data.meta or {}), META_RUN_ID: self.run_id}
        super().send_model(task_name, data, *args, **kwargs)

    def _aggregate_one_result(self, result: FLModel) -> bool:
        """nvflare 2.9 ``FedAvg``'s per-result callback with a custom aggregator (this controller always has one),
        plus: every result goes to the aggregator's checks (an empty one too, counted as ``empty``); a rejected one
        returns False (FLARE then reports it not accepted) and its metrics are not kept; an accepted one's metrics
        of the received model are kept for the best-model choice."""
        site = site_of(result)
        nvflare_internals.note_params_type(self, result.params_type)
        rejection = self.aggregator.accept_model(result)
        received, expected = nvflare_internals.count_received(self)
        if isinstance(rejection, Rejection):
            self.info(f"Received {received}/{expected} results; {site}'s rejected")
            return False
        self._round_metrics[site] = plain_metrics(result.metrics or {})
        self.info(f"Aggregated {received}/{expected} results")
        return True

    def _get_aggregated_result(self) -> FLModel:
        """``FedAvg``'s aggregate, with the round's rejections reported (log, TensorBoard, meta); a site rejected at
        aggregation time (update norm) loses its metrics too. All rejected: the aggregator returns the global model
        unchanged."""
        result = super()._get_aggregated_result()
        for r in getattr(self.aggregator, "round_rejections", None) or []:
            self._round_metrics.pop(r.site, None)
        result.meta.update(self.report_rejections(int(self.current_round), nvflare_internals.received_count(self)))
        return result

    def update_model(self, model: FLModel, aggregate_results: FLModel) -> FLModel:
        """Before the aggregate replaces it, ``model`` (what the sites received and scored) is a best candidate."""
        rnd = int(self.current_round)
        self.consider_candidate(dict(model.params), rnd - 1, self._round_metrics, f"round {rnd}")
        self._round_metrics = {}
        return super().update_model(model, aggregate_results)

    def run(self) -> None:
        self._phase = None
        if self.resume_from:
            ckpt = self.read_resume_checkpoint(self.total_rounds, self.load_model())
            assert ckpt is not None
            self.model = FLModel(params=ckpt["params"], params_type=ParamsType(ckpt["params_type"]))
            self.start_round = int(ckpt["round"]) + 1
            self.num_rounds = self.total_rounds - self.start_round
        try:
            super().run()
            if not self.final_validation or self._last_model is None or self.abort_signal.triggered:
                return
            last = self.start_round + self.num_rounds - 1
            summary = self.run_final_validation(self._last_model.params, self._last_model.params_type, last + 1,
                                                self.num_rounds)
            if summary is not None:
                self.consider_candidate(dict(self._last_model.params), last, summary["sites"], "the final validation")
        finally:
            self.flush_files()
