"""The stage-wise job (MedUniverse) in the real FLARE simulator: 3 sites holding different synthetic tasks (2, 3 and
5 classes), 2 stages, K = 3 (tiny ViT). The run finishes, every stage aggregates the 3 sites' backbones, every base
is kept with its tables, each site's head stays in its own workspace, and the sites' metrics reach TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fl_plugins.cli import main as flssl

pytestmark = pytest.mark.slow

TINY = ["model.backbone.img_size=16", "model.backbone.patch_size=4", "model.backbone.depth=1", "image_size=16",
        "trainer.steps_per_stage=2", "trainer.batch_size=8", "stagewise.num_stages=2", "stagewise.k_per_stage=3"]


@pytest.fixture(scope="module")
def sim_run(tmp_path_factory) -> Path:
    from fl_plugins.data import generate_synthetic_multitask

    root = tmp_path_factory.mktemp("stagewise")
    generate_synthetic_multitask(root / "data", class_counts=(2, 3, 5), images_per_site=36, size=16, seed=0)
    ws = root / "ws"
    args = ["simulate", "--job", "meduniverse_stagewise", "--data", str(root / "data"), "-w", str(ws), "--sites", "3",
            "--threads", "3", "--quiet"]
    for s in TINY:
        args += ["--set", s]
    rc = flssl(args)
    log = ws.parent / "ws_simulate.log"
    assert rc == 0, log.read_text()[-4000:] if log.is_file() else "no log"
    return ws


def test_every_stage_aggregates_the_three_tasks_and_every_base_is_kept(sim_run):
    app = sim_run / "server" / "simulate_job" / "app_server"
    table = json.loads((app / "stage_bases.json").read_text())
    assert [s["close_reason"] for s in table["stages"]] == ["k_reached", "k_reached"]
    assert [sorted(s["contributors"]) for s in table["stages"]] == [["site-1", "site-2", "site-3"]] * 2  # arrival order
    assert {t["num_classes"] for t in table["tasks"].values()} == {2, 3, 5}
    assert all(s["rejected"] == [] for s in table["stages"])
    keys = None
    for b in range(3):
        ckpt = torch.load(app / f"stage_{b}_base.pt", weights_only=True)
        assert ckpt["stage"] == b
        keys = keys or set(ckpt["state_dict"])
        assert set(ckpt["state_dict"]) == keys and not any(k.startswith("head") for k in keys)
    assert not list(app.glob(".*.tmp"))


def test_the_metrics_table_has_every_task_at_every_base(sim_run):
    app = sim_run / "server" / "simulate_job" / "app_server"
    metrics = json.loads((app / "stage_metrics.json").read_text())
    assert len(metrics["table"]) == 3 and all(len(v) == 3 and None not in v for v in metrics["table"].values())
    log = (sim_run.parent / "ws_simulate.log").read_text()
    assert "stage 1 closed (k_reached)" in log and "val_accuracy of every task at every base" in log


def test_heads_stay_in_the_site_workspaces_and_metrics_reach_tensorboard(sim_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    heads = sorted(sim_run.rglob("stagewise_head.pt"))
    assert len(heads) == 3 and all("server" not in p.parts for p in heads)
    assert sorted(torch.load(p, weights_only=True)["num_classes"] for p in heads) == [2, 3, 5]
    tb = sim_run / "server" / "simulate_job" / "tb_events"
    for site in ("site-1", "site-2", "site-3"):
        acc = EventAccumulator(str(tb / site))
        acc.Reload()
        acc_tags = [t for t in acc.Tags()["scalars"] if t.endswith("/val_accuracy")]
        assert len(acc_tags) == 1 and [e.step for e in acc.Scalars(acc_tags[0])] == [0, 1, 2]
