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
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nvflare.app_common.widgets.convert_to_fed_event import ConvertToFedEvent
from nvflare.app_opt.tracking.tb.tb_receiver import TBAnalyticsReceiver
from nvflare.job_config.api import FedJob

from fl_plugins.data.view_config import VIEW_SETTING_FIELDS
from fl_plugins.flare.controllers import DEFAULT_MEMORY_GC_ROUNDS, DEFAULT_ROUND_TIMEOUT
from fl_plugins.flare.finetune_handler import finetune_config
from fl_plugins.flare.persistor import ConfigModelPersistor
from fl_plugins.flare.update_check import DEFAULT_NORM_BOUND, check_norm_bound
from fl_plugins.methods.dino_config import DINOConfig
from fl_plugins.models.unet import UNET_DEFAULTS
from fl_plugins.settings import merge_settings

__all__ = ["FLSettings", "build_fedavg_job", "build_pretrain_job", "JOBS", "build_job", "export_jobs", "job_names",
           "non_federated_regex_of"]

#: State keys that are never federated: BatchNorm's ``num_batches_tracked`` counter is an integer step count,
#: not a statistic; averaging it is meaningless (see fl_plugins.engine.finetune's state taxonomy).
NON_FEDERATED_BUFFERS = r".*num_batches_tracked$"

#: Weight transfer formats: float32 (None) or nvflare's quantization filters (need bitsandbytes on every party).
QUANTIZATION_TYPES = (None, "float16", "blockwise8")

#: Server workflows a job may name (``fl.controller``): "module:Class" of a ``ModelController`` taking
#: ``num_clients``, ``num_rounds``, ``persistor_id``, ``task_check_period`` and ``aggregator``.
CONTROLLERS: dict[str, str] = {"fedavg": "fl_plugins.flare.controllers:FedAvgWithFinalValidation",
                               "fcl": "fl_plugins.flare.fcl_controller:FCLController",
                               "fclopt": "fl_plugins.flare.fclopt_controller:FCLOptController"}
#: Aggregators a job may name (``fl.aggregator``): nvflare ``ModelAggregator`` classes taking ``norm_bound`` and
#: following the validation contract of fl_plugins.flare.aggregators (every result checked, see update_check).
AGGREGATORS: dict[str, str] = {"weighted_average": "fl_plugins.flare.aggregators:WeightedAverage"}
#: ``fl.*`` settings that may be set to null although their default is not (key -> default, for the type check).
FL_NULLABLE: dict[str, Any] = {"update_norm_bound": DEFAULT_NORM_BOUND}


def _load(ref: str) -> Any:
    import importlib

    module, _, cls = ref.partition(":")
    return getattr(importlib.import_module(module), cls)


@dataclass
class FLSettings:
    """Run-level FL settings shared by every job."""

    num_rounds: int = 2
    min_clients: int = 2
    task_request_interval: float = 0.1  # s; nvflare default 2.0 s costs ~2 s per round (nvflare-notes 5b)
    task_check_period: float = 0.05  # s; nvflare default 0.5 s
    key_metric: str = "val_dice"
    quantization: str | None = None  # None (float32) | "float16" | "blockwise8": FLARE's ModelQuantizer filters
    # send the weights inside the task message instead of a separate download (nvflare np_download_chunk_size=0):
    # 0.05-0.15 s less per round for the CPU-sized models (benchmarks/fl_overhead.py); off for large models, which
    # then travel as one message
    inline_weights: bool = False
    seed: int = 0  # fixes the initial global model and every site's data order, augmentations and masks
    controller: str = "fedavg"  # a name in CONTROLLERS (the server workflow)
    aggregator: str | None = None  # None: "weighted_average" (what nvflare's FedAvg computes); else a name in AGGREGATORS
    # reject a site's result whose update norm ||params - global|| exceeds this x the median of the other sites'
    # (> 1; null = off); 10: honest sites stay within a few x, a poisoned/diverged update is orders larger
    # (fl_plugins/flare/update_check.py)
    update_norm_bound: float | None = DEFAULT_NORM_BOUND
    # s a site may take to answer a task before the round goes on without it (0 = no limit;
    # fl_plugins/flare/controllers.py DEFAULT_ROUND_TIMEOUT)
    round_timeout: int = DEFAULT_ROUND_TIMEOUT
    # a round_checkpoint.pt to start from (absolute on the server, or relative to the server app's config/ folder,
    # where `flssl resume` puts it); null = start at round 0 (fl_plugins/flare/resume.py)
    resume_from: str | None = None
    # nvflare's memory clean-up (gc.collect + malloc_trim) every N rounds on the server / N training tasks on a site
    # (0 = off; fl_plugins/flare/controllers.py DEFAULT_MEMORY_GC_ROUNDS; benchmarks/memory_soak.py measures RSS)
    server_memory_gc_rounds: int = DEFAULT_MEMORY_GC_ROUNDS
    client_memory_gc_rounds: int = DEFAULT_MEMORY_GC_ROUNDS

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATION_TYPES:
            raise ValueError(f"quantization must be one of {QUANTIZATION_TYPES}, got {self.quantization!r}")
        if self.num_rounds < 1:
            raise ValueError(f"num_rounds must be >= 1, got {self.num_rounds}")
        if self.min_clients < 1:
            raise ValueError(f"min_clients must be >= 1, got {self.min_clients}")
        if not 0 < self.task_request_interval <= 60:
            raise ValueError(f"task_request_interval must be in (0, 60] seconds, got {self.task_request_interval}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        if self.controller not in CONTROLLERS:
            raise ValueError(f"controller must be one of {sorted(CONTROLLERS)}, got {self.controller!r}")
        if self.aggregator is not None and self.aggregator not in AGGREGATORS:
            raise ValueError(f"aggregator must be null or one of {sorted(AGGREGATORS)}, got {self.aggregator!r}")
        if not 0 < self.task_check_period <= 60:
            raise ValueError(f"task_check_period must be in (0, 60] seconds, got {self.task_check_period}")
        self.update_norm_bound = check_norm_bound(self.update_norm_bound, "fl.update_norm_bound")
        for knob in ("round_timeout", "server_memory_gc_rounds", "client_memory_gc_rounds"):
            v = getattr(self, knob)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"fl.{knob} must be an int >= 0, got {v!r}")
        if self.resume_from is not None and (not isinstance(self.resume_from, str) or not self.resume_from.strip()):
            raise ValueError(f"fl.resume_from must be the path of a round_checkpoint.pt or null, got "
                             f"{self.resume_from!r}")

    def controller_args(self) -> dict[str, Any]:
        """The robustness settings every FedAvg-family controller takes (``resume_from`` only when set)."""
        out: dict[str, Any] = {"round_timeout": self.round_timeout, "memory_gc_rounds": self.server_memory_gc_rounds}
        if self.resume_from:
            out["resume_from"] = self.resume_from
        return out


def build_fedavg_job(
    name: str,
    handler: str,
    handler_args: dict[str, Any],
    fl: FLSettings,
    model_config: dict[str, Any] | None = None,
    method: str | None = None,
    method_config: dict[str, Any] | None = None,
    exclude_vars: str | None = NON_FEDERATED_BUFFERS,
    imports: list[str] | None = None,
    client: str = "executor",
    plugin_files: list[str] | None = None,
    controller_args: dict[str, Any] | None = None,
) -> FedJob:
    """A job of the plugin architecture: server persistor of the global model (``model_config`` or the registered
    ``method``), the named controller (and aggregator), best/last checkpoints, per-site TensorBoard; on the
    sites, one :class:`~fl_plugins.flare.executor.HandlerExecutor` answering exactly its handler's ``TASKS``.

    Args:
        name: job name (folder name when exported).
        handler: registered task handler (``fl_plugins.flare.handlers.HANDLERS``).
        handler_args: the handler's keyword arguments.
        fl: run-level settings (controller, aggregator, rounds, quantization, latency knobs).
        model_config / method / method_config: what the server's initial global model is built from (one of them).
        exclude_vars: regex of state keys the persistor never stores/sends (site-local state).
        imports: plugin modules the sites and the server import first.
        client: ``"executor"`` (the installed package's executor: no custom code in the job) or ``"client_api"``
            (the thin script ``custom/fl_client.py`` under nvflare's ``ScriptRunner``: the job carries custom code).
        plugin_files: files shipped in the job's custom code on the server and every site (e.g. the module of a
            method defined outside the package; name its module in ``imports``).
    """
    if client not in CLIENT_PATHS:
        raise ValueError(f"client must be one of {CLIENT_PATHS}, got {client!r}")
    from fl_plugins.flare.executor import HandlerExecutor
    from fl_plugins.flare.handlers import handler_class

    tasks = list(handler_class(handler).TASKS)
    job = FedJob(name=name, min_clients=fl.min_clients)
    job.set_app_packages(["fl_plugins"])
    aggregator = _load(AGGREGATORS[fl.aggregator or "weighted_average"])(norm_bound=fl.update_norm_bound)
    controller = _load(CONTROLLERS[fl.controller])(
        num_clients=fl.min_clients,  # the minimum number of connected sites a round needs
        num_rounds=fl.num_rounds,
        persistor_id="persistor",
        task_check_period=fl.task_check_period,
        aggregator=aggregator,
        key_metric=fl.key_metric,
        **fl.controller_args(),
        **dict(controller_args or {}),
    )
    job.to_server(controller, id="controller")
    job.to_server(ConfigModelPersistor(model_config=model_config, exclude_regex=exclude_vars, method=method,
                                       method_config=method_config, imports=imports, seed=fl.seed), id="persistor")
    job.to_server(TBAnalyticsReceiver(events=["fed.analytix_log_stats"]), id="tb_receiver")
    job.to_server({"server": {"task_request_interval": fl.task_request_interval}})
    if client == "executor":
        job.to_clients(HandlerExecutor(handler=handler, handler_args=handler_args, imports=imports,
                                       memory_gc_rounds=fl.client_memory_gc_rounds), tasks=tasks)
    else:
        _add_client_api(job, {"handler": handler, "handler_args": handler_args, "imports": list(imports or [])})
    for f in plugin_files or []:
        if not Path(f).is_file():
            raise ValueError(f"plugin_files: {f!r} is not a file")
        job.add_file_to_server(str(f))
        job.add_file_to_clients(str(f))
    job.to_clients(ConvertToFedEvent(events_to_convert=["analytix_log_stats"], fed_event_prefix="fed."), id="event_to_fed")
    if fl.quantization:
        _add_quantization(job, fl.quantization)
    if fl.inline_weights:
        job.to_server({"np_download_chunk_size": 0})
        job.to_clients({"np_download_chunk_size": 0})
    return job


#: How the sites run the handler: the package's executor, or the Client API script ``custom/fl_client.py``.
CLIENT_PATHS = ("executor", "client_api")
#: The Client API entry script (``custom/`` of this repository, beside the package).
CLIENT_SCRIPT = Path(__file__).resolve().parents[2] / "custom" / "fl_client.py"


def _add_client_api(job: FedJob, config: dict[str, Any]) -> None:
    """Sites run ``custom/fl_client.py`` (ScriptRunner, in-process) with ``config`` shipped beside it."""
    import hashlib
    import json
    import tempfile

    from nvflare.job_config.script_runner import FrameworkType, ScriptRunner

    from fl_plugins.atomic_io import atomic_write_json
    from fl_plugins.flare.client_api import CONFIG_FILE

    if not CLIENT_SCRIPT.is_file():
        raise ValueError(f"client='client_api' needs the script {CLIENT_SCRIPT} (custom/ of the fl_plugins repository; "
                         "install fl_plugins from a checkout with 'pip install -e .')")
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / "fl_plugins_client_api" / digest
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(config, folder / CONFIG_FILE, sort_keys=True)
    # the handlers exchange numpy arrays (as the executor path); the script is found by name in the job's custom
    # folder on the sites, where it is shipped explicitly (ScriptRunner would resolve it against the current folder)
    runner = ScriptRunner(script=CLIENT_SCRIPT.name, script_args=f"--config {CONFIG_FILE}",  # a str: nvflare 2.9 in-process splits it
                          framework=FrameworkType.NUMPY)
    cwd = os.getcwd()
    os.chdir(CLIENT_SCRIPT.parent)  # ScriptRunner checks the (relative) script exists when it is added
    try:
        job.to_clients(runner)
    finally:
        os.chdir(cwd)
    job.add_file_to_clients(str(CLIENT_SCRIPT))
    job.add_file_to_clients(str(folder / CONFIG_FILE))


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
    open_keys: dict[str, frozenset[str] | dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:  # every job: the fl.* settings that may be null (FL_NULLABLE)
        fl = self.open_keys.get("fl", {})
        self.open_keys = {**self.open_keys, "fl": {**FL_NULLABLE, **(fl if isinstance(fl, dict) else {})}}


def _with_fl_defaults(defaults: dict[str, Any]) -> dict[str, Any]:
    """Every FLSettings field is a known ``fl.*`` setting of every job (values: the job's, else FLSettings')."""
    from dataclasses import asdict

    out = copy.deepcopy(defaults)
    out["fl"] = {**asdict(FLSettings()), **defaults.get("fl", {})}
    return out


def _finetune_builder(name: str, s: dict[str, Any]) -> FedJob:
    fl = FLSettings(**s["fl"])
    model_cfg = s["model"]
    trainer = {**s["trainer"], "seed": fl.seed}  # the job's seed: data order, augmentation, dropout per round
    finetune_config(model_cfg, trainer, fl.num_rounds)  # a bad trainer setting fails here, not on the sites
    args = {"model": model_cfg, "trainer": trainer, "image_size": s["image_size"],
            "num_labelled_patients": s["num_labelled_patients"], "total_rounds": fl.num_rounds}
    return build_fedavg_job(name, "finetune", args, fl, model_config=model_cfg, exclude_vars=_non_federated(model_cfg))


def _non_federated(model_cfg: dict[str, Any]) -> str:
    """Regex of the model's state keys that never cross the wire (from the engine's state taxonomy)."""
    from fl_plugins.engine.finetune import non_federated_regex
    from fl_plugins.models.factory import build_model

    cfg = dict(model_cfg)
    if "pretrained" in cfg:
        cfg["pretrained"] = None  # the structure is all we need here; the server loads the file at run time
    return non_federated_regex(build_model(cfg)) or NON_FEDERATED_BUFFERS


_UNET_SETTINGS = dict(UNET_DEFAULTS)  # build_unet keyword defaults: the settable U-Net keys of finetune_seg_unet


def _finetune_trainer_fields() -> dict[str, Any]:
    """The optimisation settings of :class:`~fl_plugins.engine.finetune.FinetuneConfig` a fine-tuning job may set
    under ``trainer`` beside its defaults (e.g. ``--set trainer.warmup_steps=60``), with the dataclass defaults;
    ``total_steps`` (rounds x steps), ``seed`` (``fl.seed``), ``model`` and ``device`` are set by the job."""
    import dataclasses

    from fl_plugins.engine.finetune import FinetuneConfig

    keep = ("min_lr_ratio", "warmup_steps", "weight_decay", "optimizer", "grad_clip", "aug_flip", "aug_rot90")
    return {f.name: f.default for f in dataclasses.fields(FinetuneConfig) if f.name in keep}


_FT_TRAINER = _finetune_trainer_fields()
_SEG_TRAINER = {"lr": 1e-3, "batch_size": 8, "steps_per_round": 10}  # CPU quickstart size; raise for real runs
_VIT = {"name": "vit_tiny_patch16_224", "img_size": 64, "patch_size": 8, "in_chans": 1, "depth": 6}

JOBS: dict[str, JobSpec] = {
    "finetune_seg_unet": JobSpec(
        name="finetune_seg_unet",
        description="Segmentation fine-tuning, MONAI U-Net from scratch (the honest baseline) or from a "
        "unet_inpaint_pretrain export (--pretrained), FedAvg",
        defaults={
            "fl": {"num_rounds": 2, "min_clients": 2, "key_metric": "val_dice"},
            "model": {"arch": "unet", "num_classes": 3},
            "trainer": dict(_SEG_TRAINER, task="segmentation"),
            "image_size": 64,
            "num_labelled_patients": None,
        },
        builder=_finetune_builder,
        # model.pretrained: a unet_inpaint_pretrain export (flssl export-backbone), every tensor but the output
        # block loads; the U-Net settings can be set (they must equal the pretraining job's unet_inpaint.unet)
        open_keys={"model": {"pretrained": None, **{k: v for k, v in _UNET_SETTINGS.items() if k != "num_classes"}},
                   "trainer": _FT_TRAINER},
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
        open_keys={"trainer": _FT_TRAINER},
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
            "trainer": {"task": "classification", "lr": 5e-4, "batch_size": 16, "steps_per_round": 10,
                        "class_weighting": "none"},
            "image_size": 32,
            "num_labelled_patients": None,
        },
        builder=_finetune_builder,
        # volumes: --set model.spatial_dims=3 (the 2D ViT over model.num_slices evenly spaced slices, default 8)
        open_keys={"model": {"spatial_dims": 2, "num_slices": 8}, "trainer": _FT_TRAINER},
    ),
    "finetune_cls_cnn": JobSpec(
        name="finetune_cls_cnn",
        description="Classification fine-tuning, MONAI ResNet-10 from scratch (the CNN baseline; 2D images or, with "
        "model.spatial_dims=3, volumes), FedAvg",
        defaults={
            "fl": {"num_rounds": 2, "min_clients": 2, "key_metric": "val_accuracy"},
            "model": {"arch": "cnn_classifier", "num_classes": 2, "spatial_dims": 2, "depth": 10,
                      "in_channels": 1, "widen_factor": 0.25},
            "trainer": {"task": "classification", "lr": 1e-3, "batch_size": 16, "steps_per_round": 10,
                        "class_weighting": "none"},
            "image_size": 28,
            "num_labelled_patients": None,
        },
        builder=_finetune_builder,
        open_keys={"trainer": _FT_TRAINER},
    ),
}


def job_names() -> list[str]:
    return sorted(JOBS)


def build_job(name: str, overrides: dict[str, Any] | None = None) -> FedJob:
    """Build the registered job ``name`` with nested ``overrides`` (unknown keys are rejected)."""
    if name not in JOBS:
        raise ValueError(f"unknown job {name!r}; available jobs: {job_names()}")
    spec = JOBS[name]
    settings = merge_settings(_with_fl_defaults(spec.defaults), overrides or {}, open_keys=spec.open_keys)
    return spec.builder(name, settings)


def job_settings(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    if name not in JOBS:
        raise ValueError(f"unknown job {name!r}; available jobs: {job_names()}")
    return merge_settings(_with_fl_defaults(JOBS[name].defaults), overrides or {}, open_keys=JOBS[name].open_keys)


def export_jobs(out_dir: str | Path, names: list[str] | None = None) -> list[Path]:
    """Export the ready jobs, through their Recipes (``fl_plugins.flare.recipes``), as FLARE job folders."""
    from fl_plugins.flare.recipes import recipe_for

    out = Path(out_dir)
    paths = []
    for n in names or job_names():
        recipe_for(n).export(str(out))
        paths.append(out / n)
    return paths


def non_federated_regex_of(method: Any) -> str | None:
    """Regex matching exactly the method's non-federated wire keys (its site and rebuilt state), or None."""
    import re

    tax = method.state_taxonomy()
    keys = sorted(set(tax["site"]) | set(tax["rebuilt"]))
    return "^(" + "|".join(re.escape(k) for k in keys) + ")$" if keys else None


def build_pretrain_job(
    name: str,
    method: str,
    config: dict[str, Any],
    fl: dict[str, Any] | None = None,
    steps_per_round: int = 5,
    knn_every: int = 1,
    knn_max_items: int = 256,
    views: dict[str, Any] | None = None,
    imports: list[str] | None = None,
    plugin_files: list[str] | None = None,
    client: str = "executor",
    spatial_dims: int | None = None,
    preview_every: int | None = None,
) -> FedJob:
    """A federated pretraining job of any registered method (a plugin's too): FedAvg of its federated state.

    Args:
        name: job name.
        method: registered method name; a plugin's module must be listed in ``imports`` (and, to ship it with the
            job, its file in ``plugin_files``).
        config: the method's config dict (``seed`` and, if present, ``total_steps`` handled as in SSLHandler).
        fl: ``FLSettings`` fields (validated).
        steps_per_round / knn_every / knn_max_items / views: :class:`~fl_plugins.flare.ssl_handler.SSLHandler`.
        client: ``"executor"`` or ``"client_api"`` (see :func:`build_fedavg_job`).
        spatial_dims / preview_every: :class:`~fl_plugins.flare.ssl_handler.SSLHandler` arguments, passed only when
            given (None: the handler's default).
    """
    from fl_plugins.methods import build, import_plugins

    settings = FLSettings(**{"key_metric": "knn_accuracy", **(fl or {})})
    import_plugins(imports or [])
    config = {**config, "seed": config.get("seed", settings.seed)}
    exclude = non_federated_regex_of(build(method, dict(config)))  # validates the config here, not on the sites
    args = {"method": method, "config": dict(config), "steps_per_round": steps_per_round,
            "total_rounds": settings.num_rounds, "knn_every": knn_every, "knn_max_items": knn_max_items,
            "views": dict(views or {})}
    if spatial_dims is not None:
        args["spatial_dims"] = int(spatial_dims)
    if preview_every is not None:
        args["preview_every"] = int(preview_every)
    return build_fedavg_job(name, "ssl", args, settings, method=method, method_config=dict(config),
                            exclude_vars=exclude, imports=imports, client=client, plugin_files=plugin_files)


def _dino_builder(name: str, s: dict[str, Any]) -> FedJob:
    from fl_plugins.flare.ssl_handler import MODE_EXCLUDE_REGEX

    fl = FLSettings(**s["fl"])
    dino = dict(s["dino"])
    dino.setdefault("seed", fl.seed)  # the job's seed (mixed with each site's name on the sites)
    if dino.get("total_steps") is None:
        dino["total_steps"] = s["steps_per_round"] * fl.num_rounds
    try:  # validate early: a bad value is named when the job is built, not on the sites at run time
        cfg = DINOConfig.from_dict(dict(dino))
    except TypeError as e:
        raise ValueError(f"dino settings: {e}") from e
    views = dict(s["views"])
    cfg.training_views(views)  # validated here too: a bad view setting is named when the job is built
    args = {"dino": dino, "steps_per_round": s["steps_per_round"], "total_rounds": fl.num_rounds,
            "knn_every": s["knn_every"], "knn_max_items": s["knn_max_items"], "views": views}
    mode = dino.get("federation_mode", "A")
    return build_fedavg_job(name, "dino", args, fl, method="dino", method_config=dino,
                            exclude_vars=MODE_EXCLUDE_REGEX[mode])


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

_DINO_FIELDS = DINOConfig().to_dict()  # field -> default (its type checks --set values)

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


# ---------------------------------------------------------------------------------------------------------------------
# Masked image modelling jobs (generic SSLHandler, registered methods): the settings section is named after the
# method (``--set unet_inpaint.mask_ratio=0.6``); every field of the method's config can be set, the config class
# validates the values when the job is built.
# ---------------------------------------------------------------------------------------------------------------------


def _method_job_builder(method: str, section: str, spatial_dims_of: Callable[[dict[str, Any]], int]
                        ) -> Callable[[str, dict[str, Any]], FedJob]:
    """Builder of a pretraining job of the registered ``method`` whose config is the settings' ``section``."""

    def builder(name: str, s: dict[str, Any]) -> FedJob:
        fl = FLSettings(**s["fl"])
        cfg = dict(s[section])
        cfg.setdefault("seed", fl.seed)  # the job's seed (mixed with each site's name on the sites)
        if cfg.get("total_steps") is None:  # the schedule horizon: every local step of the job
            cfg["total_steps"] = s["steps_per_round"] * fl.num_rounds
        try:
            dims = spatial_dims_of(cfg)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{section} settings: {e}") from e
        return build_pretrain_job(name, method, cfg, fl=dict(s["fl"]), steps_per_round=s["steps_per_round"],
                                  knn_every=s.get("knn_every", 0), knn_max_items=s.get("knn_max_items", 256),
                                  spatial_dims=dims, preview_every=s["preview_every"])

    return builder


def _unet_dims(cfg: dict[str, Any]) -> int:
    return int({**UNET_DEFAULTS, **dict(cfg.get("unet") or {})}["spatial_dims"])


def _inpaint_fields() -> tuple[dict[str, Any], dict[str, Any]]:
    from fl_plugins.methods.unet_inpaint import InpaintConfig

    return InpaintConfig().to_dict(), dict(UNET_DEFAULTS)


_INPAINT_FIELDS, _UNET_FIELDS = _inpaint_fields()

JOBS["unet_inpaint_pretrain"] = JobSpec(
    name="unet_inpaint_pretrain",
    description="Federated masked-inpainting pretraining of the whole finetune_seg_unet U-Net (de Mooij et al. "
    "2024) on unlabelled images, FedAvg, ssl/preview images in TensorBoard; export-backbone -> finetune_seg_unet "
    "--pretrained",
    # CPU defaults: InpaintConfig's (64 px, 8 px patches, mask 0.75, the fine-tuning job's U-Net) but batch 16 (as
    # dino_pretrain; a site needs at least batch_size training slices: the test sites have 24). GPU: --set
    # unet_inpaint.image_size=256 --set unet_inpaint.patch_size=32 --set unet_inpaint.batch_size=128
    # --set steps_per_round=100 --rounds 100 (fine-tune with the same image size and U-Net settings).
    defaults={
        "fl": {"num_rounds": 2, "min_clients": 2, "key_metric": None},  # no k-NN monitor: a U-Net outputs images
        "unet_inpaint": {"unet": {}, "image_size": 64, "patch_size": 8, "mask_ratio": 0.75, "batch_size": 16,
                         "lr": 1e-3},
        "steps_per_round": 5,
        "preview_every": 1,
    },
    builder=_method_job_builder("unet_inpaint", "unet_inpaint", _unet_dims),
    # every InpaintConfig field (e.g. --set unet_inpaint.loss=l1) and every U-Net setting
    # (--set 'unet_inpaint.unet.channels=[8,16,32,64,128]'; the fine-tuning job's model must match)
    open_keys={"unet_inpaint": _INPAINT_FIELDS, "unet_inpaint.unet": _UNET_FIELDS},
)


def _mae_dims(cfg: dict[str, Any]) -> int:
    return int(cfg.get("spatial_dims", 2))


def _mae_fields() -> tuple[dict[str, Any], dict[str, Any]]:
    from fl_plugins.methods.mae_config import MAEConfig
    from fl_plugins.models.backbone import BackboneSpec

    return MAEConfig().to_dict(), BackboneSpec().to_dict()


_MAE_FIELDS, _BACKBONE_FIELDS = _mae_fields()
_VIT3D = {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "in_chans": 1, "depth": 6}

for _job, _dims, _backbone, _what in (
    ("mae_vit_pretrain", 2, dict(_VIT), "a 2D timm ViT on unlabelled images (or SimMIM: --set mae.variant=simmim); "
     "export-backbone -> finetune_seg_vit / finetune_cls --pretrained"),
    ("mae3d_pretrain", 3, dict(_VIT3D), "a 3D ViT (MONAI MaskedAutoEncoderViT, the ViT-tiny width) on unlabelled "
     "volumes (3D MedMNIST, e.g. AdrenalMNIST3D, or Decathlon data split with --volumes); export-backbone -> a MONAI ViT state_dict (UNETR's vit.*)"),
):
    JOBS[_job] = JobSpec(
        name=_job,
        description=f"Federated MAE pretraining of {_what}; FedAvg, k-NN monitor, ssl/preview images",
        # CPU defaults: MAEConfig's (mask 0.75, decoder 192-d x 2 blocks) but lr 1e-3 (below), with the
        # dino_pretrain ViT (64 px, patch 8, 6 blocks; 3D: 32^3 volumes, patch 8 = 64 tokens) and batch 16 (a site
        # needs at least batch_size training images). GPU, 2D (MAE's ViT-B recipe): --set
        # mae.backbone.name=vit_base_patch16_224 --set mae.backbone.img_size=224 --set mae.backbone.patch_size=16
        # --set mae.backbone.depth=12 --set mae.decoder_dim=512 --set mae.decoder_depth=8 --set
        # mae.decoder_heads=16 --set mae.norm_pix_loss=true --set mae.batch_size=128 --set steps_per_round=100
        # --rounds 100; 3D: --set mae.backbone.img_size=64 --set mae.backbone.depth=12 --set mae.batch_size=64.
        defaults={
            "fl": {"num_rounds": 2, "min_clients": 2, "key_metric": "knn_accuracy"},
            # lr 1e-3 [R]: MAE's scaling rule (1.5e-4 x batch / 256) gives 9e-6 at batch 16, which barely moves a
            # model in a CPU run; 1e-3 took the masked MSE on PneumoniaMNIST from 0.39 to 0.013 in 360 steps
            # (docs/results/mim_real_data.md section 2). On a GPU at batch >= 256 use the rule (--set mae.lr=null).
            "mae": {"variant": "mae", "spatial_dims": _dims, "backbone": _backbone, "batch_size": 16, "lr": 1e-3},
            "steps_per_round": 5,
            "knn_every": 1,
            "knn_max_items": 256,
            "preview_every": 1,
        },
        builder=_method_job_builder("mae", "mae", _mae_dims),
        # every MAEConfig field (e.g. --set mae.mask_ratio=0.6 --set mae.lr=1e-3) and every backbone field
        open_keys={"mae": _MAE_FIELDS, "mae.backbone": _BACKBONE_FIELDS},
    )


# ---------------------------------------------------------------------------------------------------------------------
# Stage-wise federated fine-tuning (MedUniverse, methods-spec section 6): one base backbone improved stage by stage by
# sites with different classification tasks; heads stay on the sites (fl_plugins.flare.stagewise / stage_handler).
# ---------------------------------------------------------------------------------------------------------------------

#: the stage settings (fl_plugins.flare.stagewise.StagewiseController arguments)
_STAGEWISE = {"num_stages": 3, "k_per_stage": 2, "schedule": "parallel", "weighting": "uniform", "damping": 1.0,
              "norm_bound": DEFAULT_NORM_BOUND, "validate_every_stage": True, "stage_timeout": 0}
#: FinetuneConfig fields a stage-wise site's trainer takes (model, task and steps_per_round are set by the job)
_STAGE_TRAINER_FIELDS = {"lr": 1e-3, "min_lr_ratio": 0.1, "warmup_steps": 0, "total_steps": None,
                         "weight_decay": 1e-5, "optimizer": "adamw", "batch_size": 8, "num_workers": 0,
                         "aug_flip": True, "aug_rot90": True, "grad_clip": None, "device": "cpu",
                         "class_weighting": "none"}


def _stagewise_builder(name: str, s: dict[str, Any]) -> FedJob:
    from fl_plugins.engine.finetune import FinetuneConfig
    from fl_plugins.engine.stagewise import stage_backbone_spec
    from fl_plugins.flare.executor import HandlerExecutor
    from fl_plugins.flare.handlers import handler_class
    from fl_plugins.flare.stagewise import StageBasePersistor, StagewiseController

    fl = FLSettings(**s["fl"])
    sw = dict(s["stagewise"])
    default_rounds = JOBS[name].defaults["fl"]["num_rounds"]
    if fl.num_rounds not in (default_rounds, sw["num_stages"]):
        raise ValueError(f"job {name!r} counts stages, not rounds: set stagewise.num_stages={fl.num_rounds} instead of "
                         f"fl.num_rounds (--rounds)")
    if fl.update_norm_bound not in (DEFAULT_NORM_BOUND, sw["norm_bound"]):
        raise ValueError(f"job {name!r}: set stagewise.norm_bound instead of fl.update_norm_bound")
    # fl.controller / fl.aggregator: this job has its own workflow and aggregate (StagewiseController,
    # StageAggregator); "fedavg" / "weighted_average" are the only values FLSettings accepts and are not used here
    model_cfg = dict(s["model"])
    stage_backbone_spec(model_cfg)  # a bad backbone setting is named when the job is built
    trainer = {**s["trainer"], "seed": fl.seed}
    steps = trainer.pop("steps_per_stage")
    FinetuneConfig.from_dict({**trainer, "steps_per_round": steps, "task": "classification",  # validated here too
                              "model": {**model_cfg, "pretrained": None}})
    job = FedJob(name=name, min_clients=fl.min_clients)
    job.set_app_packages(["fl_plugins"])
    controller = StagewiseController(
        num_clients=fl.min_clients, num_stages=sw["num_stages"], k_per_stage=sw["k_per_stage"],
        schedule=sw["schedule"], weighting=sw["weighting"], damping=sw["damping"], norm_bound=sw["norm_bound"],
        validate_every_stage=sw["validate_every_stage"], stage_timeout=sw["stage_timeout"],
        key_metric=fl.key_metric or "val_accuracy", task_check_period=fl.task_check_period,
        round_timeout=fl.round_timeout, **({"resume_from": fl.resume_from} if fl.resume_from else {}))
    job.to_server(controller, id="controller")
    job.to_server(StageBasePersistor(model_config=model_cfg, seed=fl.seed), id="persistor")
    job.to_server(TBAnalyticsReceiver(events=["fed.analytix_log_stats"]), id="tb_receiver")
    job.to_server({"server": {"task_request_interval": fl.task_request_interval}})
    args = {"model": {k: v for k, v in model_cfg.items() if k != "pretrained"},  # the base comes from the server
            "trainer": {**trainer, "steps_per_stage": steps}, "image_size": s["image_size"],
            "num_slices": s["volume"]["num_slices"], "num_stages": sw["num_stages"]}
    job.to_clients(HandlerExecutor(handler="stagewise", handler_args=args, memory_gc_rounds=fl.client_memory_gc_rounds),
                   tasks=list(handler_class("stagewise").TASKS))
    job.to_clients(ConvertToFedEvent(events_to_convert=["analytix_log_stats"], fed_event_prefix="fed."), id="event_to_fed")
    if fl.quantization:
        _add_stage_quantization(job, fl.quantization)
    if fl.inline_weights:
        job.to_server({"np_download_chunk_size": 0})
        job.to_clients({"np_download_chunk_size": 0})
    return job


def _add_stage_quantization(job: FedJob, kind: str) -> None:
    """nvflare's quantization filters on the stage-wise tasks: the base is quantized on the way out (stage_finetune,
    validate), the returned backbone on the way back (stage_finetune; validate answers carry no params)."""
    from nvflare.app_opt.pt.quantization.dequantizer import ModelDequantizer
    from nvflare.app_opt.pt.quantization.quantizer import ModelQuantizer
    from nvflare.job_config.defs import FilterType

    from fl_plugins.wire import TASK_STAGE_FINETUNE, TASK_VALIDATE

    out, back = [TASK_STAGE_FINETUNE, TASK_VALIDATE], [TASK_STAGE_FINETUNE]
    job.to_server(ModelQuantizer(quantization_type=kind), filter_type=FilterType.TASK_DATA, tasks=out)
    job.to_server(ModelDequantizer(), filter_type=FilterType.TASK_RESULT, tasks=back)
    job.to_clients(ModelDequantizer(), filter_type=FilterType.TASK_DATA, tasks=out)
    job.to_clients(ModelQuantizer(quantization_type=kind), filter_type=FilterType.TASK_RESULT, tasks=back)


JOBS["meduniverse_stagewise"] = JobSpec(
    name="meduniverse_stagewise",
    description="Stage-wise federated fine-tuning (MedUniverse): one ViT backbone (model.pretrained: a "
    "mae_vit_pretrain export) improved stage by stage by sites with different classification tasks (2D images or 3D "
    "volumes over slices); heads stay on the sites",
    # CPU defaults: the mae_vit_pretrain backbone (64 px, patch 8, 6 blocks) so its export loads; 3 stages of 20 local
    # steps, K = 2 results per stage. model.num_classes is not used by the sites (each sizes its head from its own
    # datalist); it only sizes the model of flssl simulate's --pretrained report.
    defaults={
        "fl": {"num_rounds": 3, "min_clients": 2, "key_metric": "val_accuracy"},
        "stagewise": dict(_STAGEWISE),
        "model": {"arch": "vit_classifier", "num_classes": 2, "head": "linear", "backbone": dict(_VIT),
                  "pretrained": None},
        "trainer": {"lr": 2e-4, "batch_size": 16, "steps_per_stage": 20, "class_weighting": "none"},
        "image_size": 64,
        "volume": {"num_slices": 8},  # 3D sites: slices per volume through the 2D backbone (null = all)
    },
    builder=_stagewise_builder,
    open_keys={"stagewise": {"norm_bound": DEFAULT_NORM_BOUND}, "model.backbone": _BACKBONE_FIELDS,
               "trainer": _STAGE_TRAINER_FIELDS, "volume": {"num_slices": 8}},
)


# ---------------------------------------------------------------------------------------------------------------------
# Federated contrastive learning with feature exchange (FCL, methods-spec 7): the fcl task handler on the sites, the
# FCLController (an extract_features phase before every training task) on the server.
# ---------------------------------------------------------------------------------------------------------------------

#: what leaves a site each round besides the weights (FCLHandler / FCLController arguments; docs/privacy_fcl.md)
_FCL_EXCHANGE = {
    "enabled": True,  # false: the no-exchange baseline (local terms only, FedAvg)
    "share_features": True,  # a site's datalist "feature_sharing" can only tighten these
    "max_features": 1024,  # bound on features per site per round [R: 7.4 example, 1,000 per client]
    "feature_noise_std": 0.0,  # Gaussian noise per coordinate before re-normalising (0 = off)
    "feature_dtype": "float32",  # or "float16" (half the bytes)
    "timeout": 0,  # seconds for the extraction answers (0 = no limit)
}
_FCL_DEFAULTS = {"backbone": {"kind": "unet_encoder"}, "image_size": 64, "volumes_per_batch": 8, "lr": 3e-4}


def _fcl_fields() -> dict[str, Any]:
    from fl_plugins.methods.fcl import FCLConfig

    return FCLConfig().to_dict()


def _fcl_builder(name: str, s: dict[str, Any]) -> FedJob:
    from fl_plugins.methods import build

    fl = FLSettings(**s["fl"])
    if fl.controller != "fcl":
        raise ValueError(f"job {name!r} needs fl.controller='fcl' (its feature exchange), got {fl.controller!r}")
    cfg = dict(s["fcl"])
    cfg.setdefault("seed", fl.seed)
    if cfg.get("total_steps") is None:
        cfg["total_steps"] = s["steps_per_round"] * fl.num_rounds
    method = build("fcl", dict(cfg))  # validates every setting when the job is built
    ex = dict(s["exchange"])
    unknown = sorted(set(ex) - set(_FCL_EXCHANGE))
    if unknown:
        raise ValueError(f"unknown exchange setting(s) {unknown}; known: {sorted(_FCL_EXCHANGE)}")
    ex = {**_FCL_EXCHANGE, **ex}
    from fl_plugins.flare.fcl_handler import FEATURE_DTYPES

    if ex["feature_dtype"] not in FEATURE_DTYPES:
        raise ValueError(f"exchange.feature_dtype must be one of {sorted(FEATURE_DTYPES)}, got {ex['feature_dtype']!r}")
    args = {"config": cfg, "steps_per_round": s["steps_per_round"], "total_rounds": fl.num_rounds,
            "share_features": ex["share_features"], "max_features": ex["max_features"],
            "feature_noise_std": ex["feature_noise_std"], "feature_dtype": ex["feature_dtype"]}
    controller_args = {"feature_dim": method.config.proj_dim, "num_partitions": method.config.num_partitions,
                       "max_features_per_site": ex["max_features"], "exchange": ex["enabled"],
                       "exchange_timeout": ex["timeout"]}
    return build_fedavg_job(name, "fcl", args, fl, method="fcl", method_config=cfg,
                            exclude_vars=non_federated_regex_of(method), controller_args=controller_args)


_FCL_FIELDS = _fcl_fields()

for _job, _enabled, _what in (
    ("fcl_pretrain", True, "with feature exchange and global structural matching (FCL)"),
    ("fcl_noexchange_pretrain", False, "without feature exchange (the baseline: local terms only)"),
):
    JOBS[_job] = JobSpec(
        name=_job,
        description=f"Federated contrastive learning {_what} of the finetune_seg_unet U-Net encoder on unlabelled "
        "slices of volumes, FedAvg; export-backbone -> finetune_seg_unet --pretrained",
        defaults={
            "fl": {"num_rounds": 2, "min_clients": 2, "key_metric": None, "controller": "fcl"},
            "fcl": dict(_FCL_DEFAULTS),
            "steps_per_round": 5,
            "exchange": {**_FCL_EXCHANGE, "enabled": _enabled},
        },
        builder=_fcl_builder,
        # every FCLConfig field (--set fcl.temperature=0.2) and the U-Net settings of the encoder
        open_keys={"fcl": _FCL_FIELDS, "fcl.backbone": {"kind": "unet_encoder", **_UNET_FIELDS}},
    )


# ---------------------------------------------------------------------------------------------------------------------
# FCLOpt (methods-spec 7.8, reconstructed): BYOL-style, no negatives, no feature exchange; the target averaged
# (fclopt_pretrain) or predicted by PTNU with DP uploads (fclopt_ptnu_dp_pretrain; PTNU alone: dp_threshold=null).
# ---------------------------------------------------------------------------------------------------------------------

_FCLOPT_DEFAULTS = {"backbone": {"kind": "unet_encoder"}, "image_size": 64, "volumes_per_batch": 8, "lr": 3e-4}


def _fclopt_fields() -> dict[str, Any]:
    from fl_plugins.methods.fclopt import FCLOptConfig

    return FCLOptConfig().to_dict()


def _fclopt_builder(name: str, s: dict[str, Any]) -> FedJob:
    from fl_plugins.flare.fclopt_handler import check_dp_threshold
    from fl_plugins.methods import build

    fl = FLSettings(**s["fl"])
    if fl.controller != "fclopt":
        raise ValueError(f"job {name!r} needs fl.controller='fclopt' (its accounting and PTNU), got {fl.controller!r}")
    cfg = dict(s["fclopt"])
    cfg.setdefault("seed", fl.seed)
    if cfg.get("total_steps") is None:
        cfg["total_steps"] = s["steps_per_round"] * fl.num_rounds
    method = build("fclopt", dict(cfg))  # validates every setting when the job is built
    ptnu = method.config.target_mode == "ptnu"
    delta = check_dp_threshold(s.get("dp_threshold"), "dp_threshold")
    if delta is not None and not ptnu:
        raise ValueError("dp_threshold needs fclopt.target_mode='ptnu' (set dp_threshold=null for FCLOpt alone)")
    if ptnu and fl.quantization:
        raise ValueError(f"fclopt.target_mode='ptnu' needs unquantised weights (every party predicts the target from "
                         f"the same float32 values): set fl.quantization=null, got {fl.quantization!r}")
    args = {"config": cfg, "steps_per_round": s["steps_per_round"], "total_rounds": fl.num_rounds,
            "dp_threshold": delta}
    controller_args = {"ptnu": ptnu, "dp": delta is not None, "target_momentum": method.config.target_momentum,
                       "local_steps": s["steps_per_round"]}
    return build_fedavg_job(name, "fclopt", args, fl, method="fclopt", method_config=cfg,
                            exclude_vars=non_federated_regex_of(method), controller_args=controller_args)


_FCLOPT_FIELDS = _fclopt_fields()

for _job, _mode, _delta, _what in (
    ("fclopt_pretrain", "fedavg", None, "FCLOpt (no negatives, no feature exchange; online, predictor and target "
     "averaged)"),
    ("fclopt_ptnu_dp_pretrain", "ptnu", 1e-3, "FCLOpt + PTNU (the target is predicted by every party, never "
     "downloaded) + DP (a site uploads its target only when it strays from the prediction by more than "
     "dp_threshold; PTNU alone: --set dp_threshold=null)"),
):
    JOBS[_job] = JobSpec(
        name=_job,
        description=f"Communication-efficient federated contrastive learning: {_what}, of the finetune_seg_unet "
        "U-Net encoder on unlabelled slices of volumes; bytes per site and round in TensorBoard and "
        "communication.json; export-backbone -> finetune_seg_unet --pretrained",
        defaults={
            "fl": {"num_rounds": 2, "min_clients": 2, "key_metric": None, "controller": "fclopt"},
            "fclopt": {**_FCLOPT_DEFAULTS, "target_mode": _mode},
            "steps_per_round": 5,
            "dp_threshold": _delta,
        },
        builder=_fclopt_builder,
        open_keys={"fclopt": _FCLOPT_FIELDS, "fclopt.backbone": {"kind": "unet_encoder", **_UNET_FIELDS},
                   "": {"dp_threshold": 1e-3}},
    )
