"""FCLOpt on one site (FLModel in, FLModel out): BYOL-style training on structural positives, with the target network
averaged (``target_mode="fedavg"``) or predicted by PTNU and, with a DP threshold, uploaded only when it strays.

Reconstructed from the paper's abstract (methods-spec 7.8 [R]); the choices, as implemented:

* **FCLOpt** (``fedavg``): the task carries online ``encoder.*`` + ``projector.*`` (theta), ``predictor.*`` (phi) and
  the target ``target.*`` (xi); the site answers with all three; FedAvg averages all three.
* **PTNU** (``ptnu``): the task carries theta and phi only. The site holds the predicted target ``xi_hat`` and the
  previous round's global theta, and computes ``xi_hat^r = predict_target(xi_hat^{r-1}, theta^{r-1}, theta^r, m, T)``
  (:mod:`fl_plugins.core.ptnu`; ``T`` = ``steps_per_round``), exactly as the server does, and trains from it. In
  round 0 ``xi_hat^0`` = a copy of the received theta (every party builds the same initial target). A task that
  carries ``target.*`` (the server's resynchronisation of a site that missed a round or joins late, or its DP
  correction) replaces ``xi_hat``. A site asked for round r without the round r - 1 state and without a target
  refuses the task with a message (the server never does this). The state lives in the site's job workspace
  (:data:`PTNU_STATE_FILE`, atomic), so a restarted site continues. Without DP the site still uploads its true
  target each round: the server measures how far its prediction is from their average (the quantity DP acts on)
  but keeps the prediction, so no party's target ever differs.
* **DP** (``dp_threshold`` = delta >= 0): after training, ``xi_tilde`` = the prediction with the site's own final
  theta in place of the next global one; the site uploads its true target only when
  ``||xi - xi_tilde|| / ||xi|| > delta`` (meta ``dp_distance``, ``target_uploaded``). The server then corrects its
  prediction with the uploads and sends the corrected target to every site with the next round's task.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fl_plugins.core.schedules import step_horizon
from fl_plugins.flare.handler import MethodHandler, SiteContext, to_numpy, to_torch
from fl_plugins.flare.ssl_handler import site_seed
from fl_plugins.wire import META_DP_DISTANCE, META_NUM_STEPS, META_TARGET_UPLOADED

__all__ = ["FCLOptHandler", "PTNU_STATE_FILE", "check_dp_threshold"]

#: the site's PTNU state (``{"round", "xi_hat", "theta"}``), written atomically each round in the site's job workspace,
#: read when the handler starts again within the job (a restarted site; the simulator's swapped-out clients)
PTNU_STATE_FILE = "fclopt_ptnu_state.pt"

logger = logging.getLogger(__name__)


def check_dp_threshold(delta: Any, name: str = "dp_threshold") -> float | None:
    """``delta`` as a float >= 0, or None (DP off); anything else is refused naming ``name``."""
    if delta is None:
        return None
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not delta >= 0:
        raise ValueError(f"{name} must be a number >= 0 (or null: DP off), got {delta!r}")
    return float(delta)


class FCLOptHandler(MethodHandler):
    """FCLOpt / FCLOpt + PTNU (+ DP) on one site (see the module docstring).

    Args:
        site: where the handler runs.
        config: :class:`~fl_plugins.methods.fclopt.FCLOptConfig` fields (``total_steps`` None = the job's horizon).
        steps_per_round: local steps ``T`` per round (PTNU's ``T``: the server uses the same value).
        total_rounds: FL rounds.
        dp_threshold: DP's delta (None = off; needs ``target_mode="ptnu"``).
    """

    LOSS_META_KEY = "ssl_loss"

    def __init__(self, site: SiteContext, config: dict[str, Any], steps_per_round: int = 10, total_rounds: int = 1,
                 dp_threshold: float | None = None) -> None:
        from fl_plugins.data import load_datalist, validate_datalist
        from fl_plugins.engine.train_loop import build_optimizer
        from fl_plugins.flare.fcl_handler import partition_loader
        from fl_plugins.methods import build

        if isinstance(steps_per_round, bool) or not isinstance(steps_per_round, int) or steps_per_round < 1:
            raise ValueError(f"steps_per_round must be an int >= 1, got {steps_per_round!r}")
        self.dp_threshold = check_dp_threshold(dp_threshold)
        self.site = site
        cfg = dict(config)
        if cfg.get("total_steps") is None:
            cfg["total_steps"] = step_horizon(steps_per_round, total_rounds)
        self.method = build("fclopt", cfg)  # the job's seed: the server's initial model
        mcfg = self.method.config
        self.ptnu = mcfg.target_mode == "ptnu"
        if self.dp_threshold is not None and not self.ptnu:
            raise ValueError("dp_threshold needs fclopt.target_mode='ptnu' (DP decides uploads of a predicted target)")
        self.seed = site_seed(int(mcfg.seed), site.site_name)
        dl = load_datalist(site.datalist_path)
        validate_datalist(dl, sections=("training",), deep=True)
        self.train_set, self.loader = partition_loader(dl, site, mcfg.image_size, mcfg.num_partitions,
                                                       mcfg.volumes_per_batch, self.seed, "fclopt")
        self.optimizer = build_optimizer(self.method)
        self.steps_per_round = steps_per_round
        self.num_train_items = len(self.train_set)
        self._xi_hat: dict[str, np.ndarray] | None = None  # the predicted target (target.* keys), float32
        self._theta: dict[str, np.ndarray] | None = None  # this round's global theta (target.* keys), float32
        self._last_round: int | None = None
        self._tkeys = self.method.target_keys()
        self.state_path = Path(site.workspace_dir) / PTNU_STATE_FILE
        if self.ptnu and self.state_path.is_file():  # a restarted site (or the simulator's swapped-out client)
            from fl_plugins.engine.checkpoint import load_arrays

            st = load_arrays(self.state_path)
            self._xi_hat, self._theta, self._last_round = st["xi_hat"], st["theta"], int(st["round"])
            logger.info("site %s: PTNU state of round %d restored from %s", site.site_name, self._last_round,
                        self.state_path)

    def _as_target_keys(self, params: dict[str, Any]) -> dict[str, np.ndarray]:
        """theta (``encoder.*``, ``projector.*``) under the target's keys, float32."""
        return {t: np.asarray(params[t[len("target."):]], dtype=np.float32) for t in self._tkeys}

    def load_global(self, model: FLModel) -> None:
        """Load theta and phi (and, FCLOpt, xi); PTNU: set the target to the predicted ``xi_hat`` of this round."""
        from fl_plugins.core.ptnu import predict_target

        params = dict(model.params or {})
        rnd = int(model.current_round or 0)
        if not self.ptnu:
            self.method.load_federated_state_dict(to_torch(params))
            return
        given = {k: params.pop(k) for k in list(params) if k.startswith("target.")}
        self.method.load_federated_state_dict(to_torch(params))
        theta = self._as_target_keys(params)
        if given:
            missing = sorted(set(self._tkeys) - set(given))
            if missing:
                raise ValueError(f"site {self.site.site_name}, round {rnd}: the task's target lacks {missing[:3]}")
            xi = {k: np.asarray(given[k], dtype=np.float32) for k in self._tkeys}
        elif self._xi_hat is None and rnd == 0:
            xi = {k: v.copy() for k, v in theta.items()}  # every party's initial target: a copy of theta^0
        elif self._last_round == rnd - 1 and self._xi_hat is not None and self._theta is not None:
            xi = predict_target(self._xi_hat, self._theta, theta, self.method.config.target_momentum,
                                self.steps_per_round)
        else:
            raise ValueError(f"site {self.site.site_name}: the task of round {rnd} carries no target and this site "
                             f"cannot predict it (its last round was {self._last_round}); the server must send the "
                             "target to a site that missed a round")
        self.method.load_target_state(to_torch(xi))
        self._xi_hat, self._theta, self._last_round = xi, theta, rnd
        from fl_plugins.engine.checkpoint import save_arrays

        save_arrays({"round": rnd, "xi_hat": xi, "theta": theta}, self.state_path)

    def local_train(self, global_step: int) -> dict[str, float]:
        from fl_plugins.engine.train_loop import run_local_steps

        rng = torch.Generator().manual_seed((self.seed * 1_000_003 + global_step) % (2**63))
        return run_local_steps(self.method, self.loader, self.optimizer, self.steps_per_round, global_step, rng=rng)

    def train(self, model: FLModel) -> FLModel:
        from fl_plugins.core.ptnu import predict_target, relative_distance, should_upload

        rnd = int(model.current_round or 0)
        t0 = time.perf_counter()
        self.load_global(model)
        stats = self.local_train(rnd * self.steps_per_round)
        params = self.federated_params()
        meta: dict[str, Any] = {META_NUM_STEPS: self.num_train_items, self.LOSS_META_KEY: float(stats["loss"])}
        if self.ptnu:
            xi = to_numpy(self.method.target_state())
            upload = True
            if self.dp_threshold is not None:
                assert self._xi_hat is not None and self._theta is not None
                xi_tilde = predict_target(self._xi_hat, self._theta, self._as_target_keys(params),
                                          self.method.config.target_momentum, self.steps_per_round)
                d = relative_distance(xi, xi_tilde)
                upload = should_upload(d, self.dp_threshold)
                meta[META_DP_DISTANCE] = d
                self.site.log_scalar("fclopt/dp_distance", d, rnd)
            if upload:
                params.update(xi)
            meta[META_TARGET_UPLOADED] = upload
        self.log_stats({k: v for k, v in stats.items() if k != "loss"}, rnd, prefix="fclopt/")
        self.site.log_scalar(self.LOSS_META_KEY, float(stats["loss"]), rnd)
        self.site.log_scalar("round_seconds", time.perf_counter() - t0, rnd)
        return FLModel(params=params, params_type=ParamsType.FULL, metrics={}, meta=meta)
