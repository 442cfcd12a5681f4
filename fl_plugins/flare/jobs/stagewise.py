"""Stage-wise federated fine-tuning (MedUniverse, methods-spec section 6): one base backbone improved stage by stage
by sites with different classification tasks; heads stay on the sites (fl_plugins.flare.stagewise / stage_handler).
"""

from __future__ import annotations

from typing import Any

from fl_plugins.flare.jobs.assembly import assemble_job
from fl_plugins.flare.jobs.base import FLSettings, JobSpec
from fl_plugins.flare.jobs.finetune import VIT_CPU
from fl_plugins.flare.update_check import DEFAULT_NORM_BOUND
from fl_plugins.models.backbone import BackboneSpec
from fl_plugins.wire import TASK_STAGE_FINETUNE, TASK_VALIDATE

__all__ = ["SPECS"]

#: the stage settings (fl_plugins.flare.stagewise.StagewiseController arguments)
_STAGEWISE = {"num_stages": 3, "k_per_stage": 2, "schedule": "parallel", "weighting": "uniform", "damping": 1.0,
              "norm_bound": DEFAULT_NORM_BOUND, "validate_every_stage": True, "stage_timeout": 0}
#: FinetuneConfig fields a stage-wise site's trainer takes (model, task and steps_per_round are set by the job)
_STAGE_TRAINER_FIELDS = {"lr": 1e-3, "min_lr_ratio": 0.1, "warmup_steps": 0, "total_steps": None,
                         "weight_decay": 1e-5, "optimizer": "adamw", "batch_size": 8, "num_workers": 0,
                         "aug_flip": True, "aug_rot90": True, "grad_clip": None, "device": "cpu",
                         "class_weighting": "none"}
#: nvflare's quantization filters on the stage-wise tasks: the base is quantized on the way out (stage_finetune,
#: validate), the returned backbone on the way back (stage_finetune; validate answers carry no params)
_QUANTIZED = ((TASK_STAGE_FINETUNE, TASK_VALIDATE), (TASK_STAGE_FINETUNE,))


def _stagewise_builder(name: str, s: dict[str, Any]) -> Any:
    from fl_plugins.engine.finetune import FinetuneConfig
    from fl_plugins.engine.stagewise import stage_backbone_spec
    from fl_plugins.flare.stagewise import StageBasePersistor, StagewiseController

    fl = FLSettings(**s["fl"])
    sw = dict(s["stagewise"])
    default_rounds = SPEC.defaults["fl"]["num_rounds"]
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
    controller = StagewiseController(
        num_clients=fl.min_clients, num_stages=sw["num_stages"], k_per_stage=sw["k_per_stage"],
        schedule=sw["schedule"], weighting=sw["weighting"], damping=sw["damping"], norm_bound=sw["norm_bound"],
        validate_every_stage=sw["validate_every_stage"], stage_timeout=sw["stage_timeout"],
        key_metric=fl.key_metric or "val_accuracy", task_check_period=fl.task_check_period,
        round_timeout=fl.round_timeout, **({"resume_from": fl.resume_from} if fl.resume_from else {}))
    persistor = StageBasePersistor(model_config=model_cfg, seed=fl.seed)
    args = {"model": {k: v for k, v in model_cfg.items() if k != "pretrained"},  # the base comes from the server
            "trainer": {**trainer, "steps_per_stage": steps}, "image_size": s["image_size"],
            "num_slices": s["volume"]["num_slices"], "num_stages": sw["num_stages"]}
    return assemble_job(name, fl, controller, persistor, "stagewise", args, quantized=_QUANTIZED)


SPEC = JobSpec(
    name="meduniverse_stagewise",
    recipe="MedUniverseStagewiseRecipe",
    description="Stage-wise federated fine-tuning (MedUniverse): one ViT backbone (model.pretrained: a "
    "mae_vit_pretrain export) improved stage by stage by sites with different classification tasks (2D images or 3D "
    "volumes over slices); heads stay on the sites; the base of every stage is kept in the server's "
    "app_server/stage_<s>_base.pt",
    # CPU defaults: the mae_vit_pretrain backbone (64 px, patch 8, 6 blocks) so its export loads; 3 stages of 20 local
    # steps, K = 2 results per stage. model.num_classes is not used by the sites (each sizes its head from its own
    # datalist); it only sizes the model of flssl simulate's --pretrained report.
    defaults={
        "fl": {"num_rounds": 3, "min_clients": 2, "key_metric": "val_accuracy"},
        "stagewise": dict(_STAGEWISE),
        "model": {"arch": "vit_classifier", "num_classes": 2, "head": "linear", "backbone": dict(VIT_CPU),
                  "pretrained": None},
        "trainer": {"lr": 2e-4, "batch_size": 16, "steps_per_stage": 20, "class_weighting": "none"},
        "image_size": 64,
        "volume": {"num_slices": 8},  # 3D sites: slices per volume through the 2D backbone (null = all)
    },
    builder=_stagewise_builder,
    handler="stagewise",
    workflow="stagewise",
    data="per_site",  # every site has its own task and class count: its handler checks its data when it starts
    open_keys={"stagewise": {"norm_bound": DEFAULT_NORM_BOUND},
               "model.backbone": BackboneSpec().to_dict(),
               "trainer": _STAGE_TRAINER_FIELDS, "volume": {"num_slices": 8}},
)
SPECS = [SPEC]
