"""StageAggregator alone (pure, FLModel objects): exact weighting and damping against hand computation, and every
kind of malformed or late result rejected, logged with its site and reason, and absent from the aggregate."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fl_plugins.flare.stage_aggregator import STAGE_REASONS, StageAggregator, stage_average
from fl_plugins.wire import META_CLIENT_NAME, META_NUM_STEPS

BASE = {"backbone.w": np.array([0.0, 4.0], np.float32), "backbone.b": np.array([[1.0]], np.float32)}


def _result(site: str, w, b=(1.0,), n: float | None = 1, stage: int | None = 1, **extra) -> FLModel:
    params = {"backbone.w": np.asarray(w, np.float32), "backbone.b": np.asarray([b], np.float32), **extra}
    meta = {META_CLIENT_NAME: site}
    if n is not None:
        meta[META_NUM_STEPS] = n
    return FLModel(params=params, params_type=ParamsType.FULL, current_round=stage, meta=meta)


def _agg(**kw) -> StageAggregator:
    a = StageAggregator(**kw)
    a.open(1, BASE)  # stage 1 (a stage 0 before it is closed)
    return a


# ------------------------------------------------------------------------------------------------ weighting


@pytest.mark.parametrize(("weighting", "damping", "expected_w", "expected_b"), [
    # theta_1 = [2, 8] (1 sample), theta_2 = [6, 0] (3 samples); B_0 = [0, 4]
    ("uniform", 1.0, [4.0, 4.0], [1.0]),        # (theta_1 + theta_2) / 2
    ("samples", 1.0, [5.0, 2.0], [3.5]),        # (1 theta_1 + 3 theta_2) / 4; b: (1*2 + 3*4) / 4
    ("uniform", 0.5, [2.0, 4.0], [1.0]),        # 0.5 B_0 + 0.5 avg
    ("samples", 0.5, [2.5, 3.0], [2.25]),       # 0.5 [0, 4] + 0.5 [5, 2]; b: 0.5 * 1 + 0.5 * 3.5
    ("samples", 0.25, [1.25, 3.5], [1.625]),    # 0.75 [0, 4] + 0.25 [5, 2]; b: 0.75 + 0.875
])
def test_weighting_and_damping_exact(weighting, damping, expected_w, expected_b):
    a = _agg(weighting=weighting, damping=damping)
    b1 = 2.0 if weighting == "samples" else 0.0
    assert a.accept(_result("site-1", [2, 8], b=(b1,), n=1)) is None
    assert a.accept(_result("site-2", [6, 0], b=(4.0 if weighting == "samples" else 2.0,), n=3)) is None
    out = a.aggregate()
    assert out.params["backbone.w"].dtype == np.float32
    np.testing.assert_array_equal(out.params["backbone.w"], np.array(expected_w, np.float32))
    np.testing.assert_array_equal(out.params["backbone.b"], np.array([expected_b], np.float32))
    assert out.meta["contributors"] == ["site-1", "site-2"]
    assert out.meta["weights"] == ({"site-1": 0.5, "site-2": 0.5} if weighting == "uniform"
                                   else {"site-1": 0.25, "site-2": 0.75})


def test_stage_average_keeps_non_float_keys_and_needs_results():
    base = {"f": np.zeros(2, np.float32), "i": np.array([3], np.int64)}
    out = stage_average(base, [({"f": np.ones(2), "i": np.array([9])}, 1.0)])
    assert out["i"].tolist() == [3] and out["f"].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="at least one result"):
        stage_average(base, [])


def test_no_accepted_result_keeps_the_base():
    a = _agg()
    a.accept(_result("site-1", [np.nan, 0]))
    out = a.aggregate()
    np.testing.assert_array_equal(out.params["backbone.w"], BASE["backbone.w"])
    assert out.meta["nr_aggregated"] == 0 and out.meta["nr_rejected"] == 1


@pytest.mark.parametrize(("kw", "match"), [
    ({"weighting": "median"}, "weighting must be one of"),
    ({"damping": 0}, r"damping must be a number in \(0, 1\]"),
    ({"damping": 1.5}, r"damping must be a number in \(0, 1\]"),
    ({"norm_bound": 1.0}, "norm_bound must be a number > 1"),
])
def test_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        StageAggregator(**kw)


# ------------------------------------------------------------------------------------------------ rejections

#: kind -> (a bad result of site-3, the expected code)
BAD = {
    "head_key": (lambda: _result("site-3", [1, 1], **{"head.weight": np.zeros((5, 2), np.float32)}),
                 "unexpected_keys"),
    "missing_key": (lambda: FLModel(params={"backbone.w": np.ones(2, np.float32)}, params_type=ParamsType.FULL,
                                    current_round=1, meta={META_CLIENT_NAME: "site-3"}), "missing_keys"),
    "shape": (lambda: _result("site-3", [1, 1, 1]), "shape"),
    "dtype": (lambda: FLModel(params={"backbone.w": np.array([1, 1], np.int32), "backbone.b": np.ones((1, 1),
                                      np.float32)}, params_type=ParamsType.FULL, current_round=1,
                              meta={META_CLIENT_NAME: "site-3"}), "dtype"),
    "nan": (lambda: _result("site-3", [np.nan, 1]), "non_finite"),
    "inf": (lambda: _result("site-3", [np.inf, 1]), "non_finite"),
    "bad_weight": (lambda: _result("site-3", [1, 1], n=-2), "bad_weight"),
    "empty": (lambda: FLModel(params={}, params_type=ParamsType.FULL, current_round=1,
                              meta={META_CLIENT_NAME: "site-3"}), "empty"),
    "late": (lambda: _result("site-3", [1, 1], stage=0), "stage_closed"),
    "ahead": (lambda: _result("site-3", [1, 1], stage=2), "wrong_round"),
    "diff": (lambda: FLModel(params=_result("site-3", [1, 1]).params, params_type=ParamsType.DIFF, current_round=1,
                             meta={META_CLIENT_NAME: "site-3"}), "params_type"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_malformed_or_late_result_rejected_logged_and_left_out(kind, caplog):
    make, code = BAD[kind]
    a = _agg()
    a.accept(_result("site-1", [2, 8], b=(0.0,)))
    with caplog.at_level(logging.WARNING, logger="fl_plugins.flare.stage_aggregator"):
        rejection = a.accept(make())
    assert rejection is not None and rejection.code == code and rejection.site == "site-3"
    assert code in STAGE_REASONS
    assert any("site-3" in r.message and code in r.message for r in caplog.records)
    a.accept(_result("site-2", [6, 0], b=(2.0,)))
    out = a.aggregate()
    assert out.meta["contributors"] == ["site-1", "site-2"] and out.meta["rejected_reasons"] == {code: 1}
    np.testing.assert_array_equal(out.params["backbone.w"], np.array([4.0, 4.0], np.float32))


def test_norm_outlier_removed_before_the_average(caplog):
    a = _agg(norm_bound=10.0)
    a.accept(_result("site-1", [0.1, 4.1]))
    a.accept(_result("site-2", [0.2, 3.9]))
    a.accept(_result("site-3", [1000.0, -996.0]))  # ~1000x the others' update norm
    with caplog.at_level(logging.WARNING, logger="fl_plugins.flare.stage_aggregator"):
        found = a.check_outliers()
    assert [(r.site, r.code) for r in found] == [("site-3", "norm_outlier")]
    assert "stage 1" in found[0].message and "site-3" in caplog.text
    assert a.n_accepted == 2 and a.aggregate().meta["contributors"] == ["site-1", "site-2"]


def test_closed_stage_and_duplicate_site_rejected():
    a = _agg()
    assert a.accept(_result("site-1", [1, 1])) is None
    assert a.accept(_result("site-1", [2, 2])).code == "duplicate_site"
    a.close()
    r = a.accept(_result("site-2", [1, 1]))
    assert r.code == "stage_closed" and "after the stage was closed" in r.message
    a.open(2, BASE)  # the next stage: a result that says stage 1 is late
    r = a.accept(_result("site-2", [1, 1], stage=1))
    assert r.code == "stage_closed" and "answers stage 1" in r.message and r.round == 2
    assert a.rejections == [r]  # each stage starts with no rejection
