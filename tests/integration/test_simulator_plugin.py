"""Item 5 and the must-show of the plugin architecture: a method defined outside the package
(tests/plugins/rotation_method.py, registered through the public registry) is shipped as the job's custom code
together with the Client API script ``custom/fl_client.py`` and runs in the real FLARE simulator (2 sites, 2 rounds),
touching no file under ``fl_plugins/``. On the wire only its federated state travels: the global checkpoint holds
exactly ``encoder.*`` (its site-kept ``head.*`` never reaches the server), and the sites' k-NN monitor and training
curves reach the server's TensorBoard through the Client API's writer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fl_plugins.cli import main as flssl
from fl_plugins.cpu_threads import site_thread_env

REPO = Path(__file__).resolve().parents[2]
PLUGIN = REPO / "tests" / "plugins" / "rotation_method.py"
pytestmark = pytest.mark.slow


def test_plugin_method_runs_through_custom_client_api_script(synth_seg_data, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fl_plugins.flare.job_builder import build_pretrain_job
    from fl_plugins.flare.persistor import ConfigModelPersistor
    from fl_plugins.methods import build

    monkeypatch.syspath_prepend(str(PLUGIN.parent))  # the sites import it from the job's custom folder
    job = build_pretrain_job("rotation_pretrain", "rotation", {"image_size": 32, "batch_size": 8},
                             fl={"num_rounds": 2, "min_clients": 2}, steps_per_round=2, knn_max_items=64,
                             imports=["rotation_method"], plugin_files=[str(PLUGIN)], client="client_api")
    job.export_job(str(tmp_path / "jobs"))
    job_dir = tmp_path / "jobs" / "rotation_pretrain"
    custom = sorted(p.name for p in (job_dir / "app" / "custom").iterdir())
    assert custom == ["fl_client.py", "fl_client_config.json", "rotation_method.py"]
    client_cfg = json.loads((job_dir / "app" / "config" / "config_fed_client.json").read_text())
    assert client_cfg["executors"][0]["executor"]["path"].endswith("ClientAPIExecutor")
    ws = tmp_path / "ws"
    assert flssl(["init-workspace", "-w", str(ws), "--data", str(synth_seg_data)]) == 0
    proc = subprocess.run([sys.executable, "-m", "nvflare.cli", "simulator", str(job_dir), "-w", str(ws), "-n", "2",
                           "-t", "2"], capture_output=True, text=True, timeout=900, env=site_thread_env(2))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    app = ws / "server" / "simulate_job" / "app_server"
    ckpt = torch.load(app / "FL_global_model.pt", map_location="cpu", weights_only=False)["model"]
    # the server's round-0 model (the persistor builds it seeded): what it holds of the site-kept head is never
    # replaced, because no site sends a head; every federated tensor was replaced by the sites' average
    initial = ConfigModelPersistor(method="rotation", method_config={"image_size": 32, "batch_size": 8},
                                   imports=["rotation_method"]).build_global_model().state_dict()
    tax = build("rotation", {"image_size": 32}).state_taxonomy()
    assert set(ckpt) == set(initial) and tax["site"] == ["head.bias", "head.weight"]
    for k in tax["site"]:
        assert torch.equal(torch.as_tensor(ckpt[k]), initial[k]), f"{k} changed on the server: it crossed the wire"
    for k in tax["federated"]:
        assert not torch.equal(torch.as_tensor(ckpt[k]), initial[k]), f"{k} was not trained/aggregated"
    fm = json.loads((app / "final_metrics.json").read_text())
    assert set(fm["sites"]) == {"site-1", "site-2"} and all("knn_accuracy" in m for m in fm["sites"].values())
    tb = ws / "server" / "simulate_job" / "tb_events"
    for site in ("site-1", "site-2"):
        acc = EventAccumulator(str(tb / site))
        acc.Reload()
        assert {"ssl/loss", "knn_accuracy"} <= set(acc.Tags()["scalars"]), (site, acc.Tags())
