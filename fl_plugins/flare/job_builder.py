"""Compatibility path of the job layer: the ready jobs now live in :mod:`fl_plugins.flare.jobs` (one JobSpec per
job, one module per family) and their Recipes and export in :mod:`fl_plugins.flare.recipes`.

Every name that scripts imported from here before (``build_job``, ``job_settings``, ``job_names``, ``JOBS``,
``FLSettings``, ``build_fedavg_job``, ``build_pretrain_job``, ``export_jobs``, ...) is the same object re-exported,
so ``from fl_plugins.flare.job_builder import build_job`` keeps working; new code imports from ``fl_plugins.flare.jobs``.
"""

from __future__ import annotations

from fl_plugins.flare.jobs import (
    AGGREGATORS,
    CLIENT_PATHS,
    CONTROLLERS,
    FL_NULLABLE,
    JOBS,
    NON_FEDERATED_BUFFERS,
    QUANTIZATION_TYPES,
    FLSettings,
    JobSpec,
    assemble_job,
    build_fedavg_job,
    build_job,
    build_pretrain_job,
    job_names,
    job_settings,
    job_spec,
    non_federated_regex_of,
)
from fl_plugins.flare.recipes import export_jobs

__all__ = ["FLSettings", "JobSpec", "JOBS", "build_job", "job_settings", "job_names", "job_spec", "export_jobs",
           "build_fedavg_job", "build_pretrain_job", "assemble_job", "non_federated_regex_of", "CONTROLLERS",
           "AGGREGATORS", "FL_NULLABLE", "NON_FEDERATED_BUFFERS", "QUANTIZATION_TYPES", "CLIENT_PATHS"]
