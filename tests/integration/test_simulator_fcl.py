"""The shipped FCL job in the real FLARE simulator (2 sites, 2 rounds x 2 steps, tiny U-Net encoder on generated
volumes): the exchange phase runs every round (server TensorBoard: its seconds and bytes), each site trains against
the other site's features (site TensorBoard: remote features, remote loss), the global checkpoint holds encoder +
projector (trained), and the export starts ``finetune_seg_unet``."""

from __future__ import annotations

import json

import pytest
import torch

from fl_plugins import methods
from fl_plugins.cli import main as flssl

pytestmark = pytest.mark.slow

TINY = {"channels": [4, 8, 16], "strides": [2, 2]}
SETS = ["--set", "steps_per_round=2", "--set", "fcl.image_size=32", "--set", "fcl.volumes_per_batch=2",
        "--set", f"fcl.backbone.channels={json.dumps(TINY['channels'])}",
        "--set", f"fcl.backbone.strides={json.dumps(TINY['strides'])}", "--set", "fcl.num_negatives=16"]


def _scalars(path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_fcl_pretrain_exchanges_features_and_exports_the_encoder(synth_seg_data, tmp_path):
    ws = tmp_path / "ws"
    rc = flssl(["simulate", "--job", "fcl_pretrain", "--data", str(synth_seg_data), "-w", str(ws), "--sites", "2",
                "--rounds", "2", "--quiet", *SETS])
    log = tmp_path / "ws_simulate.log"
    assert rc == 0, log.read_text()[-4000:] if log.is_file() else "no log"
    job = ws / "server" / "simulate_job"
    server = _scalars(job / "tb_events" / "simulator_server")  # the simulator names its server so
    assert [s for s, _ in server["fcl/extract_seconds"]] == [0, 1]
    # 24 slices per site x (128 float32 + 1 int32) received; each site is sent the other's
    assert [v for _, v in server["fcl/feature_bytes_received"]] == [2 * 24 * (128 * 4 + 4)] * 2
    assert [v for _, v in server["fcl/feature_bytes_sent"]] == [2 * 24 * (128 * 4 + 4)] * 2
    assert [v for _, v in server["fcl/sites_sharing"]] == [2, 2]
    for site in ("site-1", "site-2"):
        sc = _scalars(job / "tb_events" / site)
        assert [v for _, v in sc["fcl/remote_features"]] == [24.0, 24.0]
        assert all(v > 0 for _, v in sc["fcl/loss_remote"]) and "ssl_loss" in sc
    ckpt = torch.load(job / "app_server" / "FL_global_model.pt", map_location="cpu", weights_only=False)["model"]
    persistor = next(c for c in json.loads((tmp_path / "ws_job/fcl_pretrain/app/config/config_fed_server.json")
                                           .read_text())["components"] if c["id"] == "persistor")["args"]
    initial = methods.build("fcl", persistor["method_config"])  # the server's seeded round-0 model
    assert set(ckpt) == set(initial.state_dict())
    for k in initial.state_taxonomy()["federated"]:  # encoder + projector trained; momentum = the server's copy
        assert k.startswith(("encoder.", "projector."))
    assert not torch.equal(torch.as_tensor(ckpt["encoder.model.0.conv.unit0.conv.weight"]),
                           initial.state_dict()["encoder.model.0.conv.unit0.conv.weight"])
    out = tmp_path / "encoder.pt"
    assert flssl(["export-backbone", "--checkpoint", str(job / "app_server" / "FL_global_model.pt"),
                  "--out", str(out)]) == 0
    exported = torch.load(out, map_location="cpu", weights_only=True)
    from fl_plugins.models.factory import build_model

    unet = build_model({"arch": "unet", "num_classes": 3, **TINY, "pretrained": str(out)})
    own = unet.state_dict()
    for k, v in exported.items():
        assert torch.equal(own[k], v), k
    assert torch.equal(exported["model.0.conv.unit0.conv.weight"], ckpt["encoder.model.0.conv.unit0.conv.weight"])
