"""Every site result is validated before it is averaged (issue 15, "Validated updates"): one case per rejection
reason with FLModel objects (the rejected result is absent from the average, the reason names the site and the key
or value, the per-reason counts), the legitimate round (exact weighted mean), the all-rejected round (global model
unchanged), the job setting, and the controller's path through nvflare's real ``WFCommServer`` (log, meta and the
server TensorBoard event)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from nvflare.apis.fl_context import FLContext
from nvflare.apis.impl.wf_comm_server import WFCommServer
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.aggregators.weighted_aggregation_helper import WeightedAggregationHelper
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from fl_plugins.flare.aggregators import WeightedAverage
from fl_plugins.flare.controllers import SERVER_TB_EVENT, FedAvgWithFinalValidation
from fl_plugins.flare.inprocess import fedavg, run_fedavg
from fl_plugins.flare.update_check import REASONS, UpdateCheck, norm_outliers
from fl_plugins.wire import META_CLIENT_NAME, META_CURRENT_ROUND, META_NUM_STEPS
from tests.flare.fake_engine import FakeEngine

ROUND = 3
WEIGHTS = {"site-1": 10, "site-2": 30, "site-3": 60}


def _global() -> FLModel:
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=2).astype(np.float32)}
    return FLModel(params=params, params_type=ParamsType.FULL, current_round=ROUND)


def _result(site: str, params: dict, weight=None, rnd=ROUND, **kw) -> FLModel:
    meta = {META_CLIENT_NAME: site, **({META_NUM_STEPS: weight} if weight is not None else {})}
    return FLModel(params=params, params_type=kw.pop("params_type", ParamsType.FULL), current_round=rnd, meta=meta,
                   **kw)


def _honest(g: FLModel, seed: int = 1) -> list[FLModel]:
    """Three legitimate results: the global model plus a small update each."""
    rng = np.random.default_rng(seed)
    return [_result(s, {k: (v + 0.1 * rng.normal(size=v.shape)).astype(np.float32) for k, v in g.params.items()}, n)
            for s, n in WEIGHTS.items()]


def _weighted_mean(results: list[FLModel]) -> dict[str, np.ndarray]:
    w = np.array([r.meta[META_NUM_STEPS] for r in results], dtype=np.float64)
    w /= w.sum()
    return {k: sum(wi * r.params[k].astype(np.float64) for wi, r in zip(w, results)) for k in results[0].params}


def _run(results: list[FLModel], g: FLModel | None, **kw) -> tuple[WeightedAverage, FLModel]:
    agg = WeightedAverage(**kw)
    agg.reset_stats()
    if g is not None:
        agg.expect(g, ROUND)
    for r in results:
        agg.accept_model(r)
    return agg, agg.aggregate_model()


def _bad(g: FLModel, code: str) -> FLModel:
    """One result from site-9 failing exactly the check ``code`` (weight 1000: it would dominate the mean)."""
    p = {k: v.copy() for k, v in g.params.items()}
    if code == "missing_keys":
        del p["b"]
    elif code == "unexpected_keys":
        p["extra.key"] = np.zeros(2, np.float32)
    elif code == "shape":
        p["w"] = np.zeros((3, 3), np.float32)
    elif code == "dtype":
        p["w"] = p["w"].astype(np.int64)
    elif code == "nan":
        p["w"][0, 1] = np.nan
    elif code == "inf":
        p["b"][1] = -np.inf
    elif code == "float64_overflow":  # a float64 value that is Inf once cast to the global model's float32
        p["w"] = p["w"].astype(np.float64)
        p["w"][2, 0] = 1e300
    elif code == "norm_outlier":
        p = {k: v + 1000.0 for k, v in p.items()}
    elif code == "empty":
        p = {}
    kw = {}
    if code == "late":
        kw["rnd"] = ROUND - 1
    if code == "late_meta":  # no current_round, the round in meta instead
        r = _result("site-9", p, 1000, rnd=None)
        r.meta[META_CURRENT_ROUND] = ROUND - 2
        return r
    if code == "params_type":
        kw["params_type"] = ParamsType.DIFF
    return _result("site-9", p, float("nan") if code == "bad_weight" else 1000, **kw)


#: (case, reason code, fragments the message must contain besides the site and the round)
CASES = [
    ("missing_keys", "missing_keys", ["1 key(s) of the global model missing", "['b']"]),
    ("unexpected_keys", "unexpected_keys", ["not in the global model", "'extra.key'"]),
    ("shape", "shape", ["key 'w' has shape (3, 3), expected (3, 2)"]),
    ("dtype", "dtype", ["key 'w' has dtype int64, expected a floating dtype (float32"]),
    ("nan", "non_finite", ["'w' (1 NaN, 0 Inf of 6 values)"]),
    ("inf", "non_finite", ["'b' (0 NaN, 1 Inf of 2 values)"]),
    ("float64_overflow", "non_finite", ["'w' (0 NaN, 1 Inf of 6 values)"]),
    ("late", "wrong_round", [f"answers round {ROUND - 1}, not the current round {ROUND} (late)"]),
    ("late_meta", "wrong_round", [f"answers round {ROUND - 2}, not the current round {ROUND} (late)"]),
    ("bad_weight", "bad_weight", ["NUM_STEPS_CURRENT_ROUND=nan is not a finite number > 0"]),
    ("empty", "empty", ["no params"]),
    ("params_type", "params_type", ["params_type DIFF, expected FULL"]),
    ("norm_outlier", "norm_outlier", ["update norm ||params - global||", "median", "norm_bound = 10 x"]),
]


@pytest.mark.parametrize("case,code,fragments", CASES, ids=[c[0] for c in CASES])
def test_each_reason_rejects_names_and_leaves_the_result_out(case, code, fragments):
    g = _global()
    honest = _honest(g)
    bad = _bad(g, case)
    agg, out = _run(honest[:2] + [bad] + honest[2:], g)  # arrives in the middle of the round
    (rej,) = agg.round_rejections
    assert rej.code == code and code in REASONS and rej.site == "site-9" and rej.round == ROUND
    assert rej.message.startswith(f"site-9, round {ROUND}: ")
    for f in fragments:
        assert f in rej.message, rej.message
    expected = _weighted_mean(honest)
    for k in g.params:
        np.testing.assert_allclose(out.params[k], expected[k], rtol=1e-5, atol=1e-6)
        assert out.params[k].dtype == np.float32
    assert agg.rejected_counts == {code: 1}
    assert out.meta == {"nr_aggregated": 3, "nr_rejected": 1, "rejected_reasons": {code: 1}}


def test_legitimate_round_all_accepted_exact_weighted_mean():
    g = _global()
    honest = _honest(g)
    agg, out = _run(honest, g)
    assert agg.round_rejections == [] and not agg.rejected_counts
    helper = WeightedAggregationHelper()  # what nvflare's FedAvg computes: bit for bit the same
    for i, r in enumerate(honest):
        helper.add(data=r.params, weight=r.meta[META_NUM_STEPS], contributor_name=r.meta[META_CLIENT_NAME],
                   contribution_round=i)
    ref = helper.get_result()
    expected = _weighted_mean(honest)
    for k in g.params:
        np.testing.assert_array_equal(out.params[k], ref[k])
        np.testing.assert_allclose(out.params[k], expected[k], rtol=1e-6)
    assert out.meta["nr_aggregated"] == 3 and out.meta["nr_rejected"] == 0


def test_float64_result_is_cast_to_the_global_dtype_and_accepted():
    g = _global()
    honest = _honest(g)
    honest[1].params = {k: v.astype(np.float64) for k, v in honest[1].params.items()}
    agg, out = _run(honest, g)
    assert agg.round_rejections == []
    expected = _weighted_mean(honest)
    for k in g.params:
        assert out.params[k].dtype == np.float32
        np.testing.assert_allclose(out.params[k], expected[k], rtol=1e-6)


def test_every_result_rejected_keeps_the_global_model_unchanged():
    g = _global()
    bads = [_bad(g, c) for c in ("nan", "shape", "late")]
    for i, b in enumerate(bads):
        b.meta[META_CLIENT_NAME] = f"site-{i + 1}"
    agg, out = _run(bads, g)
    for k in g.params:
        np.testing.assert_array_equal(out.params[k], g.params[k])
    assert out.meta == {"nr_aggregated": 0, "nr_rejected": 3,
                        "rejected_reasons": {"non_finite": 1, "shape": 1, "wrong_round": 1}}
    assert [r.site for r in agg.round_rejections] == ["site-1", "site-2", "site-3"]


def test_counts_per_reason_add_up_over_rounds_and_the_round_list_resets():
    g = _global()
    agg = WeightedAverage()
    for bad in ("nan", "inf", "shape"):
        agg.reset_stats()
        agg.expect(g, ROUND)
        for r in _honest(g) + [_bad(g, bad)]:
            agg.accept_model(r)
        agg.aggregate_model()
        assert len(agg.round_rejections) == 1
    assert agg.rejected_counts == {"non_finite": 2, "shape": 1}
    agg.reset_stats()
    assert agg.round_rejections == [] and agg.rejected_counts == {"non_finite": 2, "shape": 1}


@pytest.mark.parametrize(
    ("norms", "bound", "rejected"),
    [
        ([1.0, 1.2, 0.9, 50.0], 10.0, [3]),  # 50 > 10 x median(1.0, 1.2, 0.9)
        ([1.0, 1.2, 0.9, 5.0], 10.0, []),  # a large but legitimate update (more local steps) stays
        ([1.0, 11.0], 10.0, [1]),  # 2 sites: the others' median is the other site; the larger one goes
        ([1.0, 9.0], 10.0, []),
        ([1.0, 50.0], None, []),  # off
        ([0.0, 0.0, 3.0], 10.0, []),  # the others sent the global model back: no scale to judge by
        ([2.0], 10.0, []),  # one site: no others
        ([1.0, 1.0, 100.0, 100.0], 10.0, [2, 3]),  # judged against the same set, not iterated
    ],
)
def test_norm_outliers_relative_to_the_median_of_the_others(norms, bound, rejected):
    out = norm_outliers([(f"site-{i}", n) for i, n in enumerate(norms)], bound, ROUND)
    assert sorted(out) == rejected
    for i, r in out.items():
        assert r.code == "norm_outlier" and r.site == f"site-{i}" and f"{norms[i]:.4g}" in r.message


def test_norm_check_off_or_without_the_global_model_keeps_a_huge_update():
    g = _global()
    honest = _honest(g)
    results = honest + [_bad(g, "norm_outlier")]
    for kw, gm in (({"norm_bound": None}, g), ({}, None)):
        agg, out = _run(results, gm, **kw)
        assert agg.round_rejections == []
        np.testing.assert_allclose(out.params["w"], _weighted_mean(results)["w"], rtol=1e-5)


def test_without_expect_non_finite_and_key_mismatch_are_still_rejected():
    """Old callers (no ``expect``): results are compared with the first accepted one."""
    g = _global()
    honest = _honest(g)
    agg, out = _run([honest[0], _bad(g, "missing_keys"), honest[1], _bad(g, "nan"), _bad(g, "shape"), honest[2]],
                    None)
    assert [r.code for r in agg.round_rejections] == ["missing_keys", "non_finite", "shape"]
    assert "of the round's first accepted result missing: ['b']" in agg.round_rejections[0].message
    assert agg.round_rejections[0].message.startswith("site-9, round ?: ")
    np.testing.assert_allclose(out.params["w"], _weighted_mean(honest)["w"], rtol=1e-5)
    agg.reset_stats()
    agg.accept_model(_bad(g, "nan"))
    with pytest.raises(ValueError, match=r"no result to aggregate \(all 1 result\(s\) rejected: \['non_finite'\]\)"):
        agg.aggregate_model()


@pytest.mark.parametrize("value", [1, 1.0, 0.5, -3, float("inf"), "10", True])
def test_norm_bound_must_be_above_one_or_none(value):
    with pytest.raises(ValueError, match=r"norm_bound must be a number > 1 or null \(off\), got"):
        UpdateCheck(norm_bound=value)
    with pytest.raises(ValueError, match=r"norm_bound must be a number > 1 or null"):
        WeightedAverage(norm_bound=value)


def test_inprocess_fedavg_validates_against_the_global_model():
    g = _global()
    honest = _honest(g)
    out = fedavg(honest + [_bad(g, "nan")], global_model=g)
    np.testing.assert_allclose(out["w"], _weighted_mean(honest)["w"], rtol=1e-5)
    out = fedavg([_bad(g, "nan")], global_model=g)  # all rejected: the global model comes back
    np.testing.assert_array_equal(out["w"], g.params["w"])


class _Site:
    def __init__(self, name: str, poisoned: bool = False) -> None:
        self.name, self.poisoned = name, poisoned

    def train(self, model: FLModel) -> FLModel:
        w = model.params["w"] + (np.nan if self.poisoned else 1.0)
        return FLModel(params={"w": w}, metrics={}, meta={META_NUM_STEPS: 1, META_CLIENT_NAME: self.name})

    def validate(self, model: FLModel) -> FLModel:
        return FLModel(params={}, metrics={})


def test_run_fedavg_with_a_nan_site_trains_with_the_others():
    res = run_fedavg([_Site("site-1"), _Site("site-2", poisoned=True)], {"w": np.zeros(2, np.float32)}, rounds=3)
    np.testing.assert_array_equal(res["params"]["w"], np.full(2, 3.0, np.float32))


# ------------------------------------------------------------------------------------------------ job setting


@pytest.mark.parametrize(("override", "expected"), [({}, 10.0), ({"update_norm_bound": None}, None),
                                                    ({"update_norm_bound": 3}, 3.0)])
def test_job_setting_reaches_the_aggregator_in_the_job_config(tmp_path, override, expected):
    from fl_plugins.flare.job_builder import build_job

    build_job("finetune_cls_cnn", {"fl": override}).export_job(str(tmp_path))
    cfg = json.loads(next(tmp_path.glob("*/app/config/config_fed_server.json")).read_text())
    agg = cfg["workflows"][0]["args"]["aggregator"]
    assert agg == {"path": "fl_plugins.flare.aggregators.WeightedAverage", "args": {"norm_bound": expected}}


@pytest.mark.parametrize("value", [1.0, 0.5, -1])
def test_job_setting_out_of_range_names_the_setting_and_value(value):
    from fl_plugins.flare.job_builder import FLSettings, build_job

    msg = rf"fl.update_norm_bound must be a number > 1 or null \(off\), got {value}"
    with pytest.raises(ValueError, match=msg):
        FLSettings(update_norm_bound=value)
    with pytest.raises(ValueError, match=msg):
        build_job("finetune_cls_cnn", {"fl": {"update_norm_bound": value}})


# ------------------------------------------------------------------------------------------------ controller


def test_controller_sets_the_expectation_leaves_out_rejected_results_and_reports_them(caplog):
    from nvflare.apis.analytix import AnalyticsData
    from nvflare.apis.dxo import from_shareable

    sites = list(WEIGHTS) + ["site-9"]
    engine = FakeEngine(sites)
    ctrl = FedAvgWithFinalValidation(num_rounds=5, num_clients=2)  # no aggregator given: a validating one
    assert isinstance(ctrl.aggregator, WeightedAverage) and ctrl.aggregator.norm_bound == 10.0
    comm = WFCommServer()
    ctrl.set_communicator(comm)
    comm._engine = engine
    ctrl.engine = engine
    ctrl.fl_ctx = engine.new_context()
    engine.handlers.append(ctrl)
    g = _global()
    honest = _honest(g)
    bad = _bad(g, "nan")
    ctrl.current_round = ROUND
    ctrl.aggregator.reset_stats()  # what FedAvg.run does at round start, then send_model
    ctrl._expected_count = len(sites)
    ctrl.send_model(task_name="train", data=g, targets=sites, callback=ctrl._aggregate_one_result)
    assert ctrl.aggregator.current_round == ROUND
    for r in honest + [bad]:
        site = r.meta.pop(META_CLIENT_NAME)  # nvflare sets it on the server from the sender
        with engine.new_context() as ctx:
            name, task_id, _ = comm.process_task_request(engine.client(site), ctx)
            comm.process_submission(engine.client(site), name, task_id, FLModelUtils.to_shareable(r), ctx)
            assert ctx.get_prop(AppConstants.AGGREGATION_ACCEPTED) is (site != "site-9")
    agg = ctrl._get_aggregated_result()
    expected = _weighted_mean(honest)
    for k in g.params:
        np.testing.assert_allclose(agg.params[k], expected[k], rtol=1e-5, atol=1e-6)
    assert agg.meta["nr_aggregated"] == 3 and agg.meta["nr_rejected"] == 1
    assert agg.meta["rejected_reasons"] == {"non_finite": 1}
    assert set(ctrl._round_metrics) == set(WEIGHTS)  # the rejected site's metrics do not score the best model
    scalars = {}
    for event, data in engine.events:
        if event == SERVER_TB_EVENT:
            a = AnalyticsData.from_dxo(from_shareable(data))
            scalars[a.tag] = (a.value, a.step)
    assert scalars == {"rejected_updates": (1.0, ROUND), "rejected_updates/non_finite": (1.0, ROUND)}
    logged = caplog.text
    assert f"site-9, round {ROUND}: non-finite values in 1 key(s): 'w'" in logged
    assert f"round {ROUND}: 1 of 4 result(s) rejected and left out of the average: site-9 (non_finite)" in logged


def test_controller_rejects_nothing_when_all_sites_are_honest_and_writes_zero():
    engine = FakeEngine(list(WEIGHTS))
    ctrl = FedAvgWithFinalValidation(num_rounds=5, num_clients=2)
    ctrl.engine = engine
    ctrl.fl_ctx = engine.new_context()
    ctrl.current_round = 0
    counts = ctrl.report_rejections(0, received=3)
    assert counts == {"nr_aggregated": 3, "nr_rejected": 0, "rejected_reasons": {}}
    assert [e for e, _ in engine.events] == [SERVER_TB_EVENT]


def test_aggregation_weights_without_an_aggregator_is_refused():
    with pytest.raises(ValueError, match="aggregation_weights needs nvflare's built-in average"):
        FedAvgWithFinalValidation(num_rounds=1, aggregation_weights={"site-1": 2.0})


def test_executor_echoes_the_round_it_answers():
    from fl_plugins.flare.executor import HandlerExecutor

    ex = HandlerExecutor(handler="ssl")
    ex._handler = object()
    ex._tasks = {"train": lambda m: FLModel(params={"w": m.params["w"] + 1}, params_type=ParamsType.FULL)}
    task = FLModelUtils.to_shareable(FLModel(params={"w": np.zeros(2)}, params_type=ParamsType.FULL, current_round=4))
    out = FLModelUtils.from_shareable(ex.execute("train", task, FLContext(), Signal()))
    assert out.current_round == 4 and not math.isnan(float(out.params["w"][0]))
