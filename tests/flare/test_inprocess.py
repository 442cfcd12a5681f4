"""The in-process FedAvg runner's model selection and early stopping (used by the label-saving studies)."""

from __future__ import annotations

import numpy as np
import pytest
from nvflare.app_common.abstract.fl_model import FLModel

from fl_plugins.flare.inprocess import run_fedavg
from fl_plugins.wire import META_NUM_STEPS


class _ScriptedSite:
    """Reports a scripted validation score for each received global model and adds 1 to the weight."""

    def __init__(self, scores: list[float]) -> None:
        self.scores = scores
        self.received: list[float] = []

    def _score(self, model: FLModel) -> float:
        self.received.append(float(model.params["w"][0]))
        return self.scores[min(int(model.current_round), len(self.scores) - 1)]

    def train(self, model: FLModel) -> FLModel:
        return FLModel(params={"w": model.params["w"] + 1}, metrics={"val": self._score(model)},
                       meta={META_NUM_STEPS: 1})

    def validate(self, model: FLModel) -> FLModel:
        return FLModel(params={}, metrics={"val": self._score(model)})


@pytest.mark.parametrize(
    ("scores", "patience", "rounds_run", "best_round", "best_w"),
    [
        # round r scores the model received in round r (w = r); the final validation scores w = rounds_run
        ([0.1, 0.5, 0.4, 0.3, 0.2, 0.9], 3, 4, 1, 1.0),  # stops after 3 rounds without a gain (r = 2, 3, 4)
        ([0.1, 0.2, 0.3, 0.4, 0.6], 2, 4, 4, 4.0),  # never stops early; the last aggregate (final validation) wins
        ([0.5, 0.5, 0.5, 0.5], 1, 2, 0, 0.0),  # a tie is no improvement
    ],
)
def test_early_stopping_keeps_the_best_global_model(scores, patience, rounds_run, best_round, best_w):
    sites = [_ScriptedSite(scores), _ScriptedSite(scores)]
    res = run_fedavg(sites, {"w": np.zeros(1, np.float32)}, rounds=4, key_metric="val", patience=patience)
    assert res["rounds_run"] == rounds_run
    assert res["best"]["round"] == best_round
    assert float(res["best"]["params"]["w"][0]) == best_w
    assert res["best"]["score"] == pytest.approx(scores[best_round])
    assert len(res["rounds"]) == rounds_run


def test_patience_needs_a_key_metric():
    with pytest.raises(ValueError, match="patience=2 needs key_metric"):
        run_fedavg([_ScriptedSite([0.0])], {"w": np.zeros(1, np.float32)}, rounds=1, patience=2)


def test_on_round_reports_every_round_with_its_score():
    seen = []
    sites = [_ScriptedSite([0.1, 0.5, 0.4, 0.3]), _ScriptedSite([0.3, 0.7, 0.4, 0.3])]
    run_fedavg(sites, {"w": np.zeros(1, np.float32)}, rounds=4, key_metric="val", patience=2,
               on_round=lambda r, results, score: seen.append((r, [x.metrics["val"] for x in results], score)))
    assert [(r, v) for r, v, _ in seen] == [(0, [0.1, 0.3]), (1, [0.5, 0.7]), (2, [0.4, 0.4]), (3, [0.3, 0.3])]
    assert [s for _, _, s in seen] == pytest.approx([0.2, 0.6, 0.4, 0.3])  # the mean over sites; stops after r=3
    seen.clear()
    run_fedavg(sites[:1], {"w": np.zeros(1, np.float32)}, rounds=2, on_round=lambda *x: seen.append(x))
    assert len(seen) == 2 and all(np.isnan(s) for _, _, s in seen)  # no key_metric: NaN
