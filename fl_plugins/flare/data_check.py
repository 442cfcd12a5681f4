"""Does a site's data fit a ready job? Checked in ``flssl check-data --job``, in the pre-flight of ``flssl simulate``
(before FLARE starts) and by the handlers when a site starts; each problem names the file, the setting to change
and its value.
"""

from __future__ import annotations

from typing import Any

__all__ = ["job_data_problems", "job_data_notes"]

_JOB_KIND = {"finetune_seg_unet": "finetune", "finetune_seg_vit": "finetune", "finetune_cls": "finetune",
             "finetune_cls_cnn": "finetune", "dino_pretrain": "pretrain_2d", "dinov2_pretrain": "pretrain_2d"}


def job_data_problems(job: str, settings: dict[str, Any], dl: dict[str, Any]) -> list[str]:
    """Mismatches between the job ``job`` with merged ``settings`` and a loaded datalist ``dl`` (empty: it fits)."""
    from fl_plugins.data import data_geometry

    kind = _JOB_KIND.get(job)
    if kind is None:
        return []
    where = f"datalist {dl.get('datalist_path')!r}"
    problems: list[str] = []
    geo = data_geometry(dl)
    model_dims = int(settings.get("model", {}).get("spatial_dims", 2))
    if geo.spatial_dims != model_dims:
        if model_dims == 2 and "spatial_dims" in settings.get("model", {}):
            fix = "--set model.spatial_dims=3"
        elif model_dims == 2:
            fix = "use job finetune_cls_cnn with --set model.spatial_dims=3" if dl["task"] == "classification" \
                else "3D data is not supported by this job"
        else:
            fix = "--set model.spatial_dims=2"
        problems.append(f"{where} holds {geo.spatial_dims}D images ({geo.source}) but job {job!r} trains a "
                        f"{model_dims}D model: {fix}")
    if kind == "finetune" and geo.file_channels == 3 and dl.get("rgb"):
        model = settings["model"]
        have = int(model.get("in_channels", model.get("backbone", {}).get("in_chans", 1)))
        if have != 3:
            key = "model.backbone.in_chans" if "backbone" in model else "model.in_channels"
            problems.append(f"{where} keeps RGB images as 3 channels ('rgb': true) but the model takes {have}: "
                            f"--set {key}=3")
    if kind == "finetune":
        task = settings["trainer"]["task"]
        if dl["task"] != task:
            other = "finetune_cls" if dl["task"] == "classification" else "finetune_seg_unet or finetune_seg_vit"
            problems.append(f"{where} is for task {dl['task']!r} but job {job!r} fine-tunes for {task!r}: use "
                            f"job {other}")
        else:
            nc, want = int(settings["model"]["num_classes"]), int(dl["num_classes"])
            if nc != want:
                problems.append(f"{where} declares num_classes={want} but the job has model.num_classes={nc}: "
                                f"--set model.num_classes={want}")
    return problems


def job_data_notes(dl: dict[str, Any]) -> list[str]:
    """What the data layer does to these images that a user should know (not errors)."""
    from fl_plugins.data import data_geometry

    geo = data_geometry(dl)
    if geo.file_channels == 3 and not dl.get("rgb"):
        return [f"{geo.source}: RGB images are converted to one grey channel (ITU-R BT.601 luma) by the data layer; "
                "to keep 3 channels split with --rgb (datalist 'rgb': true) and give the model 3 input channels"]
    return []
