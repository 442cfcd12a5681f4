"""PTNU / DP (methods-spec 7.8, reconstructed): the closed form against T explicit EMA steps, bit-identical results on
every party that computes from the same broadcast weights, the DP distance and the server's correction by hand."""

from __future__ import annotations

import numpy as np
import pytest

from fl_plugins.core.ptnu import (
    corrected_target,
    predict_target,
    ptnu_coefficients,
    relative_distance,
    should_upload,
)


def _explicit(xi: np.ndarray, prev: np.ndarray, nxt: np.ndarray, m: float, steps: int) -> np.ndarray:
    """T EMA steps xi <- m xi + (1 - m) theta_t along theta_t = prev + (t / T)(nxt - prev)."""
    x = xi.astype(np.float64)
    for t in range(1, steps + 1):
        x = m * x + (1 - m) * (prev + t / steps * (nxt - prev))
    return x


@pytest.mark.parametrize(("m", "steps"), [(0.99, 1), (0.99, 10), (0.996, 25), (0.5, 3), (0.0, 4), (1.0, 5)])
def test_closed_form_equals_t_explicit_ema_steps(m, steps):
    rng = np.random.default_rng(0)
    xi, prev, nxt = (rng.normal(size=(3, 4)).astype(np.float32) for _ in range(3))
    got = predict_target({"w": xi}, {"w": prev}, {"w": nxt}, m, steps)["w"]
    np.testing.assert_allclose(got, _explicit(xi, prev, nxt, m, steps), rtol=1e-6, atol=1e-6)
    mt, a, b = ptnu_coefficients(m, steps)
    assert mt + a + b == pytest.approx(1.0, abs=1e-12)


def test_parties_computing_from_the_same_broadcasts_get_the_same_bits():
    rng = np.random.default_rng(1)
    thetas = [{"w": rng.normal(size=(5, 5)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}
              for _ in range(6)]  # the broadcast global online weights of rounds 0..5 (float32, as on the wire)
    server = {k: v.copy() for k, v in thetas[0].items()}
    for r in range(5):
        server = predict_target(server, thetas[r], thetas[r + 1], 0.99, 10)
    # a site computes the same chain from its own copies of the broadcasts, with the keys in another order
    site = {k: thetas[0][k].copy() for k in ("b", "w")}
    for r in range(5):
        site = predict_target(site, {k: thetas[r][k].copy() for k in ("b", "w")},
                              {k: thetas[r + 1][k].copy() for k in ("w", "b")}, 0.99, 10)
    for k in server:
        assert server[k].tobytes() == site[k].tobytes() and server[k].dtype == np.float32


def test_dp_distance_and_rule_by_hand():
    xi = {"a": np.array([3.0, 4.0], np.float32)}
    assert relative_distance(xi, {"a": np.array([3.0, 4.0], np.float32)}) == 0.0
    assert relative_distance(xi, {"a": np.array([0.0, 4.0], np.float32)}) == pytest.approx(3 / 5)
    assert should_upload(0.6, 0.5) and not should_upload(0.5, 0.5) and should_upload(1e-9, 0.0)
    with pytest.raises(ValueError, match="delta must be a number >= 0, got -0.1"):
        should_upload(0.2, -0.1)


def test_server_correction_by_hand():
    pred = {"w": np.array([1.0, 1.0], np.float32)}
    uploads = {"s1": {"w": np.array([3.0, 5.0], np.float32)}}
    got = corrected_target(pred, uploads, {"s1": 1.0, "s2": 3.0})["w"]
    np.testing.assert_allclose(got, [0.25 * 3 + 0.75 * 1, 0.25 * 5 + 0.75 * 1])
    np.testing.assert_array_equal(corrected_target(pred, {}, {"s1": 1.0})["w"], pred["w"])  # nobody uploaded
    every = {"s1": {"w": np.array([2.0, 2.0], np.float32)}, "s2": {"w": np.array([4.0, 0.0], np.float32)}}
    np.testing.assert_allclose(corrected_target(pred, every, {"s1": 1.0, "s2": 1.0})["w"], [3.0, 1.0])  # all upload
    with pytest.raises(ValueError, match="uploads from sites without a weight"):
        corrected_target(pred, {"s9": pred}, {"s1": 1.0})


@pytest.mark.parametrize(("m", "steps", "match"), [(1.5, 3, "m must be in"), (0.9, 0, "T must be an int >= 1")])
def test_bad_settings_are_named(m, steps, match):
    with pytest.raises(ValueError, match=match):
        ptnu_coefficients(m, steps)
