"""Predictive target network update (PTNU) and distance prediction (DP) of FCLOpt, pure numpy (methods-spec 7.8).

**Reconstructed** [R]: the paper's equations were not reachable; this follows methods-spec 7.8, itself a
reconstruction from the abstract ("predicts the parameters of the target network" to remove its download; "distance
prediction ... remove[s] most of the uploads of the target network"). Replace with the paper's equations when known.

PTNU: every party (server and sites) holds the same predicted target ``xi_hat`` and updates it from the global online
weights of consecutive rounds, as ``T`` EMA steps of momentum ``m`` along their linear interpolation::

    xi_hat^{r+1} = m^T xi_hat^r + (1 - m) sum_{t=1..T} m^{T-t} [theta^r + (t/T)(theta^{r+1} - theta^r)]
                 = m^T xi_hat^r + a theta^r + b theta^{r+1}
    with   b = (1 - m)/T * sum_{t=1..T} t m^{T-t},   a = (1 - m^T) - b     (so m^T + a + b = 1)

DP: a site compares its true local target ``xi_c`` after the round with ``xi_tilde_c`` = the same formula with its own
final online weights in place of ``theta^{r+1}``, and uploads ``xi_c`` only when the relative distance
``d_c = ||xi_c - xi_tilde_c|| / ||xi_c||`` exceeds ``delta``; the server then corrects the prediction with the uploads
(:func:`corrected_target`).

**Determinism**: the update is computed in float64 from the float32 wire values, key by key in sorted order, with
the coefficients from :func:`ptnu_coefficients` (a fixed sequence of float64 operations), and the result is
rounded to float32. The same inputs give bit-identical results on every party running the same numpy; parties must
therefore feed it exactly the broadcast global weights (float32 as on the wire) -- never a locally re-averaged copy.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["ptnu_coefficients", "predict_target", "relative_distance", "should_upload", "corrected_target"]


def ptnu_coefficients(m: float, steps: int) -> tuple[float, float, float]:
    """``(m^T, a, b)`` of the closed form above, float64.

    Raises:
        ValueError: ``m`` outside ``[0, 1]`` or ``steps < 1``.
    """
    if not 0.0 <= float(m) <= 1.0:
        raise ValueError(f"target momentum m must be in [0, 1], got {m!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"local steps T must be an int >= 1, got {steps!r}")
    m = float(m)
    mt = m**steps
    b = (1.0 - m) / steps * sum(t * m ** (steps - t) for t in range(1, steps + 1))
    a = (1.0 - mt) - b
    return mt, a, b


def predict_target(xi_hat: Mapping[str, np.ndarray], theta_prev: Mapping[str, np.ndarray],
                   theta_next: Mapping[str, np.ndarray], m: float, steps: int) -> dict[str, np.ndarray]:
    """``xi_hat^{r+1}`` from ``xi_hat^r``, ``theta^r`` and ``theta^{r+1}`` (same keys and shapes), float32."""
    keys = sorted(xi_hat)
    if sorted(theta_prev) != keys or sorted(theta_next) != keys:
        raise ValueError("predict_target: xi_hat, theta_prev and theta_next must have the same keys")
    mt, a, b = ptnu_coefficients(m, steps)
    out = {}
    for k in keys:
        x = np.asarray(xi_hat[k], dtype=np.float64)
        p = np.asarray(theta_prev[k], dtype=np.float64)
        n = np.asarray(theta_next[k], dtype=np.float64)
        if not (x.shape == p.shape == n.shape):
            raise ValueError(f"predict_target: shapes of {k!r} differ: {x.shape}, {p.shape}, {n.shape}")
        out[k] = (mt * x + a * p + b * n).astype(np.float32)
    return out


def relative_distance(xi: Mapping[str, np.ndarray], xi_tilde: Mapping[str, np.ndarray]) -> float:
    """``||xi - xi_tilde|| / ||xi||`` over all tensors (float64; 0 when both are zero, inf when only ``xi`` is)."""
    num = sum(float(np.sum((np.asarray(xi[k], np.float64) - np.asarray(xi_tilde[k], np.float64)) ** 2)) for k in xi)
    den = sum(float(np.sum(np.asarray(xi[k], np.float64) ** 2)) for k in xi)
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return float(np.sqrt(num / den))


def should_upload(distance: float, delta: float) -> bool:
    """DP's rule: upload the true target when ``distance > delta`` (``delta >= 0``; 0 = upload whenever it differs
    at all)."""
    if not isinstance(delta, (int, float)) or isinstance(delta, bool) or not delta >= 0:
        raise ValueError(f"DP threshold delta must be a number >= 0, got {delta!r}")
    return distance > delta


def corrected_target(predicted: Mapping[str, np.ndarray], uploads: Mapping[str, Mapping[str, np.ndarray]],
                     weights: Mapping[str, float]) -> dict[str, np.ndarray]:
    """The server's corrected target ``sum_{c in U} w_c xi_c + sum_{c not in U} w_c xi_hat`` (weights normalised over
    the sites of the round, ``weights``), float32; with no upload the prediction itself."""
    total = float(sum(weights.values()))
    if total <= 0:
        raise ValueError(f"weights must sum to > 0, got {dict(weights)}")
    unknown = sorted(set(uploads) - set(weights))
    if unknown:
        raise ValueError(f"uploads from sites without a weight: {unknown}")
    keys = sorted(predicted)
    rest = sum(w for s, w in weights.items() if s not in uploads) / total
    out = {}
    for k in keys:
        acc = rest * np.asarray(predicted[k], np.float64)
        for s in sorted(uploads):
            acc = acc + (weights[s] / total) * np.asarray(uploads[s][k], np.float64)
        out[k] = acc.astype(np.float32)
    return out
