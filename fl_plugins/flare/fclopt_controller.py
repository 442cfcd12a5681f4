"""The FCLOpt server workflow: FedAvg with communication accounting and, with PTNU, the predicted target network
(methods-spec 7.8, reconstructed; the site side and the choices: :mod:`fl_plugins.flare.fclopt_handler`).

:class:`FCLOptController` is a :class:`~fl_plugins.flare.controllers.FedAvgWithFinalValidation` (lost sites dropped,
results validated, final validation) that

* **accounts for every byte** of the weights it sends and receives, per site and round, split into ``online``
  (``encoder.*``, ``projector.*``), ``predictor`` and ``target``: server TensorBoard ``comm/up_<part>`` and
  ``comm/down_<part>`` (bytes per site, mean over the round's sites) and, at the end of the job,
  ``<server app dir>/communication.json`` (per round and site, totals, and the fraction of site-rounds with a
  target upload);
* with ``ptnu=True`` never sends ``target.*`` except to resynchronise a site (one that did not take part in the
  previous round: it missed it, or joins late) or, after DP uploads, the corrected target to every site; keeps
  ``xi_hat`` and updates it after each aggregation with :func:`fl_plugins.core.ptnu.predict_target` from the
  broadcast online weights of consecutive rounds, exactly as the sites do; takes the ``target.*`` a site uploads
  out of its result before the aggregator's checks (they are checked here: keys, shapes, finite), and
  - with DP (``dp=True``): corrects the prediction with the uploads (:func:`~fl_plugins.core.ptnu.
    corrected_target`, weights = the sites' aggregation weights) and sends the corrected target with the next task;
  - without DP: logs the prediction error ``||mean upload - xi_hat|| / ||mean upload||`` (``ptnu/prediction_error``)
    and keeps the prediction (so no party's target differs).

The job must send the weights unquantised (PTNU needs every party to see the same float32 values).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from nvflare.apis.fl_constant import FLContextKey
from nvflare.app_common.abstract.fl_model import FLModel

from fl_plugins.engine.checkpoint import atomic_write_text
from fl_plugins.flare import nvflare_internals
from fl_plugins.flare.controllers import FedAvgWithFinalValidation, _check_int
from fl_plugins.flare.update_check import site_of
from fl_plugins.wire import META_NUM_STEPS

__all__ = ["FCLOptController", "COMM_FILE", "part_of", "payload_bytes"]

COMM_FILE = "communication.json"
#: BatchNorm buffers: federated with the online network, but not part of the predicted target
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
PARTS = ("online", "predictor", "target")


def part_of(key: str) -> str:
    """``online`` / ``predictor`` / ``target`` (or ``other``) of a wire key."""
    if key.startswith("target."):
        return "target"
    if key.startswith("predictor."):
        return "predictor"
    if key.startswith(("encoder.", "projector.")):
        return "online"
    return "other"


def payload_bytes(params: dict[str, Any]) -> dict[str, int]:
    """Bytes of ``params`` per part (``online``, ``predictor``, ``target``, ``other``)."""
    out = {p: 0 for p in (*PARTS, "other")}
    for k, v in (params or {}).items():
        out[part_of(k)] += int(np.asarray(v).nbytes)
    return out


class FCLOptController(FedAvgWithFinalValidation):
    """FedAvg of FCLOpt with communication accounting, and PTNU / DP (see the module docstring).

    Args:
        ptnu: keep the target on the parties (predicted), never broadcast it (but to resynchronise or correct).
        dp: correct the prediction with the sites' uploads (DP); needs ``ptnu``.
        target_momentum: ``m`` of the sites' target EMA (the job's ``fclopt.target_momentum``).
        local_steps: ``T``, the sites' steps per round (the job's ``steps_per_round``).
        Other arguments: :class:`~fl_plugins.flare.controllers.FedAvgWithFinalValidation`'s.
    """

    def __init__(self, *args: Any, ptnu: bool = False, dp: bool = False, target_momentum: float = 0.99,
                 local_steps: int = 1, **kwargs: Any) -> None:
        from fl_plugins.core.ptnu import ptnu_coefficients

        if not isinstance(ptnu, bool) or not isinstance(dp, bool):
            raise ValueError(f"ptnu and dp must be true or false, got {ptnu!r} and {dp!r}")
        if dp and not ptnu:
            raise ValueError("dp=True needs ptnu=True (DP corrects a predicted target)")
        _check_int("local_steps", local_steps, 1)
        ptnu_coefficients(target_momentum, local_steps)  # validates m
        super().__init__(*args, **kwargs)
        self.ptnu, self.dp = ptnu, dp
        self.target_momentum, self.local_steps = float(target_momentum), local_steps
        self.xi_hat: dict[str, np.ndarray] | None = None
        self._theta: dict[str, np.ndarray] | None = None  # the broadcast online weights of this round (target keys)
        self._correction = False  # send the target to every site in the next round
        self._last_round: dict[str, int] = {}
        self._uploads: dict[str, dict[str, np.ndarray]] = {}
        self._weights: dict[str, float] = {}
        self.comm: list[dict[str, Any]] = []

    # -- PTNU state ------------------------------------------------------------------------------------------------
    def _target_keys(self, params: dict[str, Any]) -> list[str]:
        """The predicted target's keys: ``target.`` + the online parameters (not the BatchNorm statistics, which
        the sites neither predict nor upload)."""
        return sorted("target." + k for k in params if k.startswith(("encoder.", "projector."))
                      and not k.endswith(BN_BUFFERS))

    def _theta_of(self, params: dict[str, Any]) -> dict[str, np.ndarray]:
        return {t: np.asarray(params[t[len("target."):]], dtype=np.float32) for t in self._target_keys(params)}

    def send_model(self, task_name: str = "train", data: FLModel | None = None, targets: list[str] | None = None,
                   min_responses: int | None = None, timeout: int = 0, callback: Any = None) -> None:
        if task_name != self.task_name or data is None:
            return super().send_model(task_name, data, targets, min_responses, timeout, callback)
        rnd = int(self.current_round)
        sites = list(targets) if targets else sorted(c.name for c in self.engine.get_clients())
        self._uploads, self._weights = {}, {}
        if not self.ptnu:
            self.comm.append({"round": rnd, "down": {s: payload_bytes(data.params) for s in sites}, "up": {}})
            return super().send_model(task_name, data, targets, min_responses, timeout, callback)
        online = {k: v for k, v in data.params.items() if not k.startswith("target.")}
        self._theta = self._theta_of(online)
        if self.xi_hat is None:  # every party's initial target: a copy of the initial theta
            self.xi_hat = {k: v.copy() for k, v in self._theta.items()}
        self.expect_results(FLModel(params=online, params_type=data.params_type), self.current_round)
        down = {}
        models: dict[str, FLModel] = {}
        for site in sites:
            resync = rnd > self.start_round and self._last_round.get(site) != rnd - 1
            resync = resync or (rnd == self.start_round and rnd > 0)  # a resumed job: nobody holds the state
            params = {**online, **self.xi_hat} if (resync or self._correction) else online
            down[site] = payload_bytes(params)
            if resync:
                self.info(f"round {rnd}: sending the target to {site} (it did not take part in round {rnd - 1})")
            models[site] = FLModel(params=params, params_type=data.params_type, current_round=data.current_round,
                                   total_rounds=data.total_rounds, start_round=data.start_round,
                                   meta=dict(data.meta or {}))
        # one task per site; error tolerance over the whole round, not the last one-site task
        nvflare_internals.send_per_site(self, task_name, models, min_responses=self.num_clients, timeout=timeout,
                                        callback=callback)
        self._correction = False
        self.comm.append({"round": rnd, "down": down, "up": {}})
        return None

    def _aggregate_one_result(self, result: FLModel) -> bool:
        """``FedAvgWithFinalValidation._aggregate_one_result`` (nvflare 2.9's private ``FedAvg`` callback, listed in
        :data:`~fl_plugins.flare.nvflare_internals.INTERNALS`), with the upload's bytes counted and, with PTNU, the
        ``target.*`` upload taken out of the result first (checked here; kept for DP or the prediction error)."""
        site = site_of(result)
        if self.comm:
            self.comm[-1]["up"][site] = payload_bytes(result.params)
        if self.ptnu and result.params:
            uploaded = {k: result.params.pop(k) for k in list(result.params) if k.startswith("target.")}
            if uploaded:
                problem = self._check_upload(uploaded)
                if problem:
                    self.log_warning(self.fl_ctx, f"round {self.current_round}: target upload of {site} refused "
                                                  f"({problem}); its weights are checked as usual", fire_event=False)
                else:
                    self._uploads[site] = {k: np.asarray(v, np.float32) for k, v in uploaded.items()}
            self._weights[site] = float((result.meta or {}).get(META_NUM_STEPS, 1.0) or 1.0)
        accepted = super()._aggregate_one_result(result)
        if accepted:
            self._last_round[site] = int(self.current_round)
        else:
            self._uploads.pop(site, None)
            self._weights.pop(site, None)
        return accepted

    def _check_upload(self, uploaded: dict[str, Any]) -> str | None:
        assert self.xi_hat is not None
        if set(uploaded) != set(self.xi_hat):
            return f"keys differ from the target's: {sorted(set(uploaded) ^ set(self.xi_hat))[:3]}"
        for k, v in uploaded.items():
            a = np.asarray(v)
            if a.shape != self.xi_hat[k].shape:
                return f"{k}: shape {a.shape}, expected {self.xi_hat[k].shape}"
            if not np.issubdtype(a.dtype, np.floating) or not np.isfinite(a).all():
                return f"{k}: non-finite or non-float values"
        return None

    def update_model(self, model: FLModel, aggregate_results: FLModel) -> FLModel:
        """FedAvg's update; then (PTNU) the next predicted target, corrected by DP uploads."""
        from fl_plugins.core.ptnu import corrected_target, predict_target, relative_distance

        new = super().update_model(model, aggregate_results)
        rnd = int(self.current_round)
        self._log_comm(rnd)
        if not self.ptnu or self.xi_hat is None or self._theta is None:
            return new
        theta_next = self._theta_of({k: v for k, v in new.params.items() if not k.startswith("target.")})
        predicted = predict_target(self.xi_hat, self._theta, theta_next, self.target_momentum, self.local_steps)
        uploads = {s: u for s, u in self._uploads.items() if s in self._weights}
        if uploads and self.dp:
            self.xi_hat = corrected_target(predicted, uploads, self._weights)
            self._correction = True
        else:
            self.xi_hat = predicted
        if uploads and not self.dp:  # PTNU alone: how far the prediction is from the sites' true targets
            w = {s: self._weights[s] for s in uploads}
            mean = corrected_target(predicted, uploads, w)  # every weight uploaded: the weighted mean
            self.log_server_scalar("ptnu/prediction_error", relative_distance(mean, predicted), rnd)
        self.log_server_scalar("ptnu/target_uploads", len(uploads), rnd)
        return new

    # -- resume (fl_plugins.flare.resume) ---------------------------------------------------------------------------
    def resume_state(self) -> dict[str, Any]:
        """The predicted target (every site is resynchronised in the first resumed round), whether the next round
        sends a DP correction, and the byte accounting so far (the summary covers the whole run)."""
        return {"xi_hat": self.xi_hat, "correction": self._correction, "comm": self.comm}

    def restore_resume_state(self, extra: dict[str, Any]) -> None:
        self.xi_hat = extra.get("xi_hat")
        self._correction = bool(extra.get("correction", False))
        self.comm = list(extra.get("comm") or [])

    # -- accounting ----------------------------------------------------------------------------------------------
    def _log_comm(self, rnd: int) -> None:
        if not self.comm or self.comm[-1]["round"] != rnd:
            return
        entry = self.comm[-1]
        for direction in ("up", "down"):
            sites = entry[direction]
            for part in PARTS:
                if sites:
                    self.log_server_scalar(f"comm/{direction}_{part}",
                                           sum(b[part] for b in sites.values()) / len(sites), rnd)
        entry["target_uploads"] = sorted(s for s, b in entry["up"].items() if b["target"])

    def communication_summary(self) -> dict[str, Any]:
        """Totals and per-site-round means of the bytes each way per part, and the target-upload fraction."""
        site_rounds_up = [b for e in self.comm for b in e["up"].values()]
        site_rounds_down = [b for e in self.comm for b in e["down"].values()]

        def mean(rows: list[dict[str, int]]) -> dict[str, float]:
            return {p: (sum(r[p] for r in rows) / len(rows) if rows else 0.0) for p in PARTS}

        up, down = mean(site_rounds_up), mean(site_rounds_down)
        return {
            "mode": "fclopt+ptnu+dp" if self.dp else ("fclopt+ptnu" if self.ptnu else "fclopt"),
            "bytes_per_site_per_round": {"up": up, "down": down, "total": sum(up.values()) + sum(down.values())},
            "target_upload_fraction": (sum(1 for r in site_rounds_up if r["target"]) / len(site_rounds_up)
                                       if site_rounds_up else 0.0),
            "site_rounds": len(site_rounds_up),
            "rounds": self.comm,
        }

    def run(self) -> None:
        super().run()
        app_root = self.fl_ctx.get_prop(FLContextKey.APP_ROOT) or "."
        summary = self.communication_summary()
        atomic_write_text(json.dumps(summary, indent=1), os.path.join(app_root, COMM_FILE))
        self.info(f"communication per site per round (bytes): {json.dumps(summary['bytes_per_site_per_round'])}; "
                  f"target uploads in {summary['target_upload_fraction']:.0%} of site-rounds")
