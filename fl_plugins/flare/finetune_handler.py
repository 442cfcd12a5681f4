"""Federated fine-tuning (segmentation or classification) on a site: the task handler (method ``"finetune"``).

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
from typing import TYPE_CHECKING, Any

from fl_plugins.core.schedules import step_horizon
from fl_plugins.flare.data_check import finetune_data_problems
from fl_plugins.flare.handler import MethodHandler, SiteContext

if TYPE_CHECKING:
    from fl_plugins.engine.finetune import FinetuneConfig

__all__ = ["FinetuneHandler", "select_labelled"]

logger = logging.getLogger(__name__)


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


def finetune_config(model: dict[str, Any], trainer: dict[str, Any], total_rounds: int) -> FinetuneConfig:
    """The site's :class:`FinetuneConfig` from a fine-tuning job's ``model`` and ``trainer`` settings (the job
    builder calls it too, so a bad setting fails when the job is built, not on the sites).

    ``total_steps`` defaults to ``steps_per_round x total_rounds`` (the schedule's horizon); a pretrained backbone
    is not loaded on the sites unless it is frozen (see the comment below).

    Raises:
        ValueError: a setting FinetuneConfig rejects (the message names it and the value).
    """
    from fl_plugins.engine.finetune import FinetuneConfig

    cfg = dict(trainer)
    cfg.setdefault("total_steps", step_horizon(int(cfg.get("steps_per_round", 1)), int(total_rounds)))
    model = dict(model)
    if model.get("pretrained") and not model.get("freeze_backbone", False):
        # The server's persistor loads the pretrained backbone into the initial global model and round 0
        # overwrites every site's weights with it, so sites need not have the file. A frozen backbone never
        # crosses the wire: then each site loads it from the same path (see docs).
        model["pretrained"] = None
    cfg["model"] = model
    return FinetuneConfig.from_dict(cfg)


class FinetuneHandler(MethodHandler):
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
        from fl_plugins.engine.finetune import FinetuneTrainer

        self.site = site
        self.config = finetune_config(model, trainer, total_rounds)
        model = self.config.model
        dl = load_datalist(site.datalist_path)
        validate_datalist(dl, sections=("training", "validation"), deep=True)
        problems = finetune_data_problems(self.config.task, model, dl)  # the same checks as check-data --job
        if problems:
            raise ValueError(f"site {site.site_name}: " + "; ".join(problems))
        train_entries = select_labelled(dl["training"], num_labelled_patients)
        if not train_entries:
            raise ValueError(f"datalist {site.datalist_path} has no labelled training entries")
        train_ds, val_ds = build_split_datasets(dl, train_entries, dl["validation"], image_size=image_size)
        self.num_train_items = len(train_ds)
        self.trainer = FinetuneTrainer(self.config, train_ds, val_ds)
        self.method = self.trainer.method
        self.optimizer = self.trainer.optimizer  # site-persistent (MethodHandler.site_state)
        self.steps_per_round = int(self.config.steps_per_round)
        self.metric_prefix = "val_"
        logger.info(
            "site %s: %d labelled training items (%s patients), %d validation items",
            site.site_name, len(train_ds), num_labelled_patients or "all", len(val_ds),
        )

    def monitor(self, rnd: int) -> dict[str, float]:
        """Validation metrics of the current (received) model on the site's validation split (``val_*``)."""
        metrics = self.trainer.evaluate()
        return {self.metric_prefix + k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}

    def local_train(self, global_step: int) -> dict[str, float]:
        return self.trainer.train_steps(self.steps_per_round, global_step=global_step)
