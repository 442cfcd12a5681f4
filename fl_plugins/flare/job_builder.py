"""Build FLARE jobs (``FedJob``) from Python; the folders in ``jobs/`` are exports of :data:`JOBS`.

Every component is a class of the installed ``fl_plugins`` package or of nvflare, and the job is exported with
``set_app_packages(["fl_plugins"])``, so no ``app/custom`` code is shipped: sites need ``fl_plugins`` installed
and the ``fl_plugins.`` prefix in their ``class_allow_list`` (see docs/deployment.md), not the BYOC right.

Latency knobs (defaults measured in benchmarks/fl_overhead.py): ``server.task_request_interval`` (how long a
client waits before asking again for a task; nvflare's default is 2 s) and the controller's
``task_check_period`` (how often the server checks whether a round's results are in; default 0.5 s).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from nvflare.app_common.widgets.convert_to_fed_event import ConvertToFedEvent
from nvflare.app_common.widgets.intime_model_selector import IntimeModelSelector
from nvflare.app_opt.tracking.tb.tb_receiver import TBAnalyticsReceiver
from nvflare.job_config.api import FedJob

from fl_plugins.flare.controllers import FedAvgWithFinalValidation
from fl_plugins.flare.persistor import ConfigModelPersistor
from fl_plugins.methods.dino_config import DINOConfig
from fl_plugins.methods.view_config import VIEW_SETTING_FIELDS

__all__ = ["FLSettings", "build_fedavg_job", "JOBS", "build_job", "export_jobs", "job_names"]

#: State keys that are never federated: BatchNorm's ``num_batches_tracked`` counter is an integer step count,
#: not a statistic; averaging it is meaningless (see fl_plugins.engine.finetune's state taxonomy).
NON_FEDERATED_BUFFERS = r".*num_batches_tracked$"

#: Weight transfer formats: float32 (None) or nvflare's quantization filters (need bitsandbytes on every party).
QUANTIZATION_TYPES = (None, "float16", "blockwise8")

#: Task names every fine-tuning / pretraining executor handles.
TRAIN_TASKS = ["train", "validate", "submit_model"]


@dataclass
class FLSettings:
    """Run-level FL settings shared by every job."""

    num_rounds: int = 2
    min_clients: int = 2
    task_request_interval: float = 0.1  # s; nvflare default 2.0 s costs ~2 s per round (nvflare-notes 5b)
    task_check_period: float = 0.05  # s; nvflare default 0.5 s
    key_metric: str = "val_dice"
    quantization: str | None = None  # None (float32) | "float16" | "blockwise8": FLARE's ModelQuantizer filters

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATION_TYPES:
            raise ValueError(f"quantization must be one of {QUANTIZATION_TYPES}, got {self.quantization!r}")
        if self.num_rounds < 1:
            raise ValueError(f"num_rounds must be >= 1, got {self.num_rounds}")
        if self.min_clients < 1:
            raise ValueError(f"min_clients must be >= 1, got {self.min_clients}")
        if not 0 < self.task_request_interval <= 60:
            raise ValueError(f"task_request_interval must be in (0, 60] seconds, got {self.task_request_interval}")
        if not 0 < self.task_check_period <= 60:
            raise ValueError(f"task_check_period must be in (0, 60] seconds, got {self.task_check_period}")


def build_fedavg_job(
    name: str,
    executor: Any,
    model_config: dict[str, Any],
    fl: FLSettings,
    exclude_vars: str | None = NON_FEDERATED_BUFFERS,
) -> FedJob:
    """FedAvg job: server persistor built from ``model_config``, best/last checkpoints, per-site TensorBoard.

    Args:
        name: job name (folder name when exported).
        executor: a ``fl_plugins.flare`` executor instance handling :data:`TRAIN_TASKS`.
        model_config: ``fl_plugins.models.factory.build_model`` config of the *global* (federated) model.
        fl: run-level settings.
        exclude_vars: regex of state keys the persistor never stores/sends (site-local state).
    """
    job = FedJob(name=name, min_clients=fl.min_clients)
    job.set_app_packages(["fl_plugins"])
    controller = FedAvgWithFinalValidation(
        num_clients=fl.min_clients,  # the minimum number of connected sites a round needs
        sites_per_round=None,  # every connected site trains in every round; a lost site is dropped
        num_rounds=fl.num_rounds,
        persistor_id="persistor",
        task_check_period=fl.task_check_period,
    )
    job.to_server(controller, id="controller")
    job.to_server(ConfigModelPersistor(model_config=model_config, exclude_regex=exclude_vars), id="persistor")
    job.to_server(IntimeModelSelector(key_metric=fl.key_metric), id="model_selector")
    job.to_server(TBAnalyticsReceiver(events=["fed.analytix_log_stats"]), id="tb_receiver")
    job.to_server({"server": {"task_request_interval": fl.task_request_interval}})
    job.to_clients(executor, tasks=TRAIN_TASKS)
    job.to_clients(ConvertToFedEvent(events_to_convert=["analytix_log_stats"], fed_event_prefix="fed."), id="event_to_fed")
    if fl.quantization:
        _add_quantization(job, fl.quantization)
    return job


def _add_quantization(job: FedJob, kind: str) -> None:
    """Quantize weights on the way out and dequantize on the way in, both directions (nvflare's own filters)."""
    from nvflare.app_opt.pt.quantization.dequantizer import ModelDequantizer
    from nvflare.app_opt.pt.quantization.quantizer import ModelQuantizer
    from nvflare.job_config.defs import FilterType

    job.to_server(ModelQuantizer(quantization_type=kind), filter_type=FilterType.TASK_DATA, tasks=["train"])
    job.to_server(ModelDequantizer(), filter_type=FilterType.TASK_RESULT, tasks=["train"])
    job.to_clients(ModelDequantizer(), filter_type=FilterType.TASK_DATA, tasks=["train"])
    job.to_clients(ModelQuantizer(quantization_type=kind), filter_type=FilterType.TASK_RESULT, tasks=["train"])


# ---------------------------------------------------------------------------------------------------------------------
# Registry of ready jobs. Each entry: defaults (a nested dict) + a builder taking the merged settings.
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class JobSpec:
    name: str
    description: str
    defaults: dict[str, Any]
    builder: Callable[[str, dict[str, Any]], FedJob]
    extra: dict[str, Any] = field(default_factory=dict)
    #: settable keys beyond ``defaults``, per dotted sub-dict path (validated again by the method's config class)
    open_keys: dict[str, frozenset[str]] = field(default_factory=dict)


def _with_fl_defaults(defaults: dict[str, Any]) -> dict[str, Any]:
    """Every FLSettings field is a known ``fl.*`` setting of every job (values: the job's, else FLSettings')."""
    from dataclasses import asdict

    out = copy.deepcopy(defaults)
    out["fl"] = {**asdict(FLSettings()), **defaults.get("fl", {})}
    return out


def _merge(
    base: dict[str, Any], overrides: dict[str, Any], where: str = "", open_keys: dict[str, frozenset[str]] | None = None
) -> dict[str, Any]:
    """``base`` updated with ``overrides``; a key that is neither in ``base`` nor, for the sub-dict at dotted path
    ``p``, in ``open_keys[p]`` (e.g. every ``DINOConfig`` field under ``dino``) is rejected with the known keys."""
    out = copy.deepcopy(base)
    allowed = (open_keys or {}).get(where.rstrip("."), frozenset())
    for k, v in overrides.items():
        if k not in out and k not in allowed:
            raise ValueError(f"unknown job setting {where + k!r}; known: {sorted(set(out) | allowed)}")
        if isinstance(out.get(k), dict) and isinstance(v, dict):
            out[k] = _merge(out[k], v, where + k + ".", open_keys)
        else:
            out[k] = v
    return out


def _finetune_builder(name: str, s: dict[str, Any]) -> FedJob:
    from fl_plugins.flare.finetune_executor import FinetuneExecutor

    fl = FLSettings(**s["fl"])
    model_cfg = s["model"]
    exclude = _non_federated(model_cfg)
    executor = FinetuneExecutor(
        model=model_cfg,
        trainer=s["trainer"],
        image_size=s["image_size"],
        num_labelled_patients=s["num_labelled_patients"],
        total_rounds=fl.num_rounds,
    )
    return build_fedavg_job(name, executor, model_cfg, fl, exclude_vars=exclude)


def _non_federated(model_cfg: dict[str, Any]) -> str:
    """Regex of the model's state keys that never cross the wire (from the engine's state taxonomy)."""
    from fl_plugins.engine.finetune import non_federated_regex
    from fl_plugins.models.factory import build_model

    cfg = dict(model_cfg)
    if "pretrained" in cfg:
        cfg["pretrained"] = None  # the structure is all we need here; the server loads the file at run time
    return non_federated_regex(build_model(cfg)) or NON_FEDERATED_BUFFERS


_SEG_TRAINER = {"lr": 1e-3, "batch_size": 8, "steps_per_round": 10}  # CPU quickstart size; raise for real runs
_VIT = {"name": "vit_tiny_patch16_224", "img_size": 64, "patch_size": 8, "in_chans": 1, "depth": 6}

JOBS: dict[str, JobSpec] = {
    "finetune_seg_unet": JobSpec(
        name="finetune_seg_unet",
        description="Segmentation fine-tuning, MONAI U-Net from scratch (the honest baseline), FedAvg",
        defaults={
            "fl": {"num_rounds": 2, "min_clients": 2, "key_metric": "val_dice"},
            "model": {"arch": "unet", "num_classes": 3},
            "trainer": dict(_SEG_TRAINER, task="segmentation"),
            "image_size": 64,
            "num_labelled_patients": None,
        },
        builder=_finetune_builder,
    ),
    "finetune_seg_vit": JobSpec(
        name="finetune_seg_vit",
        description="Segmentation fine-tuning, timm ViT encoder + UNETR-style decoder (optionally from a pretrained "
        "backbone), FedAvg",
        defaults={
            "fl": {"num_rounds": 2, "min_clients": 2, "key_metric": "val_dice"},
            "model": {"arch": "vit_seg", "num_classes": 3, "backbone": dict(_VIT), "pretrained": None},
            "trainer": dict(_SEG_TRAINER, task="segmentation", lr=5e-4),
            "image_size": 64,
            "num_labelled_patients": None,
        },
        builder=_finetune_builder,
    ),
    "finetune_cls": JobSpec(
        name="finetune_cls",
        description="Classification fine-tuning, timm ViT + linear/MLP head (optionally from a pretrained backbone), "
        "FedAvg",
        defaults={
            "fl": {"num_rounds": 2, "min_clients": 2, "key_metric": "val_accuracy"},
            "model": {
                "arch": "vit_classifier",
                "num_classes": 2,
                "head": "linear",
                "backbone": dict(_VIT, img_size=32, patch_size=4),
                "pretrained": None,
            },
            "trainer": {"task": "classification", "lr": 5e-4, "batch_size": 16, "steps_per_round": 10},
            "image_size": 32,
            "num_labelled_patients": None,
        },
        builder=_finetune_builder,
    ),
}


def job_names() -> list[str]:
    return sorted(JOBS)


def build_job(name: str, overrides: dict[str, Any] | None = None) -> FedJob:
    """Build the registered job ``name`` with nested ``overrides`` (unknown keys are rejected)."""
    if name not in JOBS:
        raise ValueError(f"unknown job {name!r}; available jobs: {job_names()}")
    spec = JOBS[name]
    settings = _merge(_with_fl_defaults(spec.defaults), overrides or {}, open_keys=spec.open_keys)
    return spec.builder(name, settings)


def job_settings(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    if name not in JOBS:
        raise ValueError(f"unknown job {name!r}; available jobs: {job_names()}")
    return _merge(_with_fl_defaults(JOBS[name].defaults), overrides or {}, open_keys=JOBS[name].open_keys)


def export_jobs(out_dir: str | Path, names: list[str] | None = None) -> list[Path]:
    """Export registered jobs as classic FLARE job folders under ``out_dir``."""
    out = Path(out_dir)
    paths = []
    for n in names or job_names():
        build_job(n).export_job(str(out))
        paths.append(out / n)
    return paths


def _dino_builder(name: str, s: dict[str, Any]) -> FedJob:
    from fl_plugins.flare.dino_executor import MODE_EXCLUDE_REGEX, DinoExecutor

    fl = FLSettings(**s["fl"])
    dino = dict(s["dino"])
    if dino.get("total_steps") is None:
        dino["total_steps"] = s["steps_per_round"] * fl.num_rounds
    try:  # validate early: a bad value is named when the job is built, not on the sites at run time
        cfg = DINOConfig.from_dict(dict(dino))
    except TypeError as e:
        raise ValueError(f"dino settings: {e}") from e
    views = dict(s["views"])
    cfg.training_views(views)  # validated here too: a bad view setting is named when the job is built
    executor = DinoExecutor(
        dino=dino, steps_per_round=s["steps_per_round"], total_rounds=fl.num_rounds, knn_every=s["knn_every"],
        knn_max_items=s["knn_max_items"], views=views,
    )
    mode = dino.get("federation_mode", "A")
    return build_fedavg_job(name, executor, {"arch": "dino", "config": dino}, fl, exclude_vars=MODE_EXCLUDE_REGEX[mode])


_DINO = {
    "backbone": dict(_VIT),
    "batch_size": 16,
    "out_dim": 1024,  # K = 1024 at CPU scale (methods-spec 2.7 / 9.3)
    "hidden_dim": 512,  # [R] CPU scale (2048 [V])
    "bottleneck_dim": 128,  # [R] CPU scale (256 [V])
    "local_crop_size": 32,
    "n_local_crops": 4,
    "federation_mode": "A",
}

_DINO_FIELDS = frozenset(f.name for f in fields(DINOConfig))

for _variant in ("dino", "dinov2"):
    JOBS[f"{_variant}_pretrain"] = JobSpec(
        name=f"{_variant}_pretrain",
        description=f"Federated {'DINO' if _variant == 'dino' else 'DINOv2 (iBOT + KoLeo)'} pretraining of a timm "
        "ViT on unlabelled images, FedAvg (mode A), k-NN monitor",
        defaults={
            "fl": {"num_rounds": 2, "min_clients": 2, "key_metric": "knn_accuracy"},
            "dino": dict(_DINO, variant=_variant),
            "steps_per_round": 5,
            "knn_every": 1,
            "knn_max_items": 256,
            "views": {},  # augmentation settings of the training views (MultiCropConfig defaults when empty)
        },
        builder=_dino_builder,
        # every DINOConfig field can be set (e.g. --set dino.lr=5e-4); DINOConfig validates the values; the same for
        # the training views' augmentation settings (e.g. --set views.intensity_prob=0.4), MultiCropConfig validates
        open_keys={"dino": _DINO_FIELDS, "views": VIEW_SETTING_FIELDS},
    )
