"""A ready job's Recipe runs unchanged with nvflare's ``SimEnv`` (the Python path next to ``flssl simulate``): the
DINO recipe, shrunk, on generated data with 2 simulated sites; the recipe wires the simulation workspace itself
(class allow list + where each site's data is). It names the aggregator, so the server runs
fl_plugins' WeightedAverage (the one the in-process runner uses) inside nvflare's FedAvg."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

TINY = {"backbone": {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "in_chans": 1, "depth": 2},
        "batch_size": 8, "out_dim": 64, "hidden_dim": 64, "bottleneck_dim": 32, "local_crop_size": 16,
        "n_local_crops": 2}


def test_dino_recipe_runs_with_simenv(synth_seg_data, tmp_path, monkeypatch):
    from nvflare.recipe import SimEnv

    from fl_plugins import methods
    from fl_plugins.flare.recipes import DinoRecipe

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    recipe = DinoRecipe({"fl": {"num_rounds": 2, "aggregator": "weighted_average"}, "dino": TINY, "steps_per_round": 2, "knn_max_items": 64},
                        datalist=str(synth_seg_data / "{site}" / "datalist.json"))
    run = recipe.execute(SimEnv(num_clients=2, num_threads=2, workspace_root=str(tmp_path / "sim")))
    result = Path(run.get_result())
    app = result / "server" / "simulate_job" / "app_server"
    ckpt = torch.load(app / "FL_global_model.pt", map_location="cpu", weights_only=False)["model"]
    method = methods.build("dino", dict(TINY, total_steps=4))
    assert set(ckpt) == set(method.federated_state_dict())  # mode A: every key is federated
    final = json.loads((app / "final_metrics.json").read_text())
    assert set(final["sites"]) == {"site-1", "site-2"}
    assert all("knn_accuracy" in m for m in final["sites"].values())
    local = json.loads((tmp_path / "sim" / "dino_pretrain" / "local" / "resources.json").read_text())
    assert "fl_plugins." in local["class_allow_list"]
