"""Fine-tuning jobs (segmentation and classification, FedAvg): the ``finetune`` handler on the sites, the model of
``fl_plugins.models.factory.build_model`` on the server; BatchNorm's step counters stay on the sites."""

from __future__ import annotations

from typing import Any

from fl_plugins.flare.jobs.assembly import build_fedavg_job
from fl_plugins.flare.jobs.base import NON_FEDERATED_BUFFERS, FLSettings, JobSpec
from fl_plugins.models.unet import UNET_DEFAULTS

__all__ = ["SPECS", "VIT_CPU", "finetune_trainer_fields"]


def _finetune_builder(name: str, s: dict[str, Any]) -> Any:
    from fl_plugins.flare.finetune_handler import finetune_config

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


def finetune_trainer_fields() -> dict[str, Any]:
    """The optimisation settings of :class:`~fl_plugins.engine.finetune.FinetuneConfig` a fine-tuning job may set
    under ``trainer`` beside its defaults (e.g. ``--set trainer.warmup_steps=60``), with the dataclass defaults;
    ``total_steps`` (rounds x steps), ``seed`` (``fl.seed``), ``model`` and ``device`` are set by the job."""
    import dataclasses

    from fl_plugins.engine.finetune import FinetuneConfig

    keep = ("min_lr_ratio", "warmup_steps", "weight_decay", "optimizer", "grad_clip", "aug_flip", "aug_rot90")
    return {f.name: f.default for f in dataclasses.fields(FinetuneConfig) if f.name in keep}


_FT_TRAINER = finetune_trainer_fields()
_SEG_TRAINER = {"lr": 1e-3, "batch_size": 8, "steps_per_round": 10}  # CPU quickstart size; raise for real runs
#: the CPU-scale ViT of the ViT jobs: ViT-tiny width, 6 blocks, 64 px, patch 8 (methods-spec 9.3)
VIT_CPU = {"name": "vit_tiny_patch16_224", "img_size": 64, "patch_size": 8, "in_chans": 1, "depth": 6}


def _spec(name: str, recipe: str, description: str, defaults: dict[str, Any], open_keys: dict[str, Any]) -> JobSpec:
    return JobSpec(name=name, recipe=recipe, description=description, builder=_finetune_builder,
                   defaults={"fl": {"num_rounds": 2, "min_clients": 2, "key_metric": defaults.pop("key_metric")},
                             **defaults, "num_labelled_patients": None},
                   handler="finetune", data="finetune", open_keys=open_keys)


SPECS = [
    _spec("finetune_seg_unet", "FinetuneSegUnetRecipe",
          "Segmentation fine-tuning, MONAI U-Net from scratch (the honest baseline) or from a unet_inpaint_pretrain "
          "export (--pretrained), FedAvg",
          {"key_metric": "val_dice", "model": {"arch": "unet", "num_classes": 3},
           "trainer": dict(_SEG_TRAINER, task="segmentation"), "image_size": 64},
          # model.pretrained: a unet_inpaint_pretrain export (flssl export-backbone), every tensor but the output
          # block loads; the U-Net settings can be set (they must equal the pretraining job's unet_inpaint.unet)
          {"model": {"pretrained": None, **{k: v for k, v in UNET_DEFAULTS.items() if k != "num_classes"}},
           "trainer": _FT_TRAINER}),
    _spec("finetune_seg_vit", "FinetuneSegVitRecipe",
          "Segmentation fine-tuning, timm ViT encoder + UNETR-style decoder (optionally from a pretrained "
          "backbone), FedAvg",
          {"key_metric": "val_dice",
           "model": {"arch": "vit_seg", "num_classes": 3, "backbone": dict(VIT_CPU), "pretrained": None},
           "trainer": dict(_SEG_TRAINER, task="segmentation", lr=5e-4), "image_size": 64},
          {"trainer": _FT_TRAINER}),
    _spec("finetune_cls", "FinetuneClsRecipe",
          "Classification fine-tuning, timm ViT + linear/MLP head (optionally from a pretrained backbone), FedAvg",
          {"key_metric": "val_accuracy",
           "model": {"arch": "vit_classifier", "num_classes": 2, "head": "linear",
                     "backbone": dict(VIT_CPU, img_size=32, patch_size=4), "pretrained": None},
           "trainer": {"task": "classification", "lr": 5e-4, "batch_size": 16, "steps_per_round": 10,
                       "class_weighting": "none"},
           "image_size": 32},
          # volumes: --set model.spatial_dims=3 (the 2D ViT over model.num_slices evenly spaced slices, default 8)
          {"model": {"spatial_dims": 2, "num_slices": 8}, "trainer": _FT_TRAINER}),
    _spec("finetune_cls_cnn", "FinetuneClsCnnRecipe",
          "Classification fine-tuning, MONAI ResNet-10 from scratch (the CNN baseline; 2D images or, with "
          "model.spatial_dims=3, volumes), FedAvg",
          {"key_metric": "val_accuracy",
           "model": {"arch": "cnn_classifier", "num_classes": 2, "spatial_dims": 2, "depth": 10, "in_channels": 1,
                     "widen_factor": 0.25},
           "trainer": {"task": "classification", "lr": 1e-3, "batch_size": 16, "steps_per_round": 10,
                       "class_weighting": "none"},
           "image_size": 28},
          {"trainer": _FT_TRAINER}),
]
