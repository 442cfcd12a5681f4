"""Federated fine-tuning (segmentation or classification) on a site: the pure task handler and its executor.

State taxonomy (see ``fl_plugins.engine.finetune`` for the key set):

| state | where | lifetime |
|---|---|---|
| model parameters + BatchNorm running stats | federated (FedAvg, weights = labelled samples n_c) | global |
| optimizer moments, RNG state | site-persistent (kept by the handler between rounds) | the job |
| data loaders, augmentation | rebuilt each round | one round |

Tasks: ``train`` (validate the received global model on the site's validation split, then train
``steps_per_round`` steps; the LR follows the server-owned global step ``round * steps_per_round``), ``validate``
(metrics only) and ``submit_model`` (the local model).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fl_plugins.flare.executor import HandlerExecutor
from fl_plugins.flare.handler import SiteContext

__all__ = ["FinetuneHandler", "FinetuneExecutor", "select_labelled"]

logger = logging.getLogger(__name__)

NUM_STEPS_KEY = "NUM_STEPS_CURRENT_ROUND"  # nvflare FLMetaKey.NUM_STEPS_CURRENT_ROUND (FedAvg weight)


def select_labelled(entries: list[dict], num_labelled_patients: int | None) -> list[dict]:
    """Labelled training entries, optionally restricted to the first ``num_labelled_patients`` patients.

    Patients are taken in sorted order of their ``patient`` id (or the image path when absent), so the choice is
    deterministic and every frame of a chosen patient is kept.
    """
    labelled = [e for e in entries if e.get("labelled", True) and e.get("label") is not None]
    if num_labelled_patients is None:
        return labelled
    if num_labelled_patients < 1:
        raise ValueError(f"num_labelled_patients must be >= 1 or null, got {num_labelled_patients}")
    patients = sorted({str(e.get("patient", e.get("image", e.get("index")))) for e in labelled})
    if num_labelled_patients > len(patients):
        raise ValueError(
            f"num_labelled_patients={num_labelled_patients} but the site has only {len(patients)} labelled patients"
        )
    keep = set(patients[:num_labelled_patients])
    return [e for e in labelled if str(e.get("patient", e.get("image", e.get("index")))) in keep]


def _to_numpy(sd: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().astype(np.float32, copy=False) for k, v in sd.items()}


def _to_torch(params: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(np.asarray(v)) for k, v in params.items()}


class FinetuneHandler:
    """Pure task logic; built once per job on a site (FLModel in, FLModel out)."""

    def __init__(
        self,
        site: SiteContext,
        model: dict[str, Any],
        trainer: dict[str, Any],
        image_size: int = 64,
        num_labelled_patients: int | None = None,
        total_rounds: int = 1,
    ) -> None:
        from fl_plugins.data import build_split_datasets, load_datalist, validate_datalist
        from fl_plugins.engine.finetune import FinetuneConfig, FinetuneTrainer

        self.site = site
        cfg = dict(trainer)
        cfg.setdefault("total_steps", int(cfg.get("steps_per_round", 1)) * max(1, int(total_rounds)))
        model = dict(model)
        if model.get("pretrained") and not model.get("freeze_backbone", False):
            # The server's persistor loads the pretrained backbone into the initial global model and round 0
            # overwrites every site's weights with it, so sites need not have the file. A frozen backbone never
            # crosses the wire: then each site loads it from the same path (see docs).
            model["pretrained"] = None
        cfg["model"] = model
        self.config = FinetuneConfig.from_dict(cfg)
        dl = load_datalist(site.datalist_path)
        if dl["task"] != self.config.task:
            raise ValueError(
                f"datalist {site.datalist_path} is for task {dl['task']!r} but the job fine-tunes for "
                f"{self.config.task!r}"
            )
        if int(model.get("num_classes", dl["num_classes"])) != int(dl["num_classes"]):
            raise ValueError(
                f"model num_classes={model.get('num_classes')} but datalist {site.datalist_path} declares "
                f"num_classes={dl['num_classes']}"
            )
        validate_datalist(dl, sections=("training", "validation"), deep=True)
        train_entries = select_labelled(dl["training"], num_labelled_patients)
        if not train_entries:
            raise ValueError(f"datalist {site.datalist_path} has no labelled training entries")
        train_ds, val_ds = build_split_datasets(dl, train_entries, dl["validation"], image_size=image_size)
        self.num_train_items = len(train_ds)
        self.trainer = FinetuneTrainer(self.config, train_ds, val_ds)
        self.steps_per_round = int(self.config.steps_per_round)
        self.metric_prefix = "val_"
        logger.info(
            "site %s: %d labelled training items (%s patients), %d validation items",
            site.site_name, len(train_ds), num_labelled_patients or "all", len(val_ds),
        )

    def tasks(self) -> dict:
        return {"train": self.train, "validate": self.validate, "submit_model": self.submit_model}

    def _validate_global(self, model: FLModel) -> dict[str, float]:
        self.trainer.load_federated_state(_to_torch(model.params))
        metrics = self.trainer.evaluate()
        return {self.metric_prefix + k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}

    def train(self, model: FLModel) -> FLModel:
        rnd = int(model.current_round or 0)
        t0 = time.perf_counter()
        metrics = self._validate_global(model)
        for k, v in metrics.items():
            self.site.log_scalar(k, v, rnd)
        stats = self.trainer.train_steps(self.steps_per_round, global_step=rnd * self.steps_per_round)
        self.site.log_scalar("train_loss", float(stats["loss"]), rnd)
        self.site.log_scalar("round_seconds", time.perf_counter() - t0, rnd)
        return FLModel(
            params=_to_numpy(self.trainer.federated_state()),
            params_type=ParamsType.FULL,
            metrics=metrics,
            meta={NUM_STEPS_KEY: self.num_train_items, "train_loss": float(stats["loss"])},
        )

    def validate(self, model: FLModel) -> FLModel:
        metrics = self._validate_global(model)
        rnd = int(model.current_round or 0)
        for k, v in metrics.items():
            self.site.log_scalar(k, v, rnd)
        return FLModel(metrics=metrics, params={})

    def submit_model(self, model: FLModel) -> FLModel:
        return FLModel(params=_to_numpy(self.trainer.federated_state()), params_type=ParamsType.FULL)


class FinetuneExecutor(HandlerExecutor):
    """FLARE executor for :class:`FinetuneHandler` (tasks ``train``, ``validate``, ``submit_model``).

    Args:
        model: ``build_model`` config (must match the server persistor's).
        trainer: ``FinetuneConfig`` fields (task, lr, batch_size, steps_per_round, ...).
        image_size: slices/images are resized to ``image_size x image_size``.
        num_labelled_patients: use only this many labelled patients per site (None = all labelled ones).
        total_rounds: number of FL rounds (sets the LR schedule length).
    """

    def __init__(
        self,
        model: dict,
        trainer: dict,
        image_size: int = 64,
        num_labelled_patients: int | None = None,
        total_rounds: int = 1,
    ) -> None:
        super().__init__()
        self.model = model
        self.trainer = trainer
        self.image_size = image_size
        self.num_labelled_patients = num_labelled_patients
        self.total_rounds = total_rounds

    def build_handler(self, site: SiteContext) -> FinetuneHandler:
        return FinetuneHandler(
            site,
            model=self.model,
            trainer=self.trainer,
            image_size=self.image_size,
            num_labelled_patients=self.num_labelled_patients,
            total_rounds=self.total_rounds,
        )
