"""The FCL server workflow: FedAvg with a feature-exchange phase before every training task (methods-spec 7.9).

Per round (:class:`FCLController`, a :class:`~fl_plugins.flare.controllers.FedAvgWithFinalValidation`: lost sites
are dropped, every weight update is validated, final validation and best model as in every job)::

    1. extract_features -> every site of the round (the round's global weights): each loads them and answers
       {"feat": float16/32 [M_c, D_f], "part": int32 [M_c]} + meta shares_features
       every answer is checked (check_features): dimension D_f, 2-D, finite, partition ids in [0, S), M_c <=
       max_features_per_site; a bad, failed or missing answer is logged and left out; a site that shares nothing
       (M_c = 0) or whose answer was left out receives no other site's features this round (it trains on its local
       terms)
    2. train -> each site c its own task: no weights (it holds them since phase 1; the global weights only for a
       site that did not answer phase 1) + meta
       remote_feat = concat_{i != c, i sharing} feat_i (float32 [R_c, D_f]), remote_part = int32 [R_c]
       The weights travel once per round; every site extracts with the round's global model, so all features of
       the round share one feature space.
    3. FedAvg of encoder + projector (the sites' answers are checked by the job's aggregator as in every job)

The server never stores the features beyond the round. Its TensorBoard gets, per round, ``fcl/extract_seconds``
(the exchange phase, from sending the task to the last answer), ``fcl/features_received`` and
``fcl/feature_bytes_received`` / ``fcl/feature_bytes_sent`` (the payload arrays), and ``fcl/sites_sharing``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from nvflare.app_common.abstract.fl_model import FLModel

from fl_plugins.flare import nvflare_internals
from fl_plugins.flare.controllers import FedAvgWithFinalValidation, _check_int
from fl_plugins.flare.update_check import site_of
from fl_plugins.wire import (
    FEAT_KEY,
    META_REMOTE_FEAT,
    META_REMOTE_PART,
    META_SHARES_FEATURES,
    PART_KEY,
    TASK_EXTRACT_FEATURES,
)

__all__ = ["FCLController", "check_features", "remote_payloads"]


def check_features(model: FLModel, feature_dim: int, num_partitions: int, max_features: int | None
                   ) -> tuple[np.ndarray, np.ndarray] | str:
    """A site's ``extract_features`` answer as ``(feat float32 [M, D_f], part int32 [M])``, or why it is refused."""
    params = model.params or {}
    if set(params) != {FEAT_KEY, PART_KEY}:
        return f"params keys {sorted(params)}, expected {sorted([FEAT_KEY, PART_KEY])}"
    f, p = np.asarray(params[FEAT_KEY]), np.asarray(params[PART_KEY])
    if f.ndim != 2 or f.shape[1] != feature_dim:
        return f"features of shape {f.shape}, expected [M, {feature_dim}] (fcl.proj_dim)"
    if p.shape != (f.shape[0],):
        return f"partition ids of shape {p.shape} for {f.shape[0]} features"
    if not np.issubdtype(f.dtype, np.floating) or not np.issubdtype(p.dtype, np.integer):
        return f"dtypes feat {f.dtype} / part {p.dtype}, expected float / int"
    if not np.isfinite(f).all():
        return f"{int((~np.isfinite(f)).sum())} non-finite feature value(s)"
    if p.size and (int(p.min()) < 0 or int(p.max()) >= num_partitions):
        return f"partition ids in [{int(p.min())}, {int(p.max())}], outside [0, {num_partitions})"
    if max_features is not None and f.shape[0] > max_features:
        return f"{f.shape[0]} features, more than max_features_per_site={max_features}"
    return f.astype(np.float32, copy=False), p.astype(np.int32, copy=False)


def remote_payloads(banks: dict[str, tuple[np.ndarray, np.ndarray]], sites: list[str], feature_dim: int
                    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """For each of ``sites``: the other sharing sites' features and partitions concatenated (in site-name order);
    empty ``[0, D_f]`` for a site that shares nothing (not in ``banks``)."""
    out = {}
    for site in sites:
        others = [banks[s] for s in sorted(banks) if s != site] if site in banks and banks[site][0].shape[0] else []
        others = [o for o in others if o[0].shape[0]]
        if others:
            out[site] = (np.concatenate([o[0] for o in others]), np.concatenate([o[1] for o in others]))
        else:
            out[site] = (np.zeros((0, feature_dim), np.float32), np.zeros((0,), np.int32))
    return out


class FCLController(FedAvgWithFinalValidation):
    """FedAvg with the FCL feature exchange before each round's training task (see the module docstring).

    Args:
        feature_dim: ``D_f`` (the job's ``fcl.proj_dim``).
        num_partitions: ``S`` (the job's ``fcl.num_partitions``).
        max_features_per_site: refuse an answer with more features (None = no bound; jobs set the sites'
            ``max_features``).
        exchange: False = plain FedAvg (the no-exchange baseline; the sites build their local bank themselves).
        exchange_timeout: seconds to wait for the extraction answers (0 = no limit); a site that has not answered
            by then trains without remote features and its features are not shared.
        Other arguments: :class:`~fl_plugins.flare.controllers.FedAvgWithFinalValidation`'s.
    """

    def __init__(self, *args: Any, feature_dim: int = 128, num_partitions: int = 4,
                 max_features_per_site: int | None = None, exchange: bool = True, exchange_timeout: int = 0,
                 **kwargs: Any) -> None:
        _check_int("feature_dim", feature_dim, 1)
        _check_int("num_partitions", num_partitions, 1)
        _check_int("max_features_per_site", max_features_per_site, 1, allow_none=True)
        _check_int("exchange_timeout", exchange_timeout, 0)
        if not isinstance(exchange, bool):
            raise ValueError(f"exchange must be true or false, got {exchange!r}")
        super().__init__(*args, **kwargs)
        self.feature_dim = feature_dim
        self.num_partitions = num_partitions
        self.max_features_per_site = max_features_per_site
        self.exchange = exchange
        self.exchange_timeout = exchange_timeout
        self.last_exchange: dict[str, Any] = {}

    def exchange_features(self, sites: list[str], current_round: int, model: FLModel
                          ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], set[str]]:
        """Phase 1: send ``sites`` the round's global ``model`` and ask for their features; returns the valid,
        non-empty banks by site and the sites that answered (they hold the round's model)."""
        t0 = time.perf_counter()
        ask = FLModel(params=model.params, params_type=model.params_type, current_round=current_round,
                      total_rounds=self.num_rounds)
        results = self.send_model_and_wait(task_name=TASK_EXTRACT_FEATURES, data=ask, targets=sites,
                                           timeout=self.exchange_timeout)
        seconds = time.perf_counter() - t0
        banks: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        refused: dict[str, str] = {}
        received = 0
        for r in results:
            site = site_of(r)
            checked = check_features(r, self.feature_dim, self.num_partitions, self.max_features_per_site)
            if isinstance(checked, str):
                refused[site] = checked
                continue
            received += int(np.asarray(r.params[FEAT_KEY]).nbytes + np.asarray(r.params[PART_KEY]).nbytes)
            if checked[0].shape[0] and (r.meta or {}).get(META_SHARES_FEATURES, True):
                banks[site] = checked
        missing = sorted(set(sites) - {site_of(r) for r in results})
        for site, why in refused.items():
            self.log_error(self.fl_ctx, f"round {current_round}: features of site {site} refused ({why}); the round "
                                        "goes on without them and the site trains on its local terms",
                           fire_event=False)
        if missing:
            self.log_warning(self.fl_ctx, f"round {current_round}: no features from {missing} (failed, lost or "
                                          "timed out); they train on their local terms", fire_event=False)
        self.last_exchange = {"round": current_round, "seconds": seconds, "sharing": sorted(banks),
                              "refused": refused, "missing": missing, "bytes_received": received}
        self.info(f"round {current_round}: feature exchange {seconds:.2f} s; sharing {sorted(banks)} "
                  f"({sum(b[0].shape[0] for b in banks.values())} features)")
        return banks, {site_of(r) for r in results}

    def send_model(self, task_name: str = "train", data: FLModel | None = None, targets: list[str] | None = None,
                   min_responses: int | None = None, timeout: int = 0, callback: Any = None) -> None:
        """The round's training task: exchange phase, then one task per site with its remote features; any other
        task as ``FedAvgWithFinalValidation.send_model``."""
        if task_name != self.task_name or data is None or not self.exchange:
            return super().send_model(task_name, data, targets, min_responses, timeout, callback)
        rnd = int(self.current_round)
        sites = list(targets) if targets else sorted(c.name for c in self.engine.get_clients())
        banks, holding = self.exchange_features(sites, rnd, data)
        payloads = remote_payloads(banks, sites, self.feature_dim)
        self.expect_results(data, self.current_round)
        sent = 0
        models: dict[str, FLModel] = {}
        for site in sites:
            feat, part = payloads[site]
            sent += feat.nbytes + part.nbytes
            # a site that answered the extraction holds the round's model: its train task carries no weights
            models[site] = FLModel(params={} if site in holding else data.params, params_type=data.params_type,
                                   current_round=data.current_round,
                                   total_rounds=data.total_rounds, start_round=data.start_round,
                                   meta={**(data.meta or {}), META_REMOTE_FEAT: feat, META_REMOTE_PART: part})
        # one task per site; error tolerance over the whole round, not the last one-site task
        nvflare_internals.send_per_site(self, task_name, models, min_responses=self.num_clients, timeout=timeout,
                                        callback=callback)
        ex = self.last_exchange
        self.last_exchange["bytes_sent"] = sent
        self.log_server_scalar("fcl/extract_seconds", ex["seconds"], rnd)
        self.log_server_scalar("fcl/sites_sharing", len(ex["sharing"]), rnd)
        self.log_server_scalar("fcl/feature_bytes_received", ex["bytes_received"], rnd)
        self.log_server_scalar("fcl/feature_bytes_sent", sent, rnd)
        return None
