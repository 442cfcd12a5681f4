"""FCL on one site: the task handler (FLModel in, FLModel out) of federated contrastive learning with feature exchange.

Tasks (:attr:`FCLHandler.TASKS`):

* ``extract_features`` (the round's global weights in): the site loads them (its momentum encoder restarts as their
  copy), computes the momentum features of its training slices (its *local bank* for the round) and answers with
  what it shares: at most ``max_features`` of them (a uniform random
  subset, redrawn each round), optionally with Gaussian noise of standard deviation ``feature_noise_std`` per
  coordinate added and the vectors re-normalised, cast to ``feature_dtype``, and their partition ids::

      params {"feat": float16/float32 [M, D_f], "part": int32 [M]},  meta {"shares_features": bool}

  No image, no volume or slice id, no site name in the payload (FLARE adds the site's name to every result).
  With ``share_features=False`` the answer is empty (``M = 0``) and the site gets no other site's features either
  (it trains on the local terms only). A site tightens the job's settings for itself in its datalist
  (:func:`site_policy`: ``"feature_sharing": {"share": false}``, or a lower ``max_features``, more noise, float16).
* ``train``: carries no weights when the site received them with this round's ``extract_features`` (the server
  knows who answered), else the global weights (loaded as above: ``exchange`` off -- the no-exchange baseline -- or
  a site whose extraction failed); a weightless task for a round whose model the site does not hold is refused.
  The site sets the round's memory bank = its local bank (all its slices, float32, no noise; computed now if no
  extraction came, with the same freshly reset momentum encoder, so both variants contrast against features of the
  round's global model) + the other sites' features from the task's ``meta`` (``remote_feat``, ``remote_part``),
  runs ``steps_per_round`` steps of :class:`~fl_plugins.methods.fcl.FCLMethod` and answers with the federated
  state.

Every site extracts with the same model (the round's global one), so local and remote features share one feature
space: features extracted before the model arrives would come from each site's last local model, and the remote
ones would be unrelated to the queries (a remote term stuck at ``log K``, seen in a first ACDC run).
* ``validate`` / ``submit_model``: as every handler (no monitor metric: a k-NN on the slice partition would score
  exactly the label FCL trains on, small-scale-ssl.md).

Seeds: the model is built with the job's seed (every site starts from the server's initial model); batches,
augmentations, negative sampling and the shared subset use the site's seed (:func:`~fl_plugins.flare.ssl_handler.
site_seed`) and the round.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fl_plugins.core.schedules import step_horizon
from fl_plugins.flare.handler import MethodHandler, SiteContext
from fl_plugins.flare.ssl_handler import site_seed
from fl_plugins.wire import (
    FEAT_KEY,
    META_NUM_STEPS,
    META_REMOTE_FEAT,
    META_REMOTE_PART,
    META_SHARES_FEATURES,
    PART_KEY,
    TASK_EXTRACT_FEATURES,
    TASK_SUBMIT_MODEL,
    TASK_TRAIN,
    TASK_VALIDATE,
)

__all__ = ["FCLHandler", "FEATURE_DTYPES", "ROUND_MODEL_FILE", "partition_loader", "site_policy"]

#: the round's global model received with ``extract_features`` (``{"round", "params"}``), in the site's job workspace:
#: the round's ``train`` task carries no weights, and a handler started again within the round (a restarted site,
#: the simulator's swapped-out clients) takes them from here
ROUND_MODEL_FILE = "fcl_round_model.pt"

logger = logging.getLogger(__name__)

FEATURE_DTYPES = {"float32": np.float32, "float16": np.float16}


def site_policy(policy: Any, share: bool, max_features: int, noise_std: float, dtype: str, where: str
                ) -> tuple[bool, int, float, str]:
    """The job's sharing settings tightened by the site's own ``"feature_sharing"`` entry of its datalist
    (``{"share": false, "max_features": 256, "noise_std": 0.05, "dtype": "float16"}``, every key optional): a site
    can share less, fewer, noisier, coarser features than the job asks, never more."""
    if policy is None:
        return share, max_features, noise_std, dtype
    known = {"share", "max_features", "noise_std", "dtype"}
    if not isinstance(policy, dict) or set(policy) - known:
        raise ValueError(f"datalist {where}: 'feature_sharing' must be a dict with keys among {sorted(known)}, got "
                         f"{policy!r}")
    if not isinstance(policy.get("share", True), bool):
        raise ValueError(f"datalist {where}: feature_sharing.share must be true or false, got {policy['share']!r}")
    mf = policy.get("max_features", max_features)
    if isinstance(mf, bool) or not isinstance(mf, int) or mf < 1:
        raise ValueError(f"datalist {where}: feature_sharing.max_features must be an int >= 1, got {mf!r}")
    ns = policy.get("noise_std", noise_std)
    if isinstance(ns, bool) or not isinstance(ns, (int, float)) or not ns >= 0:
        raise ValueError(f"datalist {where}: feature_sharing.noise_std must be a number >= 0, got {ns!r}")
    dt = policy.get("dtype", dtype)
    if dt not in FEATURE_DTYPES:
        raise ValueError(f"datalist {where}: feature_sharing.dtype must be one of {sorted(FEATURE_DTYPES)}, got {dt!r}")
    return (share and policy.get("share", True), min(max_features, mf), max(noise_std, float(ns)),
            "float16" if "float16" in (dtype, dt) else "float32")


class _Batches:
    """Endless ``{"image", "part", "vol"}`` batches from :class:`~fl_plugins.data.partition.PartitionBatches`."""

    def __init__(self, dataset: Any, sampler: Any, vol: list[int], part: list[int]) -> None:
        self.dataset, self.sampler = dataset, sampler
        self.vol, self.part = torch.tensor(vol), torch.tensor(part)

    def __iter__(self) -> _Batches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        idx = next(self.sampler)
        images = torch.stack([torch.as_tensor(self.dataset[i]["image"]) for i in idx])
        t = torch.tensor(idx)
        return {"image": images, "part": self.part[t], "vol": self.vol[t]}


def partition_loader(dl: dict[str, Any], site: SiteContext, image_size: int, num_partitions: int,
                     volumes_per_batch: int, seed: int, method: str) -> tuple[Any, _Batches]:
    """Every training slice of the site's volumes (labels never read) and the endless ``{"image", "part", "vol"}``
    batches of ``volumes_per_batch`` volumes x one slice per partition (:class:`~fl_plugins.data.partition.
    PartitionBatches`, drawn from ``seed``). Shared by the contrastive methods (``fcl``, ``fclopt``).

    Raises:
        ValueError: not slices of volumes (the message names the datalist and its format), no volume, or none with a
            slice in every partition.
    """
    from fl_plugins.data import PartitionBatches, build_dataset, slice_partitions
    from fl_plugins.data.decathlon import SliceDataset

    train = build_dataset(dl, dl["training"], image_size=image_size, with_labels=False)
    if not isinstance(train, SliceDataset):
        raise ValueError(f"datalist {site.datalist_path}: {method} trains on slices of volumes (a Decathlon datalist of "
                         f"NIfTI volumes, 2D mode), got {type(train).__name__} items (format "
                         f"{dl.get('format')!r}{', volumes: true' if dl.get('volumes') else ''})")
    vol, part, ids = slice_partitions(train, num_partitions)
    g = torch.Generator().manual_seed(seed)
    sampler = PartitionBatches(vol, part, ids, num_partitions, volumes_per_batch, g,
                               where=f"site {site.site_name} ({site.datalist_path})")
    if sampler.skipped:
        logger.warning("site %s: %d volume(s) with fewer slices than %s.num_partitions=%d left out of the batches: %s",
                       site.site_name, len(sampler.skipped), method, num_partitions, sampler.skipped[:5])
    return train, _Batches(train, sampler, vol, part)


class FCLHandler(MethodHandler):
    """Federated contrastive learning with feature exchange on one site (see the module docstring).

    Args:
        site: where the handler runs.
        config: :class:`~fl_plugins.methods.fcl.FCLConfig` fields (``total_steps`` None = ``steps_per_round *
            total_rounds``).
        steps_per_round: local steps per round (>= 1).
        total_rounds: FL rounds.
        share_features: answer ``extract_features`` with features (False: an empty answer, local terms only).
        max_features: bound on the features shared per round (>= 1).
        feature_noise_std: standard deviation of the Gaussian noise added to each shared coordinate (>= 0; the
            vectors are re-normalised after it).
        feature_dtype: ``"float32"`` or ``"float16"`` on the wire.
    """

    TASKS = (TASK_TRAIN, TASK_VALIDATE, TASK_SUBMIT_MODEL, TASK_EXTRACT_FEATURES)
    LOSS_META_KEY = "ssl_loss"

    def __init__(
        self,
        site: SiteContext,
        config: dict[str, Any],
        steps_per_round: int = 10,
        total_rounds: int = 1,
        share_features: bool = True,
        max_features: int = 1024,
        feature_noise_std: float = 0.0,
        feature_dtype: str = "float32",
    ) -> None:
        from fl_plugins.data import load_datalist, validate_datalist
        from fl_plugins.engine.train_loop import build_optimizer
        from fl_plugins.methods import build

        if isinstance(steps_per_round, bool) or not isinstance(steps_per_round, int) or steps_per_round < 1:
            raise ValueError(f"steps_per_round must be an int >= 1, got {steps_per_round!r}")
        if not isinstance(share_features, bool):
            raise ValueError(f"share_features must be true or false, got {share_features!r}")
        if isinstance(max_features, bool) or not isinstance(max_features, int) or max_features < 1:
            raise ValueError(f"max_features must be an int >= 1 (the bound on features shared per round), got "
                             f"{max_features!r}")
        if not isinstance(feature_noise_std, (int, float)) or not feature_noise_std >= 0:
            raise ValueError(f"feature_noise_std must be a number >= 0, got {feature_noise_std!r}")
        if feature_dtype not in FEATURE_DTYPES:
            raise ValueError(f"feature_dtype must be one of {sorted(FEATURE_DTYPES)}, got {feature_dtype!r}")
        self.site = site
        cfg = dict(config)
        if cfg.get("total_steps") is None:
            cfg["total_steps"] = step_horizon(steps_per_round, total_rounds)
        self.method = build("fcl", cfg)  # the job's seed: the same initial model as the server's
        mcfg = self.method.config
        self.seed = site_seed(int(mcfg.seed), site.site_name)
        dl = load_datalist(site.datalist_path)
        validate_datalist(dl, sections=("training",), deep=True)
        share_features, max_features, feature_noise_std, feature_dtype = site_policy(
            dl.get("feature_sharing"), share_features, max_features, float(feature_noise_std), feature_dtype,
            site.datalist_path)
        self.train_set, self.loader = partition_loader(dl, site, mcfg.image_size, mcfg.num_partitions,
                                                       mcfg.volumes_per_batch, self.seed, "fcl")
        self.part = self.loader.part
        self.optimizer = build_optimizer(self.method)
        self.steps_per_round = steps_per_round
        self.num_train_items = len(self.train_set)
        self.share_features = share_features
        self.max_features = max_features
        self.feature_noise_std = float(feature_noise_std)
        self.feature_dtype = feature_dtype
        self._local_bank: tuple[int, torch.Tensor] | None = None  # (round, features [N, D_f]) of every local slice
        self._loaded_round: int | None = None  # the round whose global model the method holds
        self.round_model_path = Path(site.workspace_dir) / ROUND_MODEL_FILE
        sampler = self.loader.sampler
        logger.info("site %s: fcl, %d slices (%d volumes in batches of %d), sharing %s", site.site_name,
                    len(self.train_set), len(sampler.slots), sampler.batch_size,
                    f"<= {max_features} {feature_dtype} features per round" if share_features else "nothing")

    # -- the local bank --------------------------------------------------------------------------------------------
    def local_features(self) -> torch.Tensor:
        """Momentum features ``[N, D_f]`` of every training slice, in dataset order."""
        images = torch.stack([torch.as_tensor(self.train_set[i]["image"]) for i in range(len(self.train_set))])
        g = torch.Generator().manual_seed(self.seed + 104_729)  # the same chunks every round
        return self.method.bank_features(images, g, chunk=self.loader.sampler.batch_size)

    def _bank_for(self, rnd: int) -> torch.Tensor:
        if self._local_bank is None or self._local_bank[0] != rnd:
            self._local_bank = (rnd, self.local_features())
        return self._local_bank[1]

    def shared_features(self, feat: torch.Tensor, rnd: int) -> tuple[np.ndarray, np.ndarray]:
        """What leaves the site: ``(feat [M, D_f] feature_dtype, part [M] int32)``, ``M <= max_features``."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + 7919 * rnd + 1) % (2**63))
        n = feat.shape[0]
        idx = torch.randperm(n, generator=g)[:self.max_features].sort().values
        out = feat[idx]
        if self.feature_noise_std > 0:
            out = torch.nn.functional.normalize(out + self.feature_noise_std * torch.randn(out.shape, generator=g),
                                                dim=1)
        return (out.cpu().numpy().astype(FEATURE_DTYPES[self.feature_dtype]),
                self.part[idx].numpy().astype(np.int32))

    # -- tasks -------------------------------------------------------------------------------------------------------
    def extract_features(self, model: FLModel) -> FLModel:
        import time

        from fl_plugins.engine.checkpoint import save_arrays

        t0 = time.perf_counter()
        rnd = int(model.current_round or 0)
        self.load_global(model)  # the round's global model; the momentum encoder restarts as its copy
        self._loaded_round = rnd
        self._local_bank = None
        # the train task of this round carries no weights: keep them where a restarted handler finds them
        save_arrays({"round": rnd, "params": dict(model.params)}, self.round_model_path)
        dim = self.method.config.proj_dim
        if not self.share_features:
            self._bank_for(rnd)
            return FLModel(params={FEAT_KEY: np.zeros((0, dim), FEATURE_DTYPES[self.feature_dtype]),
                                   PART_KEY: np.zeros((0,), np.int32)},
                           params_type=ParamsType.FULL, meta={META_SHARES_FEATURES: False})
        feat, part = self.shared_features(self._bank_for(rnd), rnd)
        self.site.log_scalar("fcl/features_shared", float(feat.shape[0]), rnd)
        self.site.log_scalar("fcl/extract_compute_seconds", time.perf_counter() - t0, rnd)
        return FLModel(params={FEAT_KEY: feat, PART_KEY: part}, params_type=ParamsType.FULL,
                       meta={META_SHARES_FEATURES: True})

    def remote_bank(self, model: FLModel) -> tuple[torch.Tensor, torch.Tensor]:
        """The other sites' features ``[R, D_f]`` float32 and partitions ``[R]`` from the train task's meta (checked:
        shapes, dimension, finite, partition range; a bad payload is refused with a message, the site then trains
        on its local terms)."""
        meta = model.meta or {}
        dim, s = self.method.config.proj_dim, self.method.config.num_partitions
        feat, part = meta.get(META_REMOTE_FEAT), meta.get(META_REMOTE_PART)
        empty = (torch.zeros(0, dim), torch.zeros(0, dtype=torch.long))
        if feat is None or part is None or not self.share_features:
            return empty
        f, p = np.asarray(feat), np.asarray(part)
        problem = None
        if f.ndim != 2 or f.shape[1] != dim or p.shape != (f.shape[0],):
            problem = f"shapes feat {f.shape} / part {p.shape}, expected [R, {dim}] / [R]"
        elif not np.issubdtype(f.dtype, np.floating) or not np.isfinite(f).all():
            problem = f"non-finite or non-float features ({f.dtype})"
        elif p.size and (p.min() < 0 or p.max() >= s or not np.issubdtype(p.dtype, np.integer)):
            problem = f"partition ids outside [0, {s})"
        if problem:
            logger.error("site %s, round %s: remote features refused (%s); training on local terms this round",
                         self.site.site_name, model.current_round, problem)
            return empty
        return torch.nn.functional.normalize(torch.as_tensor(f, dtype=torch.float32), dim=1), torch.as_tensor(p).long()

    def train(self, model: FLModel) -> FLModel:
        import time

        from fl_plugins.engine.checkpoint import load_arrays
        from fl_plugins.engine.train_loop import run_local_steps

        rnd = int(model.current_round or 0)
        t0 = time.perf_counter()
        if not model.params and self._loaded_round != rnd and self.round_model_path.is_file():
            saved = load_arrays(self.round_model_path)
            if int(saved["round"]) == rnd:  # a restarted handler (or the simulator's swapped-out client)
                model = FLModel(params=saved["params"], params_type=ParamsType.FULL, current_round=rnd,
                                meta=model.meta)
        if model.params:
            self.load_global(model)  # the momentum encoder restarts as its copy
            self._loaded_round = rnd
        elif self._loaded_round != rnd:
            raise ValueError(f"site {self.site.site_name}: the train task of round {rnd} carries no weights, but this "
                             f"site did not receive round {rnd}'s global model with extract_features (last: "
                             f"{self._loaded_round})")
        local = self._bank_for(rnd)  # features of the round's global model (computed at extraction, or now)
        rf, rp = self.remote_bank(model)
        self.method.set_bank(torch.cat([local, rf]), torch.cat([self.part, rp]),
                             torch.cat([torch.zeros(len(local), dtype=torch.bool), torch.ones(len(rf), dtype=torch.bool)]))
        rng = torch.Generator().manual_seed((self.seed * 1_000_003 + rnd * self.steps_per_round) % (2**63))
        stats = run_local_steps(self.method, self.loader, self.optimizer, self.steps_per_round,
                                rnd * self.steps_per_round, rng=rng)
        stats["remote_features"] = float(len(rf))
        self.log_stats({k: v for k, v in stats.items() if k != "loss"}, rnd, prefix="fcl/")
        self.site.log_scalar(self.LOSS_META_KEY, float(stats["loss"]), rnd)
        self.site.log_scalar("round_seconds", time.perf_counter() - t0, rnd)
        return FLModel(params=self.federated_params(), params_type=ParamsType.FULL, metrics={},
                       meta={META_NUM_STEPS: self.num_train_items, self.LOSS_META_KEY: float(stats["loss"]),
                             "loss_local": float(stats["loss_local"]), "loss_remote": float(stats["loss_remote"])})
