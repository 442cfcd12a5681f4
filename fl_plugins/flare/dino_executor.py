"""Federated DINO / DINOv2 pretraining on a site's unlabelled images: the pure task handler and its executor.

What crosses the wire is exactly ``DINOMethod.federated_state_dict()`` for the configured federation mode
(A: student + teacher + centres; B: student; C: teacher — see :mod:`fl_plugins.methods.dino`). Kept on the site
between rounds: the optimizer (AdamW moments) and the mode's site-persistent state. Rebuilt each round: the data
loader and augmentation streams. Schedules (LR, WD, teacher momentum and temperature, last-layer freeze, iBOT
masks) are pure functions of the server-owned global step ``round * steps_per_round``.

Monitor: every ``knn_every`` rounds a weighted k-NN (k=20, T=0.07; methods-spec 8.2) on the *received* global
teacher backbone's CLS features. Labels need no annotation: for volumes the label of a slice is its position
partition (4 contiguous groups of slices, the FCL/GCL partition of methods-spec 7.2), for 2D image datasets the
image class. Memory bank = the site's training images, queries = its validation images.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from typing import Any

import numpy as np
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from torch.utils.data import DataLoader

from fl_plugins.flare.executor import HandlerExecutor
from fl_plugins.flare.handler import SiteContext

__all__ = ["DinoHandler", "DinoExecutor", "position_partition", "MODE_EXCLUDE_REGEX"]

logger = logging.getLogger(__name__)

NUM_STEPS_KEY = "NUM_STEPS_CURRENT_ROUND"

#: Global-model keys that are not federated in each mode (the server persistor neither stores nor sends them).
MODE_EXCLUDE_REGEX = {"A": None, "B": r"^(teacher\.|buffers\.)", "C": r"^(student\.|buffers\.)"}


def position_partition(slice_index: int, num_slices: int, num_partitions: int = 4) -> int:
    """Partition id of a slice: ``min(i // round_half_up(D / S), S - 1)`` (methods-spec 7.2, S = 4)."""
    part = max(1, int(math.floor(num_slices / num_partitions + 0.5)))
    return min(slice_index // part, num_partitions - 1)


def _knn_items(dataset: Any, max_items: int, seed: int) -> list[dict]:
    n = len(dataset)
    idx = np.random.default_rng(seed).permutation(n)[: min(n, max_items)]
    out = []
    for i in sorted(idx.tolist()):
        it = dataset[i]
        if "slice_index" in it:
            label = position_partition(int(it["slice_index"]), int(it["num_slices"]))
        else:
            label = int(it["label"])
        out.append({"image": it["image"], "label": label})
    return out


class DinoHandler:
    """Pure task logic of federated DINO/DINOv2 on one site (FLModel in, FLModel out)."""

    def __init__(
        self,
        site: SiteContext,
        dino: dict[str, Any],
        steps_per_round: int = 10,
        total_rounds: int = 1,
        knn_every: int = 1,
        knn_max_items: int = 512,
        num_workers: int = 0,
        views: dict[str, Any] | None = None,
    ) -> None:
        from fl_plugins.data import build_dataset, load_datalist, validate_datalist
        from fl_plugins.data.views import MultiCropDataset, MultiCropTransform, multicrop_collate
        from fl_plugins.engine.ssl_train import build_optimizer
        from fl_plugins.methods.dino import DINOConfig, DINOMethod

        if steps_per_round < 1:
            raise ValueError(f"steps_per_round must be >= 1, got {steps_per_round}")
        if knn_every < 0:
            raise ValueError(f"knn_every must be >= 0 (0 = off), got {knn_every}")
        self.site = site
        cfg = dict(dino)
        if cfg.get("total_steps") is None:
            cfg["total_steps"] = steps_per_round * max(1, total_rounds)
        # Sites draw different augmentations and iBOT masks: the site name is mixed into the seed (the server's
        # copy of the config keeps the job's seed; the seed is never on the wire).
        cfg["seed"] = int(cfg.get("seed", 0)) + zlib.crc32(site.site_name.encode()) % 100_000
        self.config = DINOConfig.from_dict(cfg)
        dl = load_datalist(site.datalist_path)
        validate_datalist(dl, sections=("training",), deep=True)
        img = self.config.backbone.img_size
        # SSL uses every training image, labelled or not; labels are never read
        train = build_dataset(dl, dl["training"], image_size=img, with_labels=False)
        if len(train) < self.config.batch_size:
            raise ValueError(
                f"site {site.site_name}: {len(train)} training images in {site.datalist_path} < batch_size="
                f"{self.config.batch_size}"
            )
        crops = self.config.training_views(views)
        g = torch.Generator().manual_seed(self.config.seed)
        self.loader = DataLoader(
            MultiCropDataset(train, MultiCropTransform(crops)), batch_size=self.config.batch_size, shuffle=True,
            drop_last=True, collate_fn=multicrop_collate, num_workers=num_workers, generator=g,
        )
        torch.manual_seed(self.config.seed)
        self.method = DINOMethod(self.config)
        self.optimizer = build_optimizer(self.method)  # site-persistent: AdamW moments survive rounds
        self.steps_per_round = steps_per_round
        self.num_train_items = len(train)
        self.knn_every = knn_every
        self.knn_train: list[dict] = []
        self.knn_val: list[dict] = []
        if knn_every and dl.get("validation"):
            val = build_dataset(dl, dl["validation"], image_size=img, with_labels=dl["format"] == "medmnist")
            self.knn_train = _knn_items(train if dl["format"] != "medmnist" else
                                        build_dataset(dl, [e for e in dl["training"] if "label" in e],
                                                      image_size=img, with_labels=True), knn_max_items, 0)
            self.knn_val = _knn_items(val, knn_max_items, 1)
        logger.info("site %s: %d unlabelled training images, k-NN monitor %s", site.site_name, len(train),
                    f"{len(self.knn_train)}/{len(self.knn_val)} items" if self.knn_val else "off")

    def tasks(self) -> dict:
        return {"train": self.train, "validate": self.validate, "submit_model": self.submit_model}

    def _knn(self) -> dict[str, float]:
        from fl_plugins.engine.knn import knn_accuracy

        if not self.knn_val:
            return {}
        self.method.eval()
        with torch.no_grad():
            acc = knn_accuracy(self.method.teacher["backbone"], self.knn_train, self.knn_val)
        return {"knn_accuracy": float(acc)}

    def _load_global(self, model: FLModel) -> None:
        self.method.load_federated_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in model.params.items()})

    def train(self, model: FLModel) -> FLModel:
        from fl_plugins.engine.ssl_train import run_local_steps

        rnd = int(model.current_round or 0)
        t0 = time.perf_counter()
        self._load_global(model)
        metrics: dict[str, float] = {}
        if self.knn_every and rnd % self.knn_every == 0:
            metrics = self._knn()
        stats = run_local_steps(self.method, self.loader, self.optimizer, self.steps_per_round,
                                global_step=rnd * self.steps_per_round)
        for k, v in {**metrics, **{f"ssl/{k}": v for k, v in stats.items() if isinstance(v, (int, float))}}.items():
            self.site.log_scalar(k, float(v), rnd)
        self.site.log_scalar("round_seconds", time.perf_counter() - t0, rnd)
        return FLModel(
            params={k: v.detach().cpu().numpy().astype(np.float32) for k, v in
                    self.method.federated_state_dict().items()},
            params_type=ParamsType.FULL,
            metrics=metrics,
            meta={NUM_STEPS_KEY: self.num_train_items, "ssl_loss": float(stats["loss"])},
        )

    def validate(self, model: FLModel) -> FLModel:
        self._load_global(model)
        metrics = self._knn()
        for k, v in metrics.items():
            self.site.log_scalar(k, v, int(model.current_round or 0))
        return FLModel(params={}, metrics=metrics)

    def submit_model(self, model: FLModel) -> FLModel:
        return FLModel(params={k: v.cpu().numpy() for k, v in self.method.federated_state_dict().items()},
                       params_type=ParamsType.FULL)


class DinoExecutor(HandlerExecutor):
    """FLARE executor for :class:`DinoHandler` (tasks ``train``, ``validate``, ``submit_model``).

    Args:
        dino: ``DINOConfig`` fields (must match the server persistor's ``model_config["config"]``).
        steps_per_round: local optimizer steps per round.
        total_rounds: FL rounds (schedule horizon = total_rounds * steps_per_round unless ``total_steps`` is set).
        knn_every: k-NN monitor every N rounds (0 = off).
        knn_max_items: cap on bank/query images for the monitor.
        views: augmentation settings of the training views (``MultiCropConfig`` fields other than crop sizes, e.g.
            ``{"intensity_prob": 0.4, "blur_sigma": [0.05, 0.6]}``; :meth:`DINOConfig.training_views`).
    """

    def __init__(
        self,
        dino: dict,
        steps_per_round: int = 10,
        total_rounds: int = 1,
        knn_every: int = 1,
        knn_max_items: int = 512,
        views: dict | None = None,
    ) -> None:
        super().__init__()
        self.dino = dino
        self.views = views
        self.steps_per_round = steps_per_round
        self.total_rounds = total_rounds
        self.knn_every = knn_every
        self.knn_max_items = knn_max_items

    def build_handler(self, site: SiteContext) -> DinoHandler:
        return DinoHandler(site, self.dino, self.steps_per_round, self.total_rounds, self.knn_every,
                           self.knn_max_items, views=self.views)
