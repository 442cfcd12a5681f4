"""FedAvg over task handlers in one process: the same handler code and the same aggregator as the FLARE jobs,
without FLARE's processes. Used by benchmarks (the "plain process" baseline) and by studies that need many seeds on
a CPU.

Aggregation = an nvflare ``ModelAggregator`` (default :class:`~fl_plugins.flare.aggregators.WeightedAverage`: the
weighted mean of each federated key with weights ``meta["NUM_STEPS_CURRENT_ROUND"]``, what nvflare's ``FedAvg``
does with ``WeightedAggregationHelper``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator

from fl_plugins.flare.aggregators import WeightedAverage

__all__ = ["fedavg", "run_fedavg"]


def fedavg(results: Sequence[FLModel], aggregator: ModelAggregator | None = None) -> dict[str, np.ndarray]:
    """Aggregate one round's ``results`` with ``aggregator`` (default a fresh ``WeightedAverage``)."""
    if not results:
        raise ValueError("fedavg needs at least one result")
    agg = aggregator or WeightedAverage()
    agg.reset_stats()
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
) -> dict[str, Any]:
    """Run ``rounds`` FedAvg rounds of ``handler.train``; returns per-round metrics and the final parameters.

    Returns:
        ``{"params": final global params, "rounds": [[site metrics...] per round], "final": [site metrics]}``.
    """
    params = init_params
    history = []
    total = total_rounds or start_round + rounds
    for r in range(start_round, start_round + rounds):
        g = FLModel(params=params, params_type=ParamsType.FULL, current_round=r, total_rounds=total)
        results: list = [None] * len(handlers)

        def run(i: int, g: FLModel = g, results: list = results) -> None:
            results[i] = handlers[i].train(g)

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
        params = fedavg(results, aggregator)
    final = []
    if final_validation:
        g = FLModel(params=params, params_type=ParamsType.FULL, current_round=start_round + rounds, total_rounds=total)
        final = [h.validate(g).metrics for h in handlers]
    return {"params": params, "rounds": history, "final": final}
