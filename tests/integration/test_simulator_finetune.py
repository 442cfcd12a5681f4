"""The shipped fine-tuning job in the real FLARE simulator, both ways the README runs it.

The quickstart, ``flssl simulate --job finetune_seg_unet --data <sites> -w <ws> --sites 2`` on generated data (2 sites,
2 rounds): checks the checkpoints, the final validation, the TensorBoard events the server wrote and the run's log,
then evaluates the checkpoint with ``flssl evaluate``. FLARE's own command (``flssl init-workspace`` then
``nvflare simulator jobs/finetune_seg_unet -w <ws> -n 2 -t 2``) runs the same job with a site whose data is broken.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fl_plugins.cli import main as flssl
from fl_plugins.cpu_threads import site_thread_env
from fl_plugins.engine.finetune import federated_keys
from fl_plugins.models.factory import build_model

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _simulate(job: Path, ws: Path, n: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nvflare.cli", "simulator", str(job), "-w", str(ws), "-n", str(n), "-t", str(n)],
        capture_output=True, text=True, timeout=900, env=site_thread_env(n),
    )


@pytest.fixture(scope="module")
def sim_run(synth_seg_data, tmp_path_factory):
    ws = tmp_path_factory.mktemp("sim") / "ws"
    rc = flssl(["simulate", "--job", "finetune_seg_unet", "--data", str(synth_seg_data), "-w", str(ws), "--sites", "2",
                "--quiet"])
    log = ws.parent / "ws_simulate.log"  # beside the workspace: the simulator empties <ws> when it starts
    assert rc == 0, log.read_text()[-4000:] if log.is_file() else "no log"
    return ws


def test_the_simulator_log_survives_the_run(sim_run):
    log = (sim_run.parent / "ws_simulate.log").read_text()
    assert "Round 1 started" in log and "Finished FedAvg" in log


def test_checkpoints_are_loadable_and_complete(sim_run):
    app = sim_run / "server" / "simulate_job" / "app_server"
    model_cfg = json.loads((REPO / "jobs/finetune_seg_unet/app/config/config_fed_server.json").read_text())
    model_cfg = next(c for c in model_cfg["components"] if c["id"] == "persistor")["args"]["model_config"]
    model = build_model(model_cfg)
    ckpt = torch.load(app / "FL_global_model.pt", map_location="cpu", weights_only=False)
    assert set(ckpt["model"]) == set(model.state_dict())
    model.load_state_dict({k: torch.as_tensor(v) for k, v in ckpt["model"].items()})
    best = torch.load(app / "best_FL_global_model.pt", map_location="cpu", weights_only=False)
    assert set(best["model"]) == set(federated_keys(model))  # the model as the sites received and scored it
    model.load_state_dict({k: torch.as_tensor(v) for k, v in best["model"].items()}, strict=False)
    assert not list(app.glob(".*.tmp")), "a temporary checkpoint file was left behind"


def test_best_model_is_the_best_scored_candidate_last_aggregate_included(sim_run):
    """Every model the sites validated is a candidate: the one received in round r (step r in TensorBoard: the
    aggregate of round r-1) and the last aggregate (the final validation, step 2). The saved best is the candidate
    with the highest mean val_dice over sites, saved with its score."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = sim_run / "server" / "simulate_job" / "tb_events"
    per_step: dict[int, list[float]] = {}
    for site in ("site-1", "site-2"):
        acc = EventAccumulator(str(tb / site))
        acc.Reload()
        for e in acc.Scalars("val_dice"):
            per_step.setdefault(e.step, []).append(e.value)
    means = {step: sum(v) / len(v) for step, v in per_step.items()}
    app = sim_run / "server" / "simulate_job" / "app_server"
    best = torch.load(app / "best_FL_global_model.pt", map_location="cpu", weights_only=False)["best"]
    assert best == json.loads((app / "best_metric.json").read_text())
    top = max(means, key=lambda s: means[s])
    assert best["score"] == pytest.approx(means[top], abs=1e-6) and best["aggregate"] == top - 1
    assert best["key_metric"] == "val_dice" and set(best["sites"]) == {"site-1", "site-2"}


def test_final_validation_of_every_site(sim_run):
    fm = json.loads((sim_run / "server/simulate_job/app_server/final_metrics.json").read_text())
    assert fm["round"] == 2
    assert set(fm["sites"]) == {"site-1", "site-2"}
    for m in fm["sites"].values():
        assert 0.0 <= m["val_dice"] <= 1.0


def test_tensorboard_events_per_site(sim_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = sim_run / "server" / "simulate_job" / "tb_events"
    # one folder per site, and the server's own (rejected_updates each round, fl_plugins.flare.controllers)
    assert sorted(p.name for p in tb.iterdir()) == ["simulator_server", "site-1", "site-2"]
    server = EventAccumulator(str(tb / "simulator_server"))
    server.Reload()
    assert [(e.step, e.value) for e in server.Scalars("rejected_updates")] == [(0, 0.0), (1, 0.0)]
    for site in ("site-1", "site-2"):
        acc = EventAccumulator(str(tb / site))
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        assert {"val_dice", "train_loss", "round_seconds"} <= tags
        assert [e.step for e in acc.Scalars("train_loss")] == [0, 1]
        assert [e.step for e in acc.Scalars("val_dice")] == [0, 1, 2]  # 2 rounds + final validation


def test_flssl_evaluate_on_test_split(sim_run, synth_seg_data, tmp_path):
    ckpt = sim_run / "server/simulate_job/app_server/FL_global_model.pt"
    out = tmp_path / "eval.json"
    rc = flssl(["evaluate", "--checkpoint", str(ckpt), "--data", str(synth_seg_data), "--out", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["metric"] == "dice" and r["split"] == "test"
    assert set(r["sites"]) == {"site-1", "site-2"}
    assert r["overall"]["n"] == sum(s["n"] for s in r["sites"].values()) >= 2
    assert 0.0 <= r["overall"]["mean"] <= 1.0


def test_a_site_with_bad_data_stops_the_job(synth_seg_data, tmp_path):
    """No pre-flight here (raw nvflare simulator): the site reports the file and the server aborts the job."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synth_seg_data, data)
    dl_path = data / "site-2" / "datalist.json"
    dl = json.loads(dl_path.read_text())
    dl["training"][0]["image"] = "images/not_there.nii.gz"
    dl_path.write_text(json.dumps(dl))
    ws = tmp_path / "ws"
    assert flssl(["init-workspace", "-w", str(ws), "--data", str(data)]) == 0
    proc = _simulate(REPO / "jobs" / "finetune_seg_unet", ws)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "site 'site-2' cannot start" in log and "not_there.nii.gz" in log
    assert "Result from site-2 is bad" in log


def test_same_seed_same_metrics_other_seed_other_metrics(sim_run, synth_seg_data, tmp_path):
    """The job's seed (fl.seed, default 0) fixes the initial global model and every site's data order, augmentation
    and dropout: the same command gives the same final metrics; another seed gives other ones. Tolerance 1e-6: the
    server sums the sites' results in arrival order, which may differ between runs (float addition is not
    associative); everything else is seeded (no data-loader workers, CPU kernels)."""
    def final(ws):
        return json.loads((ws / "server/simulate_job/app_server/final_metrics.json").read_text())["sites"]

    first = final(sim_run)
    # the two runs side by side (each run is mostly start-up and polling: about 20 s of the suite saved)
    procs = {seed: subprocess.Popen(
        [sys.executable, "-m", "fl_plugins.cli", "simulate", "--job", "finetune_seg_unet", "--data",
         str(synth_seg_data), "-w", str(tmp_path / f"ws{seed}"), "--sites", "2", "--quiet", "--set", f"fl.seed={seed}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=site_thread_env(4)) for seed in (0, 1)}
    for seed, p in procs.items():
        out, _ = p.communicate(timeout=900)
        assert p.returncode == 0, f"seed {seed}: {out[-3000:]}"
    for seed, same in ((0, True), (1, False)):
        again = final(tmp_path / f"ws{seed}")
        diffs = [abs(again[s]["val_dice"] - first[s]["val_dice"]) for s in first]
        if same:
            assert max(diffs) <= 1e-6, (first, again)
        else:
            assert max(diffs) > 1e-3, (first, again)
