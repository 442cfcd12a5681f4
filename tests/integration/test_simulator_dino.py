"""The shipped DINOv2 pretraining job (the superset of DINO's) in the real FLARE simulator on generated data (2 sites, 2 rounds):
the global checkpoint holds exactly the federated state, k-NN and SSL curves reach TensorBoard, and the exported
teacher backbone loads into timm and into the fine-tuning model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fl_plugins import methods
from fl_plugins.cli import main as flssl
from fl_plugins.cpu_threads import site_thread_env
from fl_plugins.models.factory import build_model

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


# dinov2_pretrain only: DINOv2 is DINO + iBOT + KoLeo through the same handler, controller, export and monitors;
# dino_pretrain runs end to end through its Recipe (test_recipe_simenv.py) and its losses in tests/methods. Each run
# costs 25-40 s of the suite.
@pytest.mark.parametrize("job", ["dinov2_pretrain"])
def test_pretrain_job_end_to_end(job, synth_seg_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ws = tmp_path / "ws"
    assert flssl(["init-workspace", "-w", str(ws), "--data", str(synth_seg_data)]) == 0
    proc = subprocess.run([sys.executable, "-m", "nvflare.cli", "simulator", str(REPO / "jobs" / job), "-w", str(ws),
                           "-n", "2", "-t", "2"], capture_output=True, text=True, timeout=900,
                          env=site_thread_env(2))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    app = ws / "server" / "simulate_job" / "app_server"
    server_cfg = json.loads((REPO / "jobs" / job / "app/config/config_fed_server.json").read_text())
    persistor = next(c for c in server_cfg["components"] if c["id"] == "persistor")["args"]
    method = methods.build(persistor["method"], persistor["method_config"])
    ckpt = torch.load(app / "FL_global_model.pt", map_location="cpu", weights_only=False)
    assert set(ckpt["model"]) == set(method.federated_state_dict())  # mode A: student + teacher + centres
    fm = json.loads((app / "final_metrics.json").read_text())
    assert set(fm["sites"]) == {"site-1", "site-2"} and all("knn_accuracy" in m for m in fm["sites"].values())
    for site in ("site-1", "site-2"):
        acc = EventAccumulator(str(ws / "server/simulate_job/tb_events" / site))
        acc.Reload()
        assert {"knn_accuracy", "ssl/loss", "ssl/lr", "ssl/teacher_momentum", "ssl/teacher_entropy", "ssl/teacher_mean_entropy",
                "ssl/teacher_mi"} <= set(acc.Tags()["scalars"])
        assert [e.step for e in acc.Scalars("ssl/loss")] == [0, 1]

    out = tmp_path / "vit.pt"
    assert flssl(["export-backbone", "--checkpoint", str(app / "FL_global_model.pt"), "--out", str(out)]) == 0
    import timm

    spec = method.config.backbone
    vit = timm.create_model(spec.name, pretrained=True, pretrained_cfg_overlay={"file": str(out)},
                            **spec.timm_kwargs())
    teacher = {k: torch.as_tensor(v) for k, v in ckpt["model"].items() if k.startswith("teacher.backbone.")}
    for k, v in vit.state_dict().items():
        assert torch.equal(v, teacher["teacher.backbone." + k]), k
    seg = build_model({"arch": "vit_seg", "num_classes": 3, "backbone": spec.to_dict(), "pretrained": str(out)})
    assert torch.equal(seg.backbone.pos_embed, teacher["teacher.backbone.pos_embed"])
