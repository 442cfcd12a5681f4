"""Does a site's data fit a ready job? The check each job gets is derived from its JobSpec (``data``, ``dims``,
``dims_key``, ``jobs_by_dims``): run by ``flssl check-data --job`` and the pre-flight of ``flssl simulate``."""

from __future__ import annotations

from typing import Any

from fl_plugins.flare.data_check import finetune_data_problems, pretrain_dims_problems
from fl_plugins.flare.jobs import job_spec

__all__ = ["job_data_problems", "job_dims"]


def job_dims(job: str, settings: dict[str, Any]) -> int | None:
    """The image dimensionality (2 or 3) the job ``job`` trains on with merged ``settings``; None if it is per site."""
    spec = job_spec(job)
    if spec.dims is not None:
        return int(spec.dims(settings))
    if spec.data == "finetune":
        return int(settings["model"].get("spatial_dims", 2))
    return None


def job_data_problems(job: str, settings: dict[str, Any], dl: dict[str, Any]) -> list[str]:
    """Mismatches between the job ``job`` with merged ``settings`` and a loaded datalist ``dl`` (empty: it fits)."""
    spec = job_spec(job)
    if spec.data == "finetune":
        return finetune_data_problems(settings["trainer"]["task"], settings["model"], dl, job)
    if spec.data == "pretrain":
        return pretrain_dims_problems(job, int(spec.dims(settings)), dl, spec.jobs_by_dims, spec.dims_key)
    return []  # "per_site": each site's handler checks its own task when it starts
