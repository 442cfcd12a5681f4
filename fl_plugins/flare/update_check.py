"""Validation of the results sites send to the server: one step, used by every aggregator (issue 15).

:class:`UpdateCheck` compares one site's ``train`` result with the global model the server sent for the round
(:meth:`UpdateCheck.expect`). A result is **rejected** (returned as a :class:`Rejection`: a code from
:data:`REASONS` and a message naming the site, the round and the key or value) when:

* ``wrong_round``: it says it answers another round than the current one (``FLModel.current_round``, else
  ``meta["current_round"]``; nvflare's ``FLModelUtils.from_shareable`` fills ``current_round`` from the result's
  ``CURRENT_ROUND`` header, which the site sets when its FLModel has ``current_round``: the package's executor and
  Client API loop echo the round of the task they answer). A result without a round is not judged on it. In
  nvflare 2.9's ``ModelController`` a result that arrives after its round's task ended never reaches the
  aggregator ("task is already finished - submission dropped"), so this catches a site that answers with a stale
  or replayed model (e.g. a restarted site resending an old result), and callers other than FLARE's controller.
* ``empty``: no params.
* ``missing_keys`` / ``unexpected_keys``: the key set is not exactly the global model's (both lists are named).
* ``params_type``: not a full model (``ParamsType.FULL``) where the global model is one.
* ``shape``: a key's shape differs from the global model's.
* ``dtype``: a non-floating array (int, bool, object, ...) where the global model has a floating one, or another
  dtype where the global model's is not floating. **Other float widths are accepted and cast** to the global
  model's dtype (:meth:`UpdateCheck.coerced`): a site computing in float64 (or sending float16) is honest, and the
  cast keeps the global model's dtype (and so the wire contract, float32) stable instead of FedAvg silently
  promoting it; the finiteness check runs on the cast values (a float64 1e300 becomes Inf in float32: rejected).
* ``non_finite``: NaN or Inf in any averaged key (the first keys are named with their NaN/Inf counts).
* ``bad_weight``: the aggregation weight ``meta["NUM_STEPS_CURRENT_ROUND"]`` is present but not a finite number
  > 0 (absent = 1, as in nvflare's FedAvg).
* ``norm_outlier`` (needs every result of the round, so it runs at aggregation time over the results that passed
  the checks above: :func:`norm_outliers`): the site's update norm ``||params - global||`` (all averaged keys, one
  L2 norm, computed in float64) exceeds ``norm_bound`` x the **median of the other sites'** update norms.

``norm_bound`` (default :data:`DEFAULT_NORM_BOUND` = 10; ``None`` = off; must be > 1): honest sites that run the
same number of local steps from the same global model move it by comparable amounts (with Adam each step moves a
parameter by about ``lr`` at most; with SGD the norms follow the gradient scale), and sites with more local data or
steps stay within a few x of the others; a poisoned, diverged or scaled update (e.g. a model-replacement attack
that multiplies its update by the number of sites) is orders larger. 10 leaves room for the honest spread and
still stops those. A bound <= 1 would reject the larger of any two honest updates. With **2 sites** the median of
"the others" is the one other site: the larger update is rejected when it is more than ``norm_bound`` x the smaller
(never both). When the others' median is 0 (they sent the global model back unchanged) no bound applies. Without
:meth:`UpdateCheck.expect` (no global model to compare with) the norm check is off.

Without :meth:`UpdateCheck.expect` the other checks compare a result with the first accepted result of the round
(key set and shapes; pass it as ``reference``), and non-finite values and bad weights are still rejected.

Pure: nothing here needs a FLARE engine (FLModel objects in, :class:`Rejection` objects out).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fl_plugins.wire import META_CLIENT_NAME, META_CURRENT_ROUND, META_NUM_STEPS

__all__ = ["DEFAULT_NORM_BOUND", "REASONS", "Rejection", "UpdateCheck", "check_norm_bound", "norm_outliers",
           "round_of", "site_of", "weight_of"]

#: Default bound of a site's update norm relative to the median of the other sites' (see the module docstring).
DEFAULT_NORM_BOUND = 10.0
#: Every rejection code, in the order the per-result checks run (``norm_outlier`` last, at aggregation time).
REASONS: tuple[str, ...] = ("wrong_round", "empty", "missing_keys", "unexpected_keys", "params_type", "shape",
                            "dtype", "non_finite", "bad_weight", "norm_outlier")
_SHOWN = 5  # names listed in a message before "... (+n more)"


@dataclass(frozen=True)
class Rejection:
    """Why one site's result was left out: ``code`` (one of :data:`REASONS`), the site, the round, a message that
    names them and the offending key or value."""

    code: str
    site: str
    round: int | None
    message: str

    def __str__(self) -> str:
        return self.message


def check_norm_bound(value: Any, name: str = "norm_bound") -> float | None:
    """``value`` as a float > 1, or None; else ``ValueError`` naming ``name`` and the value."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 1:
        raise ValueError(f"{name} must be a number > 1 or null (off), got {value!r}")
    return float(value)


def site_of(result: FLModel, default: str = "?") -> str:
    """The sending site (nvflare sets ``meta["client_name"]`` on every result the server receives)."""
    return str((result.meta or {}).get(META_CLIENT_NAME, default))


def round_of(result: FLModel) -> int | None:
    """The round the result says it answers: ``current_round``, else ``meta["current_round"]``, else None."""
    rnd = result.current_round
    if rnd is None:
        rnd = (result.meta or {}).get(META_CURRENT_ROUND)
    try:
        return None if rnd is None else int(rnd)
    except (TypeError, ValueError):
        return None


def weight_of(result: FLModel) -> float | None:
    """The FedAvg weight ``meta["NUM_STEPS_CURRENT_ROUND"]`` (1.0 when absent); None when it is not a finite
    number > 0."""
    value = (result.meta or {}).get(META_NUM_STEPS)
    if value is None:
        return 1.0
    if isinstance(value, bool):
        return None
    try:
        w = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return w if math.isfinite(w) and w > 0 else None


def _array(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor
        v = v.detach().cpu().numpy()
    return np.asarray(v)


def _names(keys: Sequence[str]) -> str:
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:_SHOWN])
    more = f", ... (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return f"[{shown}{more}]"


def _where(site: str, rnd: int | None) -> str:
    return f"{site}, round {'?' if rnd is None else rnd}"


def _is_float(dt: np.dtype) -> bool:
    return np.issubdtype(dt, np.floating)


def norm_outliers(norms: Sequence[tuple[str, float]], norm_bound: float | None,
                  current_round: int | None = None) -> dict[int, Rejection]:
    """The results whose update norm exceeds ``norm_bound`` x the median of the *other* results' norms, by their
    index in ``norms`` (``(site, ||params - global||)`` of the round's results that passed the per-result checks).

    Every result is judged against the same set (one pass, not iterated). Needs 2 or more norms; a result whose
    others' median is 0 is not judged.
    """
    if norm_bound is None or len(norms) < 2:
        return {}
    out = {}
    for i, (site, n) in enumerate(norms):
        others = [(s, m) for j, (s, m) in enumerate(norms) if j != i]
        med = float(np.median([m for _, m in others]))
        if med > 0 and n > norm_bound * med:
            names = ", ".join(s for s, _ in others[:_SHOWN]) + (", ..." if len(others) > _SHOWN else "")
            out[i] = Rejection(
                "norm_outlier", site, current_round,
                f"{_where(site, current_round)}: update norm ||params - global|| = {n:.4g} is {n / med:.3g} x the "
                f"median {med:.4g} of the other {len(others)} site(s)' update norms ({names}); the bound is "
                f"norm_bound = {norm_bound:g} x")
    return out


class UpdateCheck:
    """Checks of one site's result against the round's global model (see the module docstring).

    Args:
        norm_bound: bound of a site's update norm relative to the median of the other sites' (> 1), or None (off).
        exclude_vars: regex of keys that are not averaged (the aggregator's ``exclude_vars``): they are checked
            for presence, shape and dtype, but not for finite values or in the update norm.

    Raises:
        ValueError: ``norm_bound`` not None and not a number > 1.
    """

    def __init__(self, norm_bound: float | None = DEFAULT_NORM_BOUND, exclude_vars: str | None = None) -> None:
        self.norm_bound = check_norm_bound(norm_bound)
        self._exclude = re.compile(exclude_vars) if exclude_vars else None
        self.clear()

    # ------------------------------------------------------------------------------------------------ expectation

    def expect(self, global_model: FLModel | Mapping[str, Any], current_round: int | None = None) -> None:
        """The global model sent for the round (FLModel or params dict) and the round (default: the FLModel's
        ``current_round``); every result of the round is checked against them."""
        if isinstance(global_model, FLModel):
            params = global_model.params or {}
            if current_round is None:
                current_round = global_model.current_round
            self._params_type = global_model.params_type
        else:
            params = global_model
            self._params_type = ParamsType.FULL
        self._global = {k: _array(v) for k, v in params.items()}
        self.round = None if current_round is None else int(current_round)

    def clear(self) -> None:
        """Forget the expectation (the checks then compare results with each other)."""
        self._global: dict[str, np.ndarray] | None = None
        self._params_type = None
        self.round: int | None = None

    @property
    def expecting(self) -> bool:
        return self._global is not None

    @property
    def global_params(self) -> dict[str, np.ndarray] | None:
        return self._global

    @property
    def norm_active(self) -> bool:
        """Whether the update-norm check runs (a bound and a global model to compare with)."""
        return self.norm_bound is not None and self._global is not None

    def averaged(self, key: str) -> bool:
        return not (self._exclude and self._exclude.search(key))

    # ------------------------------------------------------------------------------------------------ checks

    def check(self, result: FLModel, reference: Mapping[str, tuple[int, ...]] | None = None,
              site: str | None = None) -> Rejection | None:
        """The first reason to reject ``result`` (in the order of :data:`REASONS`), or None.

        ``reference`` (used only without :meth:`expect`): key -> shape of the round's first accepted result.
        ``site``: the name used in the message (default :func:`site_of`).
        """
        site = site or site_of(result)
        rnd = self.round
        where = _where(site, rnd)

        def reject(code: str, msg: str) -> Rejection:
            return Rejection(code, site, rnd, f"{where}: {msg}")

        said = round_of(result)
        if rnd is not None and said is not None and said != rnd:
            when = "late" if said < rnd else "ahead"
            return reject("wrong_round", f"result answers round {said}, not the current round {rnd} ({when})")
        params = result.params or {}
        if not params:
            return reject("empty", "result has no params")
        if self._global is not None:
            expected = {k: v.shape for k, v in self._global.items()}
            against = "the global model"
        elif reference is not None:
            expected = dict(reference)
            against = "the round's first accepted result"
        else:
            expected = None
            against = ""
        arrays = {k: _array(v) for k, v in params.items()}
        if expected is not None:
            missing = [k for k in expected if k not in arrays]
            extra = sorted(k for k in arrays if k not in expected)
            if missing:
                also = f"; {len(extra)} unexpected: {_names(extra)}" if extra else ""
                return reject("missing_keys", f"{len(missing)} key(s) of {against} missing: {_names(missing)}{also}")
            if extra:
                return reject("unexpected_keys", f"{len(extra)} key(s) not in {against}: {_names(extra)}")
            if self._global is not None and self._params_type == ParamsType.FULL and result.params_type is not None:
                if ParamsType(result.params_type) != ParamsType.FULL:
                    return reject("params_type", f"params_type {ParamsType(result.params_type).name}, expected FULL "
                                                 "(a full model)")
            bad = [k for k in expected if tuple(arrays[k].shape) != tuple(expected[k])]
            if bad:
                k = bad[0]
                more = f" (and {len(bad) - 1} more key(s): {_names(bad[1:])})" if len(bad) > 1 else ""
                return reject("shape", f"key {k!r} has shape {tuple(arrays[k].shape)}, expected "
                                       f"{tuple(expected[k])} ({against}){more}")
        dtype_msg = self._dtype_problem(arrays)
        if dtype_msg:
            return reject("dtype", dtype_msg)
        nonfinite = []
        for k, a in arrays.items():
            if not self.averaged(k):
                continue
            a = self._as_expected(k, a)
            if a.dtype.kind not in "fc":
                continue
            finite = np.isfinite(a)
            if not finite.all():
                nan = int(np.isnan(a).sum())
                nonfinite.append(f"{k!r} ({nan} NaN, {int((~finite).sum()) - nan} Inf of {a.size} values)")
        if nonfinite:
            shown = ", ".join(nonfinite[:_SHOWN]) + (f", ... (+{len(nonfinite) - _SHOWN} more)"
                                                      if len(nonfinite) > _SHOWN else "")
            return reject("non_finite", f"non-finite values in {len(nonfinite)} key(s): {shown}")
        if weight_of(result) is None:
            value = (result.meta or {}).get(META_NUM_STEPS)
            return reject("bad_weight", f"aggregation weight {META_NUM_STEPS}={value!r} is not a finite number > 0")
        return None

    def _dtype_problem(self, arrays: Mapping[str, np.ndarray]) -> str | None:
        for k, a in arrays.items():
            if self._global is not None and k in self._global:
                want = self._global[k].dtype
                if _is_float(want) and not _is_float(a.dtype):
                    return f"key {k!r} has dtype {a.dtype}, expected a floating dtype ({want}, the global model's)"
                if not _is_float(want) and a.dtype != want:
                    return f"key {k!r} has dtype {a.dtype}, expected {want} (the global model's)"
            elif a.dtype.kind not in "biufc":
                return f"key {k!r} has dtype {a.dtype}, expected a numeric array"
        return None

    def _as_expected(self, key: str, a: np.ndarray) -> np.ndarray:
        if self._global is not None and key in self._global:
            want = self._global[key].dtype
            if _is_float(want) and a.dtype != want:
                with np.errstate(over="ignore"):
                    return a.astype(want)
        return a

    def coerced(self, result: FLModel) -> dict[str, Any]:
        """``result.params`` with floating arrays of another width cast to the global model's dtype (the same dict
        when nothing needs a cast). Call after :meth:`check` accepted the result."""
        params = result.params or {}
        if self._global is None:
            return params
        out = None
        for k, v in params.items():
            want = self._global[k].dtype if k in self._global else None
            if want is not None and _is_float(want) and _array(v).dtype != want:
                out = dict(params) if out is None else out
                out[k] = self._as_expected(k, _array(v))
        return params if out is None else out

    def update_norm(self, params: Mapping[str, Any]) -> float:
        """``||params - global||``: one L2 norm over every averaged key, in float64 (needs :meth:`expect`)."""
        if self._global is None:
            raise ValueError("update_norm needs the global model (call expect first)")
        total = 0.0
        for k, g in self._global.items():
            if not self.averaged(k) or not _is_float(g.dtype):
                continue
            d = _array(params[k]).astype(np.float64) - g.astype(np.float64)
            total += float(np.dot(d.ravel(), d.ravel()))
        return math.sqrt(total)

    def outliers(self, norms: Sequence[tuple[str, float]]) -> dict[int, Rejection]:
        """:func:`norm_outliers` with this check's bound and round."""
        return norm_outliers(norms, self.norm_bound, self.round)
