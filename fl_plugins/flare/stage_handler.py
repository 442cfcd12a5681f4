"""Stage-wise federated fine-tuning (MedUniverse) on a site: the task handler (``HandlerExecutor(handler=
"stagewise")``).

The site holds a :class:`~fl_plugins.engine.stagewise.StageMethod`: the shared backbone (a timm ViT, ``backbone.*``;
3D volumes go through it slice by slice, see :mod:`fl_plugins.models.slice_classifier`) and a task head sized by the
site's own number of classes (``head.*``). Tasks (:attr:`StagewiseHandler.TASKS`):

``report_task``
    no params in; answers ``meta`` ``{num_classes, spatial_dims, n_samples, n_val, task_name}`` and no params.
``stage_finetune``
    in: the stage's base (exactly the ``backbone.*`` keys; a head key is refused), ``current_round`` = the stage,
    ``meta`` ``{stage, num_stages, head_shape: [num_classes, embed_dim], evaluate}``. The site checks the head shape,
    loads the base, (if ``evaluate``) scores the received base with its own head on its validation split (the
    result's ``metrics``: ``val_accuracy``, ``val_balanced_accuracy``, ``val_auc``; AUC is the binary AUC for 2
    classes, the macro one-vs-rest AUC otherwise), fine-tunes backbone + head for ``steps_per_stage`` local steps
    with a fresh optimizer, saves the head, and answers **only the backbone keys** (float32, FULL), the round = the
    stage, ``meta`` ``{NUM_STEPS_CURRENT_ROUND: labelled training items, stage, train_loss, num_classes,
    task_name}``.
``validate``
    in: a base (backbone keys); answers the metrics of that base with the site's current head, no params.

The head never leaves the site: it lives on the handler between stages and is written after every stage, atomically,
to ``<site workspace>/stagewise_head.pt`` (``{"head", "num_classes", "task_name", "stage", "spatial_dims"}``); a
restarted site (a new handler in the same workspace) reloads it when it fits (same task and class count; otherwise
it logs why and starts a fresh head).

Data checks when the site starts (each error names the datalist and the value): a classification datalist; a class
count >= 2 (``num_classes`` 0 is refused by the datalist loader, 1 here); every training and validation label in
``range(num_classes)``; 2D images or 3D volumes (the datalist's geometry), one channel unless the backbone takes
RGB. TensorBoard (the site's ``tb_events/<site>/``): ``<task>/val_*`` at step = the base's stage index (0 = the
initial base), ``<task>/train_loss`` at step = the stage.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fl_plugins.flare.handler import MethodHandler, SiteContext, run_state_dir
from fl_plugins.flare.ssl_handler import site_seed
from fl_plugins.wire import (
    META_EVALUATE,
    META_HEAD_SHAPE,
    META_N_SAMPLES,
    META_N_VAL,
    META_NUM_CLASSES,
    META_NUM_STEPS,
    META_RUN_ID,
    META_SPATIAL_DIMS,
    META_STAGE,
    META_TASK_NAME,
    TASK_REPORT_TASK,
    TASK_STAGE_FINETUNE,
    TASK_VALIDATE,
)

__all__ = ["HEAD_FILE", "StagewiseHandler", "site_task_problems"]

logger = logging.getLogger(__name__)

#: the site's head, in the site workspace
HEAD_FILE = "stagewise_head.pt"


def site_task_problems(dl: dict[str, Any]) -> list[str]:
    """Why a loaded datalist cannot take part in stage-wise fine-tuning (empty: it can)."""
    where = f"datalist {dl.get('datalist_path')!r}"
    if dl.get("task") != "classification":
        return [f"{where} is for task {dl.get('task')!r}; stage-wise fine-tuning trains classification heads"]
    nc = dl.get("num_classes")
    if isinstance(nc, bool) or not isinstance(nc, int) or nc < 2:
        return [f"{where} declares num_classes={nc!r}; a stage-wise site needs a classification task with >= 2 "
                "classes (its head has one output per class)"]
    return []


def _labels(ds: Any) -> list[int]:
    entries = getattr(ds, "entries", None)
    if entries is not None and all(e.get("label") is not None for e in entries):
        return [int(e["label"]) for e in entries]
    return [int(ds[i]["label"]) for i in range(len(ds))]


class StagewiseHandler(MethodHandler):
    """Pure task logic of one stage-wise site (FLModel in, FLModel out); see the module docstring.

    Args:
        site: where the handler runs (datalist, workspace, TensorBoard).
        model: the job's ``model`` section (a ``vit_classifier`` config: ``backbone``, ``head``; ``num_classes`` is
            replaced by the datalist's, ``pretrained`` is ignored: the base comes from the server).
        trainer: :class:`~fl_plugins.engine.finetune.FinetuneConfig` fields except ``model`` and ``task``;
            ``steps_per_stage`` = local steps per stage (FinetuneConfig's ``steps_per_round``).
        image_size: image side (2D) / volume side (3D) the data is resized to.
        num_slices: slices per volume (3D sites), evenly spaced; None = every slice.
        num_stages: the job's number of stages (for the log only).
    """

    TASKS: ClassVar[tuple[str, ...]] = (TASK_REPORT_TASK, TASK_STAGE_FINETUNE, TASK_VALIDATE)

    def __init__(self, site: SiteContext, model: dict[str, Any], trainer: dict[str, Any], image_size: int = 64,
                 num_slices: int | None = 8, num_stages: int = 1) -> None:
        from fl_plugins.data import (
            build_split_datasets,
            data_geometry,
            labelled_entries,
            load_datalist,
            validate_datalist,
        )
        from fl_plugins.engine.finetune import FinetuneConfig
        from fl_plugins.engine.stagewise import StageTrainer

        self.site = site
        try:
            dl = load_datalist(site.datalist_path)  # num_classes 0 and labels outside range(num_classes) fail here
        except ValueError as e:
            raise ValueError(f"site {site.site_name}: {e}") from e
        problems = site_task_problems(dl)
        if problems:
            raise ValueError(f"site {site.site_name}: " + "; ".join(problems))
        validate_datalist(dl, sections=("training", "validation"), deep=True)
        self.datalist = str(dl["datalist_path"])
        self.num_classes = int(dl["num_classes"])
        self.task_name = str(dl.get("dataset") or site.site_name)
        geo = data_geometry(dl)
        self.spatial_dims = int(geo.spatial_dims)
        in_chans = int(dict(model.get("backbone") or {}).get("in_chans", 1))
        if geo.file_channels == 3 and dl.get("rgb") and in_chans != 3:
            raise ValueError(f"site {site.site_name}: datalist {self.datalist!r} keeps RGB images as 3 channels "
                             f"('rgb': true) but the backbone takes {in_chans}: --set model.backbone.in_chans=3")
        train_entries = labelled_entries(dl["training"])
        if not train_entries:
            raise ValueError(f"site {site.site_name}: datalist {self.datalist!r} has no labelled training entries")
        train_ds, val_ds = build_split_datasets(dl, train_entries, dl["validation"], image_size=image_size)
        for name, ds in (("training", train_ds), ("validation", val_ds)):
            bad = sorted({y for y in _labels(ds) if not 0 <= y < self.num_classes})
            if bad:
                raise ValueError(f"site {site.site_name}: datalist {self.datalist!r} declares num_classes="
                                 f"{self.num_classes} but its {name} labels include {bad[:10]}, outside "
                                 f"range({self.num_classes}): fix num_classes or the labels")
        missing = sorted(set(range(self.num_classes)) - set(_labels(train_ds)))
        if missing:
            logger.warning("site %s: datalist %s has no training item of class(es) %s", site.site_name,
                           self.datalist, missing)
        cfg = dict(trainer)
        if "steps_per_stage" in cfg:
            cfg["steps_per_round"] = cfg.pop("steps_per_stage")
        cfg["seed"] = site_seed(int(cfg.get("seed", 0)), site.site_name)  # heads and data order differ per site
        cfg["task"] = "classification"
        cfg["model"] = {**dict(model), "num_classes": self.num_classes, "pretrained": None}
        self.config = FinetuneConfig.from_dict(cfg)
        self.trainer = StageTrainer(self.config, train_ds, val_ds, num_slices=num_slices)
        self.method = self.trainer.method
        self.steps_per_round = int(self.config.steps_per_round)
        self.num_train_items = len(train_ds)
        self.num_val_items = len(val_ds)
        self.num_stages = int(num_stages)
        self.embed_dim = int(self.method.model.backbone.embed_dim)
        self.head_path = Path(site.workspace_dir) / HEAD_FILE
        self.head_stage: int | None = None  # the stage the head was last fine-tuned in (None: fresh)
        self.run_head_path: Path | None = None  # the per-run copy (adopt_run)
        self._restore_head()
        logger.info("site %s: task %r, %d classes, %dD, %d labelled training / %d validation items; head %s",
                    site.site_name, self.task_name, self.num_classes, self.spatial_dims, self.num_train_items,
                    self.num_val_items, "fresh" if self.head_stage is None else f"from stage {self.head_stage}")

    # -- the head (site state) -------------------------------------------------------------------------------------

    def _restore_head(self, path: Path | None = None) -> None:
        path = path or self.head_path
        if not path.is_file():
            return
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"site {self.site.site_name}: cannot read the saved head {str(path)!r}: {e} "
                             "(delete it to start a fresh head)") from e
        if not isinstance(obj, dict) or obj.get("num_classes") != self.num_classes \
                or obj.get("task_name") != self.task_name:
            got = (obj.get("task_name"), obj.get("num_classes")) if isinstance(obj, dict) else type(obj).__name__
            logger.warning("site %s: the saved head %s is for task/classes %s, not (%r, %d): starting a fresh head",
                           self.site.site_name, path, got, self.task_name, self.num_classes)
            return
        try:
            self.trainer.load_head_state(obj["head"])
        except (KeyError, ValueError) as e:
            raise ValueError(f"site {self.site.site_name}: the saved head {str(path)!r} does not fit: {e} "
                             "(delete it to start a fresh head)") from e
        self.head_stage = int(obj.get("stage", -1))
        logger.info("site %s: restored the head of stage %s from %s", self.site.site_name, self.head_stage, path)

    def save_head(self, stage: int) -> None:
        """Write the head atomically to the site workspace (and, in a run the server names, to the site's per-run
        state folder, where a resumed job's handler finds it: :meth:`adopt_run`)."""
        from fl_plugins.engine.checkpoint import atomic_torch_save

        obj = {"head": self.trainer.head_state(), "num_classes": self.num_classes, "task_name": self.task_name,
               "stage": int(stage), "spatial_dims": self.spatial_dims}
        for path in {self.head_path, self.run_head_path} - {None}:
            atomic_torch_save(obj, path)
        self.head_stage = int(stage)

    def adopt_run(self, model: FLModel) -> None:
        """The first task that names the run (``meta["run_id"]``, fl_plugins.flare.resume): the head is kept per run
        under ``<state_dir>/<run id>/<site>_stagewise_head.pt`` too; a handler without a head of its own (a resumed
        job) restores it from there."""
        folder = run_state_dir(self.site, (model.meta or {}).get(META_RUN_ID))
        if self.run_head_path is not None or folder is None:
            return
        self.run_head_path = Path(folder) / f"{self.site.site_name}_{HEAD_FILE}"
        if self.head_stage is None:
            self._restore_head(self.run_head_path)

    # -- tasks --------------------------------------------------------------------------------------------------------

    def _task_meta(self) -> dict[str, Any]:
        return {META_NUM_CLASSES: self.num_classes, META_TASK_NAME: self.task_name,
                META_SPATIAL_DIMS: self.spatial_dims}

    def report_task(self, model: FLModel) -> FLModel:
        """The site's task (no params)."""
        del model
        meta = {**self._task_meta(), META_N_SAMPLES: self.num_train_items, META_N_VAL: self.num_val_items}
        return FLModel(params={}, meta=meta)

    @staticmethod
    def _stage_of(model: FLModel) -> int:
        stage = model.current_round
        if stage is None:
            stage = (model.meta or {}).get(META_STAGE)
        if stage is None:
            raise ValueError("the task names no stage (FLModel.current_round / meta 'stage')")
        return int(stage)

    def _check_head_shape(self, model: FLModel) -> None:
        shape = (model.meta or {}).get(META_HEAD_SHAPE)
        if shape is None:
            return
        want = [self.num_classes, self.embed_dim]
        if [int(v) for v in shape] != want:
            raise ValueError(f"site {self.site.site_name}: the server expects a head of shape {list(shape)} but this "
                             f"site's head is {want} (num_classes={self.num_classes} from {self.datalist!r}, "
                             f"embed_dim={self.embed_dim})")

    def monitor(self, rnd: int) -> dict[str, float]:
        """Validation metrics of the current backbone with the site's head (``val_*``)."""
        metrics = self.trainer.evaluate()
        return {f"val_{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            if np.isfinite(v):
                self.site.log_scalar(f"{self.task_name}/{k}", float(v), step)

    def stage_finetune(self, model: FLModel) -> FLModel:
        """Fine-tune the stage's base with the site's head; answer the backbone only (module docstring)."""
        stage = self._stage_of(model)
        t0 = time.perf_counter()
        self._check_head_shape(model)
        self.adopt_run(model)
        self.load_global(model)
        metrics: dict[str, float] = {}
        if (model.meta or {}).get(META_EVALUATE, True):
            metrics = self.monitor(stage)
            self._log_metrics(metrics, stage)
        self.trainer.reset_optimizer()
        stats = self.trainer.train_steps(self.steps_per_round, global_step=stage * self.steps_per_round)
        self.save_head(stage)
        self.site.log_scalar(f"{self.task_name}/{self.LOSS_META_KEY}", float(stats["loss"]), stage)
        self.site.log_scalar("stage_seconds", time.perf_counter() - t0, stage)
        logger.info("site %s: stage %d of %d fine-tuned (%d steps, loss %.4f); received base %s", self.site.site_name,
                    stage, self.num_stages, self.steps_per_round, stats["loss"], metrics)
        return FLModel(params=self.federated_params(), params_type=ParamsType.FULL, metrics=metrics,
                       current_round=stage,
                       meta={META_NUM_STEPS: self.num_train_items, META_STAGE: stage,
                             self.LOSS_META_KEY: float(stats["loss"]), **self._task_meta()})

    def validate(self, model: FLModel) -> FLModel:
        """Metrics of the received base with the site's current head (no params)."""
        stage = self._stage_of(model)
        self.adopt_run(model)
        self.load_global(model)
        metrics = self.monitor(stage)
        self._log_metrics(metrics, stage)
        return FLModel(params={}, metrics=metrics, current_round=stage, meta={META_STAGE: stage, **self._task_meta()})
