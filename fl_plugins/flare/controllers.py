"""Server workflows.

``FedAvgWithFinalValidation`` is nvflare's ``FedAvg`` plus one extra phase: after the last round, the final global
model is sent to every site with the task ``validate`` and the per-site metrics are written to
``<server app dir>/final_metrics.json`` (atomically) and the server log. Without it the last aggregate would
never be evaluated (in FedAvg, sites validate the model they *receive*, i.e. the previous round's aggregate).
"""

from __future__ import annotations

import json
import os

from nvflare.apis.fl_constant import FLContextKey
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.workflows.fedavg import FedAvg

from fl_plugins.engine.checkpoint import atomic_write_text

__all__ = ["FedAvgWithFinalValidation"]


class FedAvgWithFinalValidation(FedAvg):
    """FedAvg (``num_clients``, ``num_rounds``, ``persistor_id``, ``task_check_period``, ...) + final validation.

    Args:
        final_validation: run the extra ``validate`` phase after the last round.
        validation_timeout: seconds to wait for the validation results (0 = no limit).
    """

    def __init__(self, *args, final_validation: bool = True, validation_timeout: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.final_validation = final_validation
        self.validation_timeout = validation_timeout
        self._last_model: FLModel | None = None

    def save_model(self, model: FLModel) -> None:
        self._last_model = model
        super().save_model(model)

    def run(self) -> None:
        super().run()
        if not self.final_validation or self._last_model is None or self.abort_signal.triggered:
            return
        model = FLModel(params=self._last_model.params, params_type=self._last_model.params_type)
        model.current_round = self.start_round + self.num_rounds
        model.total_rounds = self.num_rounds
        results = self.send_model_and_wait(task_name="validate", data=model, timeout=self.validation_timeout)
        per_site = {}
        for r in results:
            site = (r.meta or {}).get("client_name", "?")
            per_site[site] = r.metrics or {}
        summary = {"round": model.current_round, "sites": per_site}
        keys = sorted({k for m in per_site.values() for k, v in m.items() if isinstance(v, (int, float))})
        summary["mean"] = {
            k: sum(m[k] for m in per_site.values() if k in m) / max(1, sum(k in m for m in per_site.values()))
            for k in keys
        }
        app_root = self.fl_ctx.get_prop(FLContextKey.APP_ROOT) or "."
        atomic_write_text(json.dumps(summary, indent=2), os.path.join(app_root, "final_metrics.json"))
        self.info(f"final validation of the global model: {json.dumps(summary)}")
