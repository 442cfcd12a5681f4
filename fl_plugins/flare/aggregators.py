"""Server-side aggregators (nvflare ``ModelAggregator``), usable by any controller that takes one and by the
in-process runner of studies and benchmarks (:mod:`fl_plugins.flare.inprocess`), so both run the same code.

``WeightedAverage`` is what nvflare's ``FedAvg`` does without a custom aggregator: a ``WeightedAggregationHelper``
over the results' params, each weighted by ``meta["NUM_STEPS_CURRENT_ROUND"]`` (1 when absent).
"""

from __future__ import annotations

from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator
from nvflare.app_common.aggregators.weighted_aggregation_helper import WeightedAggregationHelper

from fl_plugins.wire import META_CLIENT_NAME, META_NUM_STEPS

__all__ = ["WeightedAverage"]


class WeightedAverage(ModelAggregator):
    """Weighted mean of every param over the accepted results (weights = ``NUM_STEPS_CURRENT_ROUND``).

    Args:
        exclude_vars: regex of param names left out of the average (nvflare's ``exclude_vars``).
    """

    def __init__(self, exclude_vars: str | None = None) -> None:
        super().__init__()
        self.exclude_vars = exclude_vars
        self._helper = WeightedAggregationHelper(exclude_vars=exclude_vars)
        self._params_type = None
        self._keys: set[str] | None = None
        self._count = 0

    def accept_model(self, model: FLModel) -> None:
        site = (model.meta or {}).get(META_CLIENT_NAME, f"result {self._count}")
        keys = set(model.params or {})
        if self._keys is not None and keys != self._keys:
            raise ValueError(f"result from {site} has other keys than the first result: "
                             f"{sorted(keys ^ self._keys)[:5]}")
        self._keys = keys
        weight = float((model.meta or {}).get(META_NUM_STEPS, 1.0))
        self._helper.add(data=model.params, weight=weight, contributor_name=site, contribution_round=self._count)
        self._params_type = self._params_type or model.params_type
        self._count += 1

    def aggregate_model(self) -> FLModel:
        if not self._count:
            raise ValueError("WeightedAverage: no result to aggregate")
        return FLModel(params=self._helper.get_result(), params_type=self._params_type)

    def reset_stats(self) -> None:
        self._helper = WeightedAggregationHelper(exclude_vars=self.exclude_vars)
        self._params_type = None
        self._keys = None
        self._count = 0
