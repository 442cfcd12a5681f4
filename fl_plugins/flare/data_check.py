"""Does a site's data fit a job? The checks themselves: fine-tuning (task, classes, channels, 2D/3D against the
model) and pretraining (2D/3D). Which check a ready job gets is its JobSpec's ``data`` kind
(:func:`fl_plugins.flare.jobs.data_fit.job_data_problems`, run by ``flssl check-data --job`` and the pre-flight of
``flssl simulate``, before FLARE starts); the handlers run the same checks when a site starts. Each problem names the
file, the setting to change and its value.
"""

from __future__ import annotations

from typing import Any

__all__ = ["finetune_data_problems", "job_data_notes", "pretrain_dims_problems", "decathlon_mode_fix"]

def decathlon_mode_fix(dl: dict[str, Any], data_dims: int) -> str:
    """The data-side fix when a Decathlon datalist read as ``data_dims``-D items does not fit a job: the datalist
    field ``"volumes"`` (written by ``flssl split --volumes``) switches between 2D slices and whole 3D volumes.
    Empty for other formats (their dimensionality is the files')."""
    if dl.get("format") != "decathlon":
        return ""
    if data_dims == 3:
        return ('read its volumes as 2D slices instead: remove "volumes": true from the datalist (or split again '
                'without --volumes)')
    return 'read its volumes whole (3D) instead: split with flssl split --volumes (datalist field "volumes": true)'


def pretrain_dims_problems(job: str, dims: int, dl: dict[str, Any], jobs_by_dims: dict[int, str],
                           dims_key: str | None = None) -> list[str]:
    """2D/3D of a pretraining job against the datalist's images, with the job (or setting) that fits the data.

    Args:
        job: the job's name; ``dims``: the dimensionality it trains on (from its merged settings).
        jobs_by_dims: the job that fits 2D and the one that fits 3D data (a missing entry: no job fits).
        dims_key: the setting that switches the job's dimensionality (named when the fitting job is this one).
    """
    from fl_plugins.data import data_geometry

    geo = data_geometry(dl)
    if geo.spatial_dims == dims:
        return []
    fit = jobs_by_dims.get(geo.spatial_dims)
    if fit == job and dims_key:  # the job trains the other dimensionality because of a setting
        fix = f"--set {dims_key}={geo.spatial_dims}"
    else:
        other = fit if fit and fit != job else None
        fix = f"use job {other}" if other else f"{geo.spatial_dims}D data is not supported by this job"
        mode = decathlon_mode_fix(dl, geo.spatial_dims)
        if mode:
            fix += f", or {mode}" if other else f": {mode}"
    return [f"datalist {dl.get('datalist_path')!r} holds {geo.spatial_dims}D images ({geo.source}) but job {job!r} "
            f"trains on {dims}D images: {fix}"]


def finetune_data_problems(task: str, model: dict[str, Any], dl: dict[str, Any], job: str | None = None) -> list[str]:
    """Mismatches between a fine-tuning ``task`` / ``model`` config and a loaded datalist: 2D/3D, colour channels,
    task, class count. Used by :func:`job_data_problems` and by the fine-tuning handler when a site starts."""
    from fl_plugins.data import data_geometry

    where, who = f"datalist {dl.get('datalist_path')!r}", f"job {job!r}" if job else "the job"
    problems = _dims_problems(model, dl, job)
    if data_geometry(dl).file_channels == 3 and dl.get("rgb"):
        have = int(model.get("in_channels", model.get("backbone", {}).get("in_chans", 1)))
        if have != 3:
            key = "model.backbone.in_chans" if "backbone" in model else "model.in_channels"
            problems.append(f"{where} keeps RGB images as 3 channels ('rgb': true) but the model takes {have}: "
                            f"--set {key}=3")
    if dl["task"] != task:
        other = "finetune_cls" if dl["task"] == "classification" else "finetune_seg_unet or finetune_seg_vit"
        problems.append(f"{where} is for task {dl['task']!r} but {who} fine-tunes for {task!r}: use job {other}")
    else:
        nc, want = int(model["num_classes"]), int(dl["num_classes"])
        if nc != want:
            problems.append(f"{who} has model.num_classes={nc} but {where} declares num_classes={want}: "
                            f"--set model.num_classes={want}")
    return problems


def _dims_problems(model: dict[str, Any], dl: dict[str, Any], job: str | None) -> list[str]:
    """2D/3D: the data's images against the model's ``spatial_dims`` (default 2), with the setting to change."""
    from fl_plugins.data import data_geometry

    geo = data_geometry(dl)
    model_dims = int(model.get("spatial_dims", 2))
    if geo.spatial_dims == model_dims:
        return []
    if model_dims == 2 and ("spatial_dims" in model or model.get("arch") == "vit_classifier"):
        fix = "--set model.spatial_dims=3"
    elif model_dims == 2:
        fix = "use job finetune_cls_cnn with --set model.spatial_dims=3" if dl["task"] == "classification" \
            else "3D data is not supported by this job"
    else:
        fix = "--set model.spatial_dims=2"
    if decathlon_mode_fix(dl, geo.spatial_dims):
        fix = (f"{fix}: {decathlon_mode_fix(dl, geo.spatial_dims)}" if fix.endswith("not supported by this job")
               else f"{fix}, or {decathlon_mode_fix(dl, geo.spatial_dims)}")
    who = f"job {job!r}" if job else "the job"
    return [f"datalist {dl.get('datalist_path')!r} holds {geo.spatial_dims}D images ({geo.source}) but {who} trains "
            f"a {model_dims}D model: {fix}"]


def job_data_notes(dl: dict[str, Any]) -> list[str]:
    """What the data layer does to these images that a user should know (not errors)."""
    from fl_plugins.data import data_geometry

    geo = data_geometry(dl)
    if geo.file_channels == 3 and not dl.get("rgb"):
        return [f"{geo.source}: RGB images are converted to one grey channel (ITU-R BT.601 luma) by the data layer; "
                "to keep 3 channels split with --rgb (datalist 'rgb': true) and give the model 3 input channels"]
    return []
