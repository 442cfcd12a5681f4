"""FCLController through nvflare's real task machinery (WFCommServer, ControllerHarness): the exchange phase and the
per-site training payloads, exactly what crosses the wire, and bad or missing features from a site."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fl_plugins.flare.fcl_controller import FCLController, check_features, remote_payloads
from fl_plugins.wire import (
    FEAT_KEY,
    META_NUM_STEPS,
    META_REMOTE_FEAT,
    META_REMOTE_PART,
    META_SHARES_FEATURES,
    PART_KEY,
    TASK_EXTRACT_FEATURES,
    TASK_TRAIN,
)
from tests.flare.fake_engine import Behaviour, ControllerHarness

D = 3
GLOBAL = {"encoder.w": np.zeros((2, 2), np.float32), "projector.b": np.zeros(D, np.float32)}
SITES = ["site-1", "site-2", "site-3"]


def features(site: str, rnd: int) -> tuple[np.ndarray, np.ndarray]:
    """Site i shares i + 1 features whose values name the site and round: row r = [i, rnd, r]."""
    i = SITES.index(site)
    feat = np.array([[i, rnd, r] for r in range(i + 1)], np.float32)
    return feat, (np.arange(i + 1) % 4).astype(np.int32)


def sites(bad: dict[str, str] | None = None) -> Behaviour:
    """Honest sites; ``bad[site]``: "nan", "dim", "part", "refuse", "error" or "many" in its extraction answer."""
    bad = bad or {}
    held: dict[str, dict] = {}  # the weights a site received with the extraction (the train task then has none)

    def act(site: str, task: str, m: FLModel):
        if task == TASK_EXTRACT_FEATURES:
            held[site] = m.params
            feat, part = features(site, m.current_round)
            kind = bad.get(site)
            if kind == "error":
                return "error"
            if kind == "nan":
                feat[0, 0] = np.nan
            elif kind == "dim":
                feat = np.ones((len(part), D + 1), np.float32)
            elif kind == "part":
                part = part + 9
            elif kind == "refuse":
                feat, part = feat[:0], part[:0]
            elif kind == "many":
                feat, part = np.ones((50, D), np.float32), np.zeros(50, np.int32)
            return FLModel(params={FEAT_KEY: feat, PART_KEY: part}, params_type=ParamsType.FULL,
                           meta={META_SHARES_FEATURES: kind != "refuse"})
        if task == TASK_TRAIN:
            weights = m.params or held[site]
            return FLModel(params={k: np.asarray(v) + 1.0 for k, v in weights.items()}, params_type=ParamsType.FULL,
                           current_round=m.current_round, meta={META_NUM_STEPS: 10})
        raise AssertionError(task)

    return act


def run(tmp_path, act: Behaviour, rounds: int = 2, **kwargs) -> ControllerHarness:
    ctrl = FCLController(num_rounds=rounds, num_clients=1, task_check_period=0.005, feature_dim=D,
                         max_features_per_site=20, final_validation=False, **kwargs)
    h = ControllerHarness(ctrl, SITES, tmp_path, lambda: FLModel(params={k: v.copy() for k, v in GLOBAL.items()},
                                                                  params_type=ParamsType.FULL))
    h.go(act)
    return h


def _sent(h: ControllerHarness, task: str) -> list[tuple[str, FLModel]]:
    return [(s, m) for s, name, m in h.received if name == task]


def _arrays(obj) -> list[np.ndarray]:
    if isinstance(obj, dict):
        return [a for v in obj.values() for a in _arrays(v)]
    if isinstance(obj, (list, tuple)):
        return [a for v in obj for a in _arrays(v)]
    return [np.asarray(obj)] if isinstance(obj, np.ndarray) else []


def test_each_site_receives_exactly_the_other_sites_features(tmp_path):
    h = run(tmp_path, sites())
    extract = _sent(h, TASK_EXTRACT_FEATURES)
    assert len(extract) == 6 and all(set(m.params) == set(GLOBAL) for _, m in extract)  # the round's weights
    train = _sent(h, TASK_TRAIN)
    assert sorted(s for s, _ in train) == sorted(SITES * 2)
    for site, m in train:
        others = [features(s, m.current_round) for s in SITES if s != site]
        np.testing.assert_array_equal(m.meta[META_REMOTE_FEAT], np.concatenate([f for f, _ in others]))
        np.testing.assert_array_equal(m.meta[META_REMOTE_PART], np.concatenate([p for _, p in others]))
        assert m.params == {}  # the weights travelled once, with the extraction
    # FedAvg of the weights as in every job: +1 per round
    np.testing.assert_array_equal(h.saved[-1].params["encoder.w"], GLOBAL["encoder.w"] + 2.0)


def test_only_feature_vectors_ids_and_weights_cross_the_wire(tmp_path):
    h = run(tmp_path, sites())
    for site, task, m in h.received:  # server -> site: the weights (once per round) and features
        assert set(m.params) <= set(GLOBAL)
        for a in _arrays(m.meta):
            assert a.ndim <= 2, (site, task, a.shape)  # no image-shaped tensor [C, H, W] / [B, C, H, W]
        if task == TASK_TRAIN:
            assert set(m.meta) >= {META_REMOTE_FEAT, META_REMOTE_PART}
            assert m.meta[META_REMOTE_FEAT].shape[1] == D and m.meta[META_REMOTE_PART].ndim == 1
    assert h.ctrl.last_exchange["bytes_received"] == sum(features(s, 1)[0].nbytes + features(s, 1)[1].nbytes
                                                         for s in SITES)


@pytest.mark.parametrize("kind", ["nan", "dim", "part", "many", "error"])
def test_a_bad_contribution_is_left_out_and_the_round_goes_on(tmp_path, caplog, kind):
    with caplog.at_level(logging.WARNING):
        h = run(tmp_path, sites({"site-2": kind}))
    for site, m in _sent(h, TASK_TRAIN):
        got = m.meta[META_REMOTE_FEAT]
        # a site that failed the extraction gets the weights with its train task
        assert set(m.params) == (set(GLOBAL) if (site, kind) == ("site-2", "error") else set())
        if site == "site-2":  # its features were refused: it trains on local terms
            assert got.shape == (0, D)
        else:
            other = "site-3" if site == "site-1" else "site-1"
            np.testing.assert_array_equal(got, features(other, m.current_round)[0])
    assert "site-2" in caplog.text and ("refused" in caplog.text or "no features from" in caplog.text)
    assert len(h.saved) == 2  # both rounds aggregated
    np.testing.assert_array_equal(h.saved[-1].params["encoder.w"], GLOBAL["encoder.w"] + 2.0)


def test_a_site_that_shares_nothing_gets_nothing(tmp_path):
    h = run(tmp_path, sites({"site-3": "refuse"}))
    for site, m in _sent(h, TASK_TRAIN):
        want = {"site-1": features("site-2", m.current_round)[0], "site-2": features("site-1", m.current_round)[0],
                "site-3": np.zeros((0, D), np.float32)}[site]
        np.testing.assert_array_equal(m.meta[META_REMOTE_FEAT], want)
    assert h.ctrl.last_exchange["sharing"] == ["site-1", "site-2"]


def test_exchange_off_is_plain_fedavg(tmp_path):
    h = run(tmp_path, sites(), exchange=False)
    assert _sent(h, TASK_EXTRACT_FEATURES) == []
    assert all(META_REMOTE_FEAT not in (m.meta or {}) and set(m.params) == set(GLOBAL) for _, m in _sent(h, TASK_TRAIN))


@pytest.mark.parametrize(("params", "why"), [
    ({FEAT_KEY: np.ones((2, D), np.float32)}, "params keys"),
    ({FEAT_KEY: np.ones((2, D, 1), np.float32), PART_KEY: np.zeros(2, np.int32)}, "features of shape"),
    ({FEAT_KEY: np.ones((2, D), np.float32), PART_KEY: np.zeros(3, np.int32)}, "partition ids of shape"),
    ({FEAT_KEY: np.ones((2, D), np.int32), PART_KEY: np.zeros(2, np.int32)}, "dtypes"),
    ({FEAT_KEY: np.full((2, D), np.inf, np.float32), PART_KEY: np.zeros(2, np.int32)}, "non-finite"),
    ({FEAT_KEY: np.ones((2, D), np.float16), PART_KEY: np.array([0, -1], np.int32)}, "outside [0, 4)"),
    ({FEAT_KEY: np.ones((30, D), np.float16), PART_KEY: np.zeros(30, np.int32)}, "more than max_features_per_site"),
])
def test_check_features_names_the_problem(params, why):
    got = check_features(FLModel(params=params), D, 4, 20)
    assert isinstance(got, str) and why in got


def test_check_features_accepts_float16_and_remote_payloads_by_hand():
    feat, part = check_features(FLModel(params={FEAT_KEY: np.ones((2, D), np.float16),
                                                PART_KEY: np.array([1, 3], np.int64)}), D, 4, 20)
    assert feat.dtype == np.float32 and part.dtype == np.int32
    banks = {s: features(s, 0) for s in SITES}
    out = remote_payloads(banks, SITES + ["site-4"], D)
    assert [len(out[s][0]) for s in SITES + ["site-4"]] == [2 + 3, 1 + 3, 1 + 2, 0]


def test_controller_settings_are_checked():
    with pytest.raises(ValueError, match="feature_dim must be an int >= 1"):
        FCLController(num_rounds=1, feature_dim=0)
    with pytest.raises(ValueError, match="exchange must be true or false"):
        FCLController(num_rounds=1, exchange="yes")
