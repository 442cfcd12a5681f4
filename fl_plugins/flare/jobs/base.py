"""What every ready job shares: run-level settings (:class:`FLSettings`), the server workflows and aggregators a
job may name, the one step-horizon rule, and :class:`JobSpec`, the single description of a job.

A :class:`JobSpec` holds every fact of one job: its family (the module under ``fl_plugins.flare.jobs`` that
builds it), the server workflow and site handler it runs, the tasks it declares, the kind of data it checks
(``flssl check-data``), its 2D/3D rule, settings and defaults, and the name of its Recipe class. The job
registry (``JOBS``), the Recipe classes, the data checks and the tests' job sets are all derived from these specs.

Latency knobs (defaults measured in benchmarks/fl_overhead.py): ``server.task_request_interval`` (how long a
client waits before asking again for a task; nvflare's default is 2 s) and the controller's
``task_check_period`` (how often the server checks whether a round's results are in; default 0.5 s).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from fl_plugins.core.schedules import step_horizon
from fl_plugins.flare.controllers import DEFAULT_MEMORY_GC_ROUNDS, DEFAULT_ROUND_TIMEOUT
from fl_plugins.flare.update_check import DEFAULT_NORM_BOUND, check_norm_bound

__all__ = ["FLSettings", "JobSpec", "CONTROLLERS", "AGGREGATORS", "FL_NULLABLE", "NON_FEDERATED_BUFFERS",
           "QUANTIZATION_TYPES", "DATA_KINDS", "with_fl_defaults", "with_step_horizon", "non_federated_regex_of"]

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

#: What a job's data check (fl_plugins.flare.data_check) compares a site's datalist with:
#: "finetune": task, class count, channels and 2D/3D against the model; "pretrain": 2D/3D against the job's
#: ``dims`` rule; "per_site": nothing job-wide (each site has its own task, checked by its handler when it starts).
DATA_KINDS = ("finetune", "pretrain", "per_site")


def load_ref(ref: str) -> Any:
    """The object of a ``"module:name"`` reference."""
    import importlib

    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


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


def with_step_horizon(cfg: dict[str, Any], steps_per_round: int, num_rounds: int) -> dict[str, Any]:
    """``cfg`` with ``total_steps`` (the schedule horizon) filled in when unset or None, by the one rule
    :func:`fl_plugins.core.schedules.step_horizon`; the sites' handlers apply the same rule."""
    out = dict(cfg)
    if out.get("total_steps") is None:
        out["total_steps"] = step_horizon(steps_per_round, num_rounds)
    return out


def non_federated_regex_of(method: Any) -> str | None:
    """Regex matching exactly the method's non-federated wire keys (its site and rebuilt state), or None."""
    import re

    tax = method.state_taxonomy()
    keys = sorted(set(tax["site"]) | set(tax["rebuilt"]))
    return "^(" + "|".join(re.escape(k) for k in keys) + ")$" if keys else None


@dataclass
class JobSpec:
    """Every fact of one ready job (see the module doc).

    Attributes:
        name: the job's name (folder in ``jobs/``, ``flssl simulate --job``).
        description: one paragraph for ``flssl jobs`` and the Recipe's doc.
        recipe: the name of its Recipe class in ``fl_plugins.flare.recipes`` (e.g. ``"DinoRecipe"``).
        builder: ``(name, merged settings) -> FedJob``.
        defaults: the job's nested settings (``--set`` keys); every ``fl.*`` FLSettings field is added.
        handler: the registered site handler it runs (``fl_plugins.flare.handlers.HANDLERS``).
        workflow: the server workflow: a name in :data:`CONTROLLERS` or ``"stagewise"`` (its own controller).
        data: what ``check-data`` compares a datalist with (:data:`DATA_KINDS`).
        dims: ``settings -> 2 | 3``: the image dimensionality the job trains on (pretraining jobs).
        dims_key: the setting that switches it (``--set <dims_key>=3``), None when fixed.
        jobs_by_dims: the job that fits 2D and the one that fits 3D data (for the data check's fix), if any.
        method / section: the registered method and its settings section (pretraining jobs of a method).
        open_keys: settable keys beyond ``defaults``, per dotted sub-dict path (validated again by the config).
        compat: ``(overrides, defaults) -> overrides``: a compatibility path for old settings (e.g. DINO's
            ``--set dino.variant=dinov2``), applied to the user's overrides before they are merged.
    """

    name: str
    description: str
    recipe: str
    builder: Callable[[str, dict[str, Any]], Any]
    defaults: dict[str, Any]
    handler: str
    workflow: str = "fedavg"
    data: str = "pretrain"
    dims: Callable[[dict[str, Any]], int] | None = None
    dims_key: str | None = None
    jobs_by_dims: dict[int, str] = field(default_factory=dict)
    method: str | None = None
    section: str | None = None
    open_keys: dict[str, frozenset[str] | dict[str, Any]] = field(default_factory=dict)
    compat: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if self.data not in DATA_KINDS:
            raise ValueError(f"job {self.name!r}: data must be one of {DATA_KINDS}, got {self.data!r}")
        if self.data == "pretrain" and self.dims is None:
            raise ValueError(f"job {self.name!r}: a pretraining job needs its dims rule")
        if not self.recipe.isidentifier() or not self.recipe.endswith("Recipe"):
            raise ValueError(f"job {self.name!r}: recipe must be a class name ending in 'Recipe', got {self.recipe!r}")
        fl = self.open_keys.get("fl", {})  # every job: the fl.* settings that may be null (FL_NULLABLE)
        self.open_keys = {**self.open_keys, "fl": {**FL_NULLABLE, **(fl if isinstance(fl, dict) else {})}}


def with_fl_defaults(defaults: dict[str, Any]) -> dict[str, Any]:
    """Every FLSettings field is a known ``fl.*`` setting of every job (values: the job's, else FLSettings')."""
    out = copy.deepcopy(defaults)
    out["fl"] = {**asdict(FLSettings()), **defaults.get("fl", {})}
    return out
