"""Server-side aggregators (nvflare ``ModelAggregator``), usable by any controller that takes one and by the
in-process runner of studies and benchmarks (:mod:`fl_plugins.flare.inprocess`), so both run the same code.

``WeightedAverage`` is what nvflare's ``FedAvg`` does without a custom aggregator: a ``WeightedAggregationHelper``
over the results' params, each weighted by ``meta["NUM_STEPS_CURRENT_ROUND"]`` (1 when absent), in the order the
results arrived, over the results that pass the validation of :mod:`fl_plugins.flare.update_check`.

The validation contract every aggregator here follows (and every controller here drives):

* ``reset_stats()`` at round start, then ``expect(global_model, round)`` with the global model sent for the round
  (``FedAvgWithFinalValidation`` calls it when it sends the ``train`` task; :func:`~fl_plugins.flare.inprocess.fedavg`
  when given the global model). Without ``expect`` (older callers) results are compared with the round's first
  accepted result (key set, shapes) and non-finite values are still rejected; the norm check is then off.
* ``accept_model(result)`` runs the per-result checks; a rejected result is logged (warning: site, round, reason),
  counted and left out. It returns the :class:`~fl_plugins.flare.update_check.Rejection` (None when accepted).
* ``aggregate_model()`` runs the update-norm check over the accepted results, then averages the rest. If every
  result of the round was rejected (or none arrived) it returns the expected global model unchanged, with an error
  log; without ``expect`` that is a ``ValueError`` (there is no model to keep).
* ``round_rejections`` (this round's, reset by ``reset_stats``) and ``rejected_counts`` (per reason code, over the
  aggregator's life) are what the controller reports.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator
from nvflare.app_common.aggregators.weighted_aggregation_helper import WeightedAggregationHelper

from fl_plugins.flare.update_check import DEFAULT_NORM_BOUND, Rejection, UpdateCheck, site_of, weight_of

__all__ = ["WeightedAverage", "META_NR_AGGREGATED", "META_NR_REJECTED", "META_REJECTED_REASONS"]

#: ``meta`` keys of the aggregate (they stay in the global model's meta, as nvflare's own ``nr_aggregated``).
META_NR_AGGREGATED = "nr_aggregated"
META_NR_REJECTED = "nr_rejected"
META_REJECTED_REASONS = "rejected_reasons"


class WeightedAverage(ModelAggregator):
    """Weighted mean of every param over the accepted results (weights = ``NUM_STEPS_CURRENT_ROUND``).

    Args:
        exclude_vars: regex of param names left out of the average (nvflare's ``exclude_vars``).
        norm_bound: reject a result whose update norm ``||params - global||`` exceeds ``norm_bound`` x the median
            of the other results' (> 1; None = off; default 10, see :mod:`fl_plugins.flare.update_check`). With it
            on, the round's accepted results are held until ``aggregate_model`` (the norm check needs them all:
            the server holds one model per site for the round); off, each result is added as it arrives.

    Raises:
        ValueError: ``norm_bound`` not None and not a number > 1.
    """

    #: the job config always states the bound (FedJob otherwise leaves out arguments equal to their default)
    _always_serialize_args = ("norm_bound",)

    def __init__(self, exclude_vars: str | None = None, norm_bound: float | None = DEFAULT_NORM_BOUND) -> None:
        super().__init__()
        self.exclude_vars = exclude_vars
        self.norm_bound = norm_bound
        self._check = UpdateCheck(norm_bound=norm_bound, exclude_vars=exclude_vars)
        self.rejected_counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.reset_stats()

    # ------------------------------------------------------------------------------------------------ round

    def reset_stats(self) -> None:
        """Round start: forget the round's results, rejections and expected global model."""
        with self._lock:
            self._helper = WeightedAggregationHelper(exclude_vars=self.exclude_vars)
            self._params_type = None
            self._reference: dict[str, tuple[int, ...]] | None = None
            self._pending: list[tuple[str, dict[str, Any], float, float]] = []  # (site, params, weight, norm)
            self._added = 0
            self._seen = 0
            self.round_rejections: list[Rejection] = []
            self._check.clear()

    def expect(self, global_model: FLModel | dict[str, Any], current_round: int | None = None) -> None:
        """The global model sent for this round and the round number (call after ``reset_stats``)."""
        with self._lock:
            self._check.expect(global_model, current_round)

    @property
    def current_round(self) -> int | None:
        return self._check.round

    # ------------------------------------------------------------------------------------------------ results

    def accept_model(self, model: FLModel) -> Rejection | None:
        with self._lock:
            site = site_of(model, default=f"result {self._seen}")
            self._seen += 1
            rejection = self._check.check(model, reference=self._reference, site=site)
            if rejection is not None:
                self._reject(rejection)
                return rejection
            params = self._check.coerced(model)
            weight = weight_of(model)
            if self._reference is None:
                self._reference = {k: tuple(getattr(v, "shape", ())) for k, v in params.items()}
            self._params_type = self._params_type or model.params_type
            if self._check.norm_active:
                self._pending.append((site, params, weight, self._check.update_norm(params)))
            else:
                self._add(site, params, weight)
            return None

    def _add(self, site: str, params: dict[str, Any], weight: float) -> None:
        self._helper.add(data=params, weight=weight, contributor_name=site, contribution_round=self._added)
        self._added += 1

    def _reject(self, rejection: Rejection) -> None:
        self.round_rejections.append(rejection)
        self.rejected_counts[rejection.code] += 1
        self.log_warning(self.fl_ctx, f"rejected update ({rejection.code}): {rejection.message}; left out of the "
                                      "average", fire_event=False)

    def aggregate_model(self) -> FLModel:
        with self._lock:
            if self._pending:
                outliers = self._check.outliers([(s, n) for s, _, _, n in self._pending])
                for i, (site, params, weight, _) in enumerate(self._pending):
                    if i in outliers:
                        self._reject(outliers[i])
                    else:
                        self._add(site, params, weight)
                self._pending = []
            meta = {META_NR_AGGREGATED: self._added, META_NR_REJECTED: len(self.round_rejections),
                    META_REJECTED_REASONS: dict(Counter(r.code for r in self.round_rejections))}
            if not self._added:
                n = len(self.round_rejections)
                why = f"all {n} result(s) rejected: {[r.code for r in self.round_rejections]}" if n else \
                    "no result arrived"
                if not self._check.expecting:
                    raise ValueError(f"WeightedAverage: no result to aggregate ({why})")
                self.log_error(self.fl_ctx, f"round {self._check.round}: {why}; the global model stays unchanged "
                                            "this round", fire_event=False)
                return FLModel(params=dict(self._check.global_params), params_type=ParamsType.FULL, meta=meta)
            return FLModel(params=self._helper.get_result(), params_type=self._params_type, meta=meta)
