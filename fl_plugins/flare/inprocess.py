"""FedAvg over task handlers in one process: the same handler code and the same aggregator as the FLARE jobs,
without FLARE's processes. Used by benchmarks (the "plain process" baseline) and by studies that need many seeds on
a CPU.

Aggregation = an nvflare ``ModelAggregator`` (default :class:`~fl_plugins.flare.aggregators.WeightedAverage`: the
weighted mean of each federated key with weights ``meta["NUM_STEPS_CURRENT_ROUND"]``, what nvflare's ``FedAvg``
does with ``WeightedAggregationHelper``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator

from fl_plugins.flare.aggregators import WeightedAverage

__all__ = ["fedavg", "run_fedavg", "run_stages"]


def fedavg(results: Sequence[FLModel], aggregator: ModelAggregator | None = None,
           global_model: FLModel | None = None) -> dict[str, np.ndarray]:
    """Aggregate one round's ``results`` with ``aggregator`` (default a fresh ``WeightedAverage``).

    With ``global_model`` (the model sent for the round, its ``current_round`` the round) the aggregator validates
    every result against it as in the FLARE jobs (``expect``; :mod:`fl_plugins.flare.update_check`): rejected
    results are left out, and if all are, the global model comes back unchanged."""
    if not results:
        raise ValueError("fedavg needs at least one result")
    agg = aggregator or WeightedAverage()
    agg.reset_stats()
    if global_model is not None and hasattr(agg, "expect"):
        agg.expect(global_model, global_model.current_round)
    for r in results:
        agg.accept_model(r)
    return {k: np.asarray(v, dtype=np.float32) for k, v in agg.aggregate_model().params.items()}


def run_fedavg(
    handlers: Sequence[Any],
    init_params: dict[str, np.ndarray],
    rounds: int,
    parallel: bool = False,
    final_validation: bool = True,
    start_round: int = 0,
    total_rounds: int | None = None,
    aggregator: ModelAggregator | None = None,
    key_metric: str | None = None,
    patience: int | None = None,
    exchange: dict[str, Any] | None = None,
    on_round: Callable[[int, list[FLModel], float], None] | None = None,
) -> dict[str, Any]:
    """Run up to ``rounds`` FedAvg rounds of ``handler.train``; returns per-round metrics and the final parameters.

    Model selection and early stopping (with ``key_metric``): the score of a global model is the mean over sites of
    ``key_metric`` that the sites report for it (round r's metrics are those of the global model *received* in round
    r; the last aggregate is scored by the final validation). The best-scoring global model is kept; with
    ``patience`` = P, training stops after P rounds in a row without a better score.

    Feature exchange (FCL, with ``exchange = {"feature_dim", "num_partitions", "max_features_per_site"}``): before
    each round every handler answers ``extract_features``, the answers are checked and each handler's train task
    carries the other sites' features in ``meta``, exactly as :class:`~fl_plugins.flare.fcl_controller.FCLController`
    does (its :func:`~fl_plugins.flare.fcl_controller.check_features` and ``remote_payloads``). The round's exchange
    record (seconds, bytes, sites sharing) is in ``out["exchange"]``.

    ``on_round(r, site_results, score)`` is called after every round with the sites' answers (metrics of the model
    received, ``meta`` with the train loss) and the round's ``key_metric`` score (NaN without one): progress output.

    Returns:
        ``{"params": final global params, "rounds": [[site metrics...] per round], "final": [site metrics],
        "best": {"round", "score", "params"} (with ``key_metric``), "rounds_run": int}``.
    """
    if patience is not None and (key_metric is None or patience < 1):
        raise ValueError(f"patience={patience!r} needs key_metric and must be >= 1")
    params = init_params
    history = []
    total = total_rounds or start_round + rounds
    best: dict[str, Any] = {"round": None, "score": -np.inf, "params": None}
    since_best = 0

    def score(metrics: Sequence[dict[str, Any]]) -> float:
        vals = [float(m[key_metric]) for m in metrics if m and key_metric in m]
        return float(np.mean(vals)) if vals else float("nan")

    exchanges = []
    for r in range(start_round, start_round + rounds):
        g = FLModel(params=params, params_type=ParamsType.FULL, current_round=r, total_rounds=total)
        results: list = [None] * len(handlers)
        tasks = [g] * len(handlers)
        if exchange is not None:
            tasks, record = _exchange(handlers, g, exchange)
            exchanges.append(record)

        def run(i: int, results: list = results, tasks: list = tasks) -> None:
            results[i] = handlers[i].train(tasks[i])

        if parallel:
            threads = [threading.Thread(target=run, args=(i,)) for i in range(len(handlers))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        else:
            for i in range(len(handlers)):
                run(i)
        history.append([res.metrics for res in results])
        sc = score(history[-1]) if key_metric is not None else float("nan")
        if key_metric is not None:
            if sc > best["score"]:
                best, since_best = {"round": r, "score": sc, "params": params}, 0
            else:
                since_best += 1
        if on_round is not None:
            on_round(r, results, sc)
        params = fedavg(results, aggregator, global_model=g)
        if patience is not None and since_best >= patience:
            break
    rounds_run = len(history)
    final = []
    if final_validation or key_metric is not None:
        g = FLModel(params=params, params_type=ParamsType.FULL, current_round=start_round + rounds_run,
                    total_rounds=total)
        final = [h.validate(g).metrics for h in handlers]
        if key_metric is not None and score(final) > best["score"]:
            best = {"round": start_round + rounds_run, "score": score(final), "params": params}
    out: dict[str, Any] = {"params": params, "rounds": history, "final": final, "rounds_run": rounds_run}
    if exchange is not None:
        out["exchange"] = exchanges
    if key_metric is not None:
        out["best"] = best
    return out


def _exchange(handlers: Sequence[Any], g: FLModel, settings: dict[str, Any]) -> tuple[list[FLModel], dict[str, Any]]:
    """The FCL exchange phase in one process: each handler's train task with the other sites' features."""
    import time

    from fl_plugins.flare.fcl_controller import check_features, remote_payloads
    from fl_plugins.wire import META_REMOTE_FEAT, META_REMOTE_PART, META_SHARES_FEATURES

    t0 = time.perf_counter()
    ask = FLModel(params=g.params, params_type=g.params_type, current_round=g.current_round,
                  total_rounds=g.total_rounds)
    names = [h.site.site_name for h in handlers]
    banks, refused, received, holding = {}, {}, 0, set()
    for name, h in zip(names, handlers):
        res = h.extract_features(ask)
        holding.add(name)
        checked = check_features(res, settings["feature_dim"], settings["num_partitions"],
                                 settings.get("max_features_per_site"))
        if isinstance(checked, str):
            refused[name] = checked
            continue
        received += sum(int(np.asarray(v).nbytes) for v in res.params.values())
        if checked[0].shape[0] and (res.meta or {}).get(META_SHARES_FEATURES, True):
            banks[name] = checked
    extract_s = time.perf_counter() - t0
    payloads = remote_payloads(banks, names, settings["feature_dim"])
    tasks = [FLModel(params={} if n in holding else g.params, params_type=g.params_type, current_round=g.current_round,
                     total_rounds=g.total_rounds, meta={META_REMOTE_FEAT: payloads[n][0], META_REMOTE_PART: payloads[n][1]})
             for n in names]
    sent = {n: int(payloads[n][0].nbytes + payloads[n][1].nbytes) for n in names}
    return tasks, {"round": g.current_round, "extract_seconds": extract_s, "sharing": sorted(banks),
                   "refused": refused, "bytes_received": received, "bytes_sent": sent}


def run_stages(
    handlers: Sequence[Any],
    base: dict[str, np.ndarray],
    num_stages: int,
    aggregator: Any | None = None,
    evaluate: bool = True,
    on_result: Callable[[Any, int], None] | None = None,
    on_stage: Callable[[int, dict[str, np.ndarray]], None] | None = None,
) -> dict[str, Any]:
    """Stage-wise fine-tuning (MedUniverse) over ``StagewiseHandler`` s in one process, sites one after another.

    Each stage ``s`` sends every handler the task :class:`~fl_plugins.flare.stagewise.StagewiseController` sends
    (:func:`~fl_plugins.flare.stagewise.stage_task`; no run id), passes every
    result through the job's :class:`~fl_plugins.flare.stage_aggregator.StageAggregator` (default: uniform, no
    damping; its checks, then its update-norm outlier check) exactly as the controller does, and the aggregate becomes
    the next base. The stage closes when every handler has answered (K = the number of handlers).

    Hooks for studies: ``on_result(handler, s)`` right after a site's answer (its model = its fine-tuned backbone +
    head), ``on_stage(s, next_base)`` after the stage's aggregate (before the next stage changes any head).

    Returns:
        ``{"bases": [B_0 .. B_S] (numpy, backbone keys), "stages": [{"stage", "contributors", "weights",
        "rejected": {site: code}, "sites": {site: {"train_loss", "metrics" (the received base, own head)}}}]}``.
    """
    from fl_plugins.flare.stage_aggregator import StageAggregator
    from fl_plugins.flare.stagewise import embed_dim_of, stage_task
    from fl_plugins.wire import META_CLIENT_NAME

    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    agg = aggregator or StageAggregator()
    width = embed_dim_of(base)
    bases, stages = [base], []
    for s in range(num_stages):
        agg.open(s, base)
        record: dict[str, Any] = {"stage": s, "sites": {}, "rejected": {}}
        for h in handlers:
            res = h.stage_finetune(stage_task(base, s, num_stages, h.num_classes, width, evaluate))
            name = h.site.site_name
            res.meta = {**(res.meta or {}), META_CLIENT_NAME: name}  # what FLARE stamps on a received result
            rejection = agg.accept(res)
            if rejection is not None:
                record["rejected"][name] = rejection.code
            if on_result is not None:
                on_result(h, s)
            record["sites"][name] = {"train_loss": (res.meta or {}).get(h.LOSS_META_KEY), "metrics": res.metrics}
        for r in agg.check_outliers():
            record["rejected"][r.site] = r.code
        agg.close()
        out = agg.aggregate()
        record["contributors"] = list(out.meta["contributors"])
        record["weights"] = dict(out.meta["weights"])
        base = {k: np.asarray(v) for k, v in out.params.items()}
        bases.append(base)
        stages.append(record)
        if on_stage is not None:
            on_stage(s, base)
    return {"bases": bases, "stages": stages}
