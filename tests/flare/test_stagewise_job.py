"""The ``meduniverse_stagewise`` job: exported configs, settings, the base persistor, and the wire between the exported
server persistor and the exported site executor (the base's keys go out, exactly those keys come back)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fl_plugins.flare.job_builder import JOBS, build_job, job_settings

JOB = "meduniverse_stagewise"
TINY = {"model": {"backbone": {"img_size": 16, "patch_size": 4, "depth": 1}}, "image_size": 16,
        "trainer": {"steps_per_stage": 1, "batch_size": 8}}


def _export(tmp_path: Path, overrides: dict | None = None) -> dict[str, dict]:
    build_job(JOB, overrides).export_job(str(tmp_path))
    cfg = tmp_path / JOB / "app" / "config"
    return {side: json.loads((cfg / f"config_fed_{side}.json").read_text()) for side in ("server", "client")}


def _load(path: str):
    mod, _, cls = path.rpartition(".")
    return getattr(importlib.import_module(mod), cls)


def test_exported_server_and_client_configs(tmp_path):
    cfg = _export(tmp_path)
    (wf,) = cfg["server"]["workflows"]
    assert wf["path"] == "fl_plugins.flare.stagewise.StagewiseController"
    assert {k: wf["args"][k] for k in ("num_stages", "k_per_stage", "schedule", "weighting", "damping",
                                       "norm_bound")} == {"num_stages": 3, "k_per_stage": 2, "schedule": "parallel",
                                                          "weighting": "uniform", "damping": 1.0, "norm_bound": 10.0}
    comps = {c["id"]: c for c in cfg["server"]["components"]}
    assert comps["persistor"]["path"] == "fl_plugins.flare.stagewise.StageBasePersistor"
    assert comps["persistor"]["args"]["model_config"] == JOBS[JOB].defaults["model"]
    assert set(comps) == {"persistor", "tb_receiver"} and cfg["server"]["server"]["task_request_interval"] == 0.1
    (ex,) = cfg["client"]["executors"]
    assert ex["tasks"] == ["report_task", "stage_finetune", "validate"]
    args = ex["executor"]["args"]
    assert args["handler"] == "stagewise" and "pretrained" not in args["handler_args"]["model"]
    assert args["handler_args"]["trainer"]["steps_per_stage"] == 20 and args["handler_args"]["num_slices"] == 8


def test_settings_reach_the_controller_and_bad_ones_are_named(tmp_path):
    cfg = _export(tmp_path, {"stagewise": {"k_per_stage": 4, "schedule": "sequential", "weighting": "samples",
                                           "damping": 0.5, "norm_bound": None, "num_stages": 5},
                             "model": {"pretrained": "/abs/mae_backbone.pt"}, "volume": {"num_slices": None}})
    wf = cfg["server"]["workflows"][0]["args"]
    assert (wf["k_per_stage"], wf["schedule"], wf["weighting"], wf["damping"], wf["norm_bound"], wf["num_stages"]) \
        == (4, "sequential", "samples", 0.5, None, 5)
    persistor = cfg["server"]["components"][0]["args"]["model_config"]
    assert persistor["pretrained"] == "/abs/mae_backbone.pt"  # read on the server only
    assert cfg["client"]["executors"][0]["executor"]["args"]["handler_args"]["num_slices"] is None
    with pytest.raises(ValueError, match=r"unknown job setting 'stagewise\.k'"):
        job_settings(JOB, {"stagewise": {"k": 3}})
    with pytest.raises(ValueError, match="schedule must be one of"):
        build_job(JOB, {"stagewise": {"schedule": "random"}})
    with pytest.raises(ValueError, match=r"counts stages, not rounds: set stagewise.num_stages=7"):
        build_job(JOB, {"fl": {"num_rounds": 7}})
    with pytest.raises(ValueError, match=r"must be 'vit_classifier'"):
        build_job(JOB, {"model": {"arch": "unet"}})


def test_quantization_filters_the_stage_tasks(tmp_path):
    cfg = _export(tmp_path, {"fl": {"quantization": "float16"}})
    (out,) = cfg["server"]["task_data_filters"]
    (back,) = cfg["server"]["task_result_filters"]
    assert sorted(out["tasks"]) == ["stage_finetune", "validate"] and back["tasks"] == ["stage_finetune"]


def test_recipe_exports_the_job(tmp_path):
    from fl_plugins.flare.recipes import MedUniverseStagewiseRecipe, recipe_for

    recipe_for(JOB).export(str(tmp_path))
    assert (tmp_path / JOB / "meta.json").is_file()
    assert MedUniverseStagewiseRecipe({"stagewise": {"k_per_stage": 3}}).job_name == JOB


def test_the_base_persistor_loads_an_exported_backbone(tmp_path):
    from fl_plugins.flare.stagewise import StageBasePersistor
    from fl_plugins.models.backbone import BackboneSpec, create_backbone

    model = {**JOBS[JOB].defaults["model"], "backbone": {"img_size": 16, "patch_size": 4, "depth": 1}}
    exported = create_backbone(BackboneSpec(img_size=16, patch_size=4, depth=1))
    torch.save(exported.state_dict(), tmp_path / "backbone.pt")  # what flssl export-backbone writes
    net = StageBasePersistor(model_config={**model, "pretrained": str(tmp_path / "backbone.pt")}).build_global_model()
    sd = net.state_dict()
    assert set(sd) == {f"backbone.{k}" for k in exported.state_dict()}  # the backbone only, no head
    for k, v in exported.state_dict().items():
        assert torch.equal(sd[f"backbone.{k}"], v)


def test_wire_between_the_exported_persistor_and_the_exported_site(tmp_path, synth_cls_data):
    """One site built from the exported executor config answers the exported persistor's base with its keys."""
    cfg = _export(tmp_path, TINY)
    (entry,) = cfg["client"]["executors"]
    executor = _load(entry["executor"]["path"])(**entry["executor"]["args"])
    p = next(c for c in cfg["server"]["components"] if c["id"] == "persistor")
    base = {k: v.numpy() for k, v in _load(p["path"])(**p["args"]).build_global_model().state_dict().items()}
    from fl_plugins.flare.handler import SiteContext

    (tmp_path / "site").mkdir()
    handler = executor.build_handler(SiteContext("site-1", str(synth_cls_data / "site-1" / "datalist.json"),
                                                 str(tmp_path / "site")))
    report = handler.tasks()["report_task"](FLModel(params={}))
    assert report.params == {} and sorted(report.meta) == ["n_samples", "n_val", "num_classes", "spatial_dims",
                                                           "task_name"]
    out = handler.tasks()["stage_finetune"](FLModel(params=base, params_type=ParamsType.FULL, current_round=0,
                                                    meta={"head_shape": [2, 192]}))
    assert {k: v.shape for k, v in out.params.items()} == {k: v.shape for k, v in base.items()}
    assert all(v.dtype == np.float32 for v in out.params.values())
    assert sorted(out.meta) == ["NUM_STEPS_CURRENT_ROUND", "num_classes", "spatial_dims", "stage", "task_name",
                                "train_loss"]
    val = handler.tasks()["validate"](FLModel(params=base, params_type=ParamsType.FULL, current_round=1))
    assert val.params == {} and sorted(val.metrics) == ["val_accuracy", "val_auc", "val_balanced_accuracy"]
