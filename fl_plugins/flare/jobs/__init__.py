"""The ready jobs: one :class:`~fl_plugins.flare.jobs.base.JobSpec` per job, one module per job family.

========================  ==============================================================================
module                    jobs
========================  ==============================================================================
``finetune``              finetune_seg_unet, finetune_seg_vit, finetune_cls, finetune_cls_cnn
``pretrain``              dino_pretrain, dinov2_pretrain, unet_inpaint_pretrain, mae_vit_pretrain,
                          mae3d_pretrain, simclr_pretrain (registered methods, the generic ``ssl`` handler)
``stagewise``             meduniverse_stagewise (its own controller)
``contrastive``           fcl_pretrain, fcl_noexchange_pretrain, fclopt_pretrain, fclopt_ptnu_dp_pretrain
========================  ==============================================================================

``base`` holds what they share (FLSettings, JobSpec, the step-horizon rule), ``assembly`` the one job assembly.
:data:`JOBS` is the registry the CLI, the Recipes (``fl_plugins.flare.recipes``, which also exports the job folders), the data checks
(``fl_plugins.flare.data_check``) and the tests read; adding a job is adding its ``JobSpec`` to a family's ``SPECS``.
"""

from __future__ import annotations

from typing import Any

from fl_plugins.flare.jobs import contrastive, finetune, pretrain, stagewise
from fl_plugins.flare.jobs.assembly import CLIENT_PATHS, assemble_job, build_fedavg_job
from fl_plugins.flare.jobs.base import (
    AGGREGATORS,
    CONTROLLERS,
    FL_NULLABLE,
    NON_FEDERATED_BUFFERS,
    QUANTIZATION_TYPES,
    FLSettings,
    JobSpec,
    non_federated_regex_of,
    with_fl_defaults,
)
from fl_plugins.flare.jobs.pretrain import build_pretrain_job
from fl_plugins.settings import merge_settings

__all__ = ["JOBS", "JobSpec", "FLSettings", "build_job", "job_settings", "job_names", "job_spec",
           "build_fedavg_job", "build_pretrain_job", "assemble_job", "non_federated_regex_of", "CONTROLLERS",
           "AGGREGATORS", "FL_NULLABLE", "NON_FEDERATED_BUFFERS", "QUANTIZATION_TYPES", "CLIENT_PATHS"]

#: job name -> its JobSpec, every family's
JOBS: dict[str, JobSpec] = {}
for _family in (finetune, pretrain, stagewise, contrastive):
    for _spec in _family.SPECS:
        if _spec.name in JOBS:
            raise RuntimeError(f"job {_spec.name!r} is defined twice")
        JOBS[_spec.name] = _spec


def job_names() -> list[str]:
    return sorted(JOBS)


def job_spec(name: str) -> JobSpec:
    """The :class:`JobSpec` of the registered job ``name``."""
    if name not in JOBS:
        raise ValueError(f"unknown job {name!r}; available jobs: {job_names()}")
    return JOBS[name]


def job_settings(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The merged settings of job ``name``: its defaults with nested ``overrides`` (unknown keys are rejected)."""
    spec = job_spec(name)
    overrides = dict(overrides or {})
    if spec.compat is not None:
        overrides = spec.compat(overrides, spec.defaults)
    return merge_settings(with_fl_defaults(spec.defaults), overrides, open_keys=spec.open_keys)


def build_job(name: str, overrides: dict[str, Any] | None = None) -> Any:
    """Build the registered job ``name`` (a ``FedJob``) with nested ``overrides`` (unknown keys are rejected)."""
    return job_spec(name).builder(name, job_settings(name, overrides))
