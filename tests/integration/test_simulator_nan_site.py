"""Issue 15 must-show: in the real FLARE simulator one site sends NaN weights every round (the test plugin
tests/plugins/nan_site.py, shipped as the job's custom code with the toy method tests/plugins/rotation_method.py).
The job finishes, the server rejects that site's result in every round (server log and server TensorBoard), and the
final global model is finite and trained by the other site."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fl_plugins.cli import main as flssl
from fl_plugins.cpu_threads import site_thread_env

PLUGINS = Path(__file__).resolve().parents[1] / "plugins"
pytestmark = pytest.mark.slow


def test_a_site_sending_nan_every_round_is_left_out(synth_seg_data, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fl_plugins.flare.job_builder import build_pretrain_job
    from fl_plugins.flare.persistor import ConfigModelPersistor

    monkeypatch.syspath_prepend(str(PLUGINS))  # the sites and the server import them from the job's custom folder
    rounds, cfg, imports = 2, {"image_size": 32, "batch_size": 8}, ["rotation_method", "nan_site"]
    job = build_pretrain_job("nan_site", "rotation", cfg, fl={"num_rounds": rounds, "min_clients": 2},
                             steps_per_round=2, knn_every=0, imports=imports,
                             plugin_files=[str(PLUGINS / "rotation_method.py"), str(PLUGINS / "nan_site.py")])
    job.export_job(str(tmp_path / "jobs"))
    ws = tmp_path / "ws"
    assert flssl(["init-workspace", "-w", str(ws), "--data", str(synth_seg_data)]) == 0
    proc = subprocess.run([sys.executable, "-m", "nvflare.cli", "simulator", str(tmp_path / "jobs" / "nan_site"),
                           "-w", str(ws), "-n", "2", "-t", "2"], capture_output=True, text=True, timeout=600,
                          env=site_thread_env(2))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    run = ws / "server" / "simulate_job"
    log = "\n".join(p.read_text() for p in sorted((ws / "server").rglob("log*.txt")))
    for r in range(rounds):
        assert f"site-2, round {r}: non-finite values in" in log, log[-3000:]
        assert f"round {r}: 1 of 2 result(s) rejected and left out of the average: site-2 (non_finite)" in log
    assert not [line for line in log.splitlines() if "rejected update" in line and "site-1," in line]
    assert "Finished FedAvg" in log

    ckpt = torch.load(run / "app_server" / "FL_global_model.pt", map_location="cpu", weights_only=False)
    initial = ConfigModelPersistor(method="rotation", method_config=cfg, imports=imports).build_global_model()
    initial = initial.state_dict()
    changed = 0
    for k, v in ckpt["model"].items():
        v = torch.as_tensor(v)
        assert torch.isfinite(v).all(), f"{k} is not finite"
        changed += k.startswith("encoder.") and not torch.equal(v, initial[k])
    assert changed, "no federated tensor was trained (site-1's results should have been averaged)"
    meta = ckpt.get("meta_props") or {}
    assert meta.get("nr_rejected") == 1 and meta.get("rejected_reasons") == {"non_finite": 1}, meta

    tb_dirs = [d for d in (run / "tb_events").iterdir() if not d.name.startswith("site-")]
    assert tb_dirs, f"no server TensorBoard folder in {sorted(p.name for p in (run / 'tb_events').iterdir())}"
    acc = EventAccumulator(str(tb_dirs[0]))
    acc.Reload()
    events = {e.step: e.value for e in acc.Scalars("rejected_updates")}
    assert events == {r: 1.0 for r in range(rounds)}
    assert np.isclose(acc.Scalars("rejected_updates/non_finite")[-1].value, 1.0)
