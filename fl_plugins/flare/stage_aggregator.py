"""The stage aggregate of stage-wise fine-tuning (MedUniverse): pure, ``FLModel`` objects in, the next base out.

One stage ``s`` (:meth:`StageAggregator.open` with the stage's base ``B_s``) collects sites' fine-tuned backbones;
every result is checked before it can enter the aggregate (:meth:`StageAggregator.accept`), then
:meth:`StageAggregator.aggregate` makes the next base::

    avg     = sum_c alpha_c * theta_c        alpha_c = 1 / |U_s|            (weighting "uniform")
                                             alpha_c = N_c / sum_c' N_c'    (weighting "samples")
    B_{s+1} = (1 - eta) * B_s + eta * avg    eta = damping in (0, 1]; 1 = the average replaces the base

``U_s`` = the accepted results, ``N_c`` = a result's sample count (``meta["NUM_STEPS_CURRENT_ROUND"]``, the site's
labelled training items). Computed in float64, stored in the base's dtype (float32). A key whose base value is not
floating (an integer buffer; the ViT has none) keeps the base's value.

Checks, in order (a :class:`~fl_plugins.flare.update_check.Rejection` with a code and a message naming the site, the
stage and the offending key or value):

* ``stage_closed``: the stage is closed (:meth:`close`), or the result answers an earlier stage (its
  ``current_round``: a late result);
* ``duplicate_site``: the site already has an accepted result in this stage;
* the per-result checks of :class:`~fl_plugins.flare.update_check.UpdateCheck` against ``B_s`` (composition, not a
  copy): ``wrong_round`` (a result for a later stage), ``empty``, ``missing_keys``, ``unexpected_keys`` (**a head
  key is an unexpected key**: heads never leave a site, a result carrying one is refused), ``params_type``,
  ``shape``, ``dtype``, ``non_finite``, ``bad_weight``;
* ``norm_outlier`` (:meth:`check_outliers`, over the accepted results at once): ``||theta_c - B_s||`` above
  ``norm_bound`` x the median of the other accepted results' norms (UpdateCheck's rule; needs >= 2 results).

A rejected result is logged (warning: site, stage, code, message), kept in :attr:`rejections` and never enters the
average. Thread-safe (results arrive on FLARE's submission threads).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fl_plugins.flare.update_check import (
    DEFAULT_NORM_BOUND,
    REASONS,
    Rejection,
    UpdateCheck,
    round_of,
    site_of,
    weight_of,
)

__all__ = ["STAGE_REASONS", "WEIGHTINGS", "StageAggregator", "StageContribution", "check_damping", "stage_average"]

logger = logging.getLogger(__name__)

#: every rejection code of a stage, in the order the checks run
STAGE_REASONS: tuple[str, ...] = ("stage_closed", "duplicate_site") + REASONS
#: how the accepted results are weighted
WEIGHTINGS = ("uniform", "samples")

#: ``meta`` keys of the aggregate
META_CONTRIBUTORS = "contributors"
META_WEIGHTS = "weights"
META_NR_AGGREGATED = "nr_aggregated"
META_NR_REJECTED = "nr_rejected"
META_REJECTED_REASONS = "rejected_reasons"


def check_damping(value: Any) -> float:
    """``value`` as a float in (0, 1]; else ``ValueError`` naming ``damping``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 < value <= 1:
        raise ValueError(f"damping must be a number in (0, 1] (1 = the stage average replaces the base), got {value!r}")
    return float(value)


def stage_average(base: Mapping[str, np.ndarray], results: list[tuple[Mapping[str, Any], float]],
                  damping: float = 1.0) -> dict[str, np.ndarray]:
    """``(1 - damping) * base + damping * sum_c w_c theta_c / sum_c w_c`` per key (float64, cast to the base's dtype);
    non-floating keys keep the base's value. ``results``: ``(params, weight)`` with weights > 0."""
    if not results:
        raise ValueError("stage_average needs at least one result")
    total = float(sum(w for _, w in results))
    if not total > 0:
        raise ValueError(f"stage_average: the weights must sum to > 0, got {total}")
    out: dict[str, np.ndarray] = {}
    for k, b in base.items():
        b = np.asarray(b)
        if not np.issubdtype(b.dtype, np.floating):
            out[k] = b.copy()
            continue
        avg = np.zeros(b.shape, dtype=np.float64)
        for params, w in results:
            avg += (float(w) / total) * np.asarray(params[k], dtype=np.float64)
        new = (1.0 - damping) * b.astype(np.float64) + damping * avg if damping != 1.0 else avg
        out[k] = new.astype(b.dtype)
    return out


@dataclass(frozen=True)
class StageContribution:
    """One accepted result: the site, its params (cast to the base's dtypes), its sample count and update norm."""

    site: str
    params: dict[str, Any]
    n_samples: float
    norm: float


class StageAggregator:
    """Collects, checks and averages one stage's results at a time (see the module docstring).

    Args:
        weighting: ``"uniform"`` (every accepted result counts the same) or ``"samples"`` (by its sample count).
        damping: ``eta`` in (0, 1]: ``B_{s+1} = (1 - eta) B_s + eta avg``.
        norm_bound: the update-norm bound (> 1) relative to the median of the other results' norms; None = off.

    Raises:
        ValueError: a setting out of range (named with its value).
    """

    def __init__(self, weighting: str = "uniform", damping: float = 1.0,
                 norm_bound: float | None = DEFAULT_NORM_BOUND) -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {list(WEIGHTINGS)}, got {weighting!r}")
        self.weighting = weighting
        self.damping = check_damping(damping)
        self._check = UpdateCheck(norm_bound=norm_bound)
        self.norm_bound = self._check.norm_bound
        self._lock = threading.RLock()
        self.stage: int | None = None
        self._open = False
        self._base: dict[str, np.ndarray] = {}
        self._accepted: list[StageContribution] = []
        self.rejections: list[Rejection] = []

    # ------------------------------------------------------------------------------------------------ stage

    def open(self, stage: int, base: Mapping[str, Any]) -> None:
        """Start stage ``stage`` from the base ``base`` (``backbone.*`` params); forgets the previous stage."""
        with self._lock:
            self.stage = int(stage)
            self._base = {k: np.asarray(v) for k, v in base.items()}
            if not self._base:
                raise ValueError(f"stage {stage}: the base has no params")
            self._check.expect(FLModel(params=self._base, params_type=ParamsType.FULL), self.stage)
            self._accepted = []
            self.rejections = []
            self._open = True

    def close(self) -> None:
        """No result is accepted any more in this stage (later ones are rejected as ``stage_closed``)."""
        with self._lock:
            self._open = False

    @property
    def is_open(self) -> bool:
        return self._open

    @property
    def base(self) -> dict[str, np.ndarray]:
        return self._base

    @property
    def accepted(self) -> list[StageContribution]:
        with self._lock:
            return list(self._accepted)

    @property
    def n_accepted(self) -> int:
        return len(self._accepted)

    # ------------------------------------------------------------------------------------------------ results

    def _reject(self, rejection: Rejection) -> Rejection:
        self.rejections.append(rejection)
        logger.warning("stage %s: rejected the result of %s (%s): %s; left out of the stage aggregate",
                       self.stage, rejection.site, rejection.code, rejection.message)
        return rejection

    def accept(self, result: FLModel) -> Rejection | None:
        """Check ``result``; keep it for the aggregate (None) or return why it was left out."""
        with self._lock:
            site = site_of(result)
            stage = self.stage
            said = round_of(result)
            where = f"{site}, stage {'?' if stage is None else stage}"
            if stage is None or not self._open:
                return self._reject(Rejection("stage_closed", site, stage, f"{where}: result arrived after the stage "
                                              "was closed"))
            if said is not None and said < stage:
                return self._reject(Rejection("stage_closed", site, stage, f"{where}: result answers stage {said}, "
                                              "which is already closed (late)"))
            if any(c.site == site for c in self._accepted):
                return self._reject(Rejection("duplicate_site", site, stage, f"{where}: the site already has an "
                                              "accepted result in this stage"))
            rejection = self._check.check(result, site=site)
            if rejection is not None:
                msg = rejection.message.replace(f"round {stage}", f"stage {stage}", 1)
                return self._reject(Rejection(rejection.code, site, stage, msg))
            params = self._check.coerced(result)
            n = float(weight_of(result) or 1.0)
            self._accepted.append(StageContribution(site, dict(params), n, self._check.update_norm(params)))
            return None

    def check_outliers(self) -> list[Rejection]:
        """The update-norm check over the accepted results: outliers are removed (and returned)."""
        with self._lock:
            out = self._check.outliers([(c.site, c.norm) for c in self._accepted])
            if not out:
                return []
            found = []
            for i in sorted(out):
                r = out[i]
                found.append(self._reject(Rejection(r.code, r.site, self.stage,
                                                    r.message.replace(f"round {self.stage}", f"stage {self.stage}", 1))))
            self._accepted = [c for i, c in enumerate(self._accepted) if i not in out]
            return found

    # ------------------------------------------------------------------------------------------------ aggregate

    def weights(self) -> dict[str, float]:
        """``alpha_c`` of every accepted result (they sum to 1)."""
        with self._lock:
            raw = [(c.site, 1.0 if self.weighting == "uniform" else c.n_samples) for c in self._accepted]
            total = sum(w for _, w in raw)
            return {s: w / total for s, w in raw} if total > 0 else {}

    def aggregate(self) -> FLModel:
        """The next base from the accepted results (the base itself, unchanged, when there is none); ``meta``:
        ``contributors``, ``weights`` (alpha), ``nr_aggregated``, ``nr_rejected``, ``rejected_reasons``."""
        with self._lock:
            reasons: dict[str, int] = {}
            for r in self.rejections:
                reasons[r.code] = reasons.get(r.code, 0) + 1
            meta = {META_CONTRIBUTORS: [c.site for c in self._accepted], META_WEIGHTS: self.weights(),
                    META_NR_AGGREGATED: len(self._accepted), META_NR_REJECTED: len(self.rejections),
                    META_REJECTED_REASONS: reasons}
            if not self._accepted:
                params = {k: v.copy() for k, v in self._base.items()}
            else:
                w = 1.0 if self.weighting == "uniform" else None
                params = stage_average(self._base, [(c.params, w or c.n_samples) for c in self._accepted],
                                       self.damping)
            return FLModel(params=params, params_type=ParamsType.FULL, current_round=self.stage, meta=meta)
