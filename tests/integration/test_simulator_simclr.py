"""The shipped SimCLR job in the real FLARE simulator (2 sites, 2 rounds x 2 steps, tiny U-Net encoder on generated
slices): the global checkpoint holds the encoder and projection head (trained), the BatchNorm step counters are
the server's own (never averaged), and ``flssl export-backbone`` starts ``finetune_seg_unet``: every exported tensor
loads into the segmentation U-Net."""

from __future__ import annotations

import json

import pytest
import torch

from fl_plugins import methods
from fl_plugins.cli import main as flssl

pytestmark = pytest.mark.slow

TINY = {"channels": [4, 8, 16], "strides": [2, 2]}
SETS = ["--set", "steps_per_round=2", "--set", "simclr.image_size=32", "--set", "simclr.batch_size=4",
        "--set", f"simclr.backbone.channels={json.dumps(TINY['channels'])}",
        "--set", f"simclr.backbone.strides={json.dumps(TINY['strides'])}"]


def test_simclr_pretrain_in_the_simulator_exports_the_encoder(synth_seg_data, tmp_path):
    ws = tmp_path / "ws"
    rc = flssl(["simulate", "--job", "simclr_pretrain", "--data", str(synth_seg_data), "-w", str(ws), "--sites", "2",
                "--rounds", "2", "--quiet", *SETS])
    log = tmp_path / "ws_simulate.log"
    assert rc == 0, log.read_text()[-4000:] if log.is_file() else "no log"
    job = ws / "server" / "simulate_job"
    ckpt = torch.load(job / "app_server" / "FL_global_model.pt", map_location="cpu", weights_only=False)["model"]
    persistor = next(c for c in json.loads((tmp_path / "ws_job/simclr_pretrain/app/config/config_fed_server.json")
                                           .read_text())["components"] if c["id"] == "persistor")["args"]
    initial = methods.build("simclr", persistor["method_config"])  # the server's seeded round-0 model
    tax, state = initial.state_taxonomy(), initial.state_dict()
    assert set(ckpt) == set(state) and tax["site"]
    for k in tax["site"]:  # the counters stay on the sites: the server keeps its own
        assert torch.equal(torch.as_tensor(ckpt[k]), state[k]), k
    assert not torch.equal(torch.as_tensor(ckpt["encoder.model.0.conv.unit0.conv.weight"]),
                           state["encoder.model.0.conv.unit0.conv.weight"])  # trained
    assert not torch.equal(torch.as_tensor(ckpt[next(k for k in tax["federated"] if k.startswith("projector."))]),
                           state[next(k for k in tax["federated"] if k.startswith("projector."))])
    out = tmp_path / "encoder.pt"
    assert flssl(["export-backbone", "--checkpoint", str(job / "app_server" / "FL_global_model.pt"),
                  "--out", str(out)]) == 0
    exported = torch.load(out, map_location="cpu", weights_only=True)
    from fl_plugins.models.factory import build_model

    unet = build_model({"arch": "unet", "num_classes": 3, **TINY, "pretrained": str(out)})
    own = unet.state_dict()
    assert exported and all(torch.equal(own[k], v) for k, v in exported.items())
    assert torch.equal(exported["model.0.conv.unit0.conv.weight"], ckpt["encoder.model.0.conv.unit0.conv.weight"])
