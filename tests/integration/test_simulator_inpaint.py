"""The shipped U-Net inpainting pretraining job in the real FLARE simulator (2 sites, 2 rounds x 2 steps, tiny U-Net
on generated data): the global checkpoint holds exactly the federated state, the ``ssl/preview`` image of every
round reaches the server's TensorBoard, and the exported U-Net starts ``finetune_seg_unet`` (``model.pretrained``):
every tensor but the output block equals the pretrained one, and a fine-tuning round runs from it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fl_plugins import methods
from fl_plugins.cli import main as flssl

pytestmark = pytest.mark.slow

TINY_UNET = {"channels": [4, 8], "strides": [2]}
SETS = ["--set", "steps_per_round=2", "--set", "unet_inpaint.batch_size=4", "--set", "unet_inpaint.image_size=32",
        "--set", f"unet_inpaint.unet.channels={json.dumps(TINY_UNET['channels'])}",
        "--set", f"unet_inpaint.unet.strides={json.dumps(TINY_UNET['strides'])}"]


def test_inpaint_pretrain_preview_export_and_finetune(synth_seg_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ws = tmp_path / "ws"
    rc = flssl(["simulate", "--job", "unet_inpaint_pretrain", "--data", str(synth_seg_data), "-w", str(ws),
                "--sites", "2", "--rounds", "2", "--quiet", *SETS])
    log = tmp_path / "ws_simulate.log"
    assert rc == 0, log.read_text()[-4000:] if log.is_file() else "no log"
    app = ws / "server" / "simulate_job" / "app_server"
    persistor = next(c for c in json.loads((tmp_path / "ws_job/unet_inpaint_pretrain/app/config/"
                                            "config_fed_server.json").read_text())["components"]
                     if c["id"] == "persistor")["args"]
    initial = methods.build(persistor["method"], persistor["method_config"])  # the server's seeded round-0 model
    ckpt = torch.load(app / "FL_global_model.pt", map_location="cpu", weights_only=False)["model"]
    tax = initial.state_taxonomy()
    assert set(ckpt) == set(initial.state_module().state_dict()) and tax["site"]
    for k in tax["site"]:  # the num_batches_tracked counters stay on the sites: the server keeps its own
        assert torch.equal(torch.as_tensor(ckpt[k]), initial.state_module().state_dict()[k]), k
    assert not torch.equal(torch.as_tensor(ckpt["model.0.conv.unit0.conv.weight"]),
                           initial.state_module().state_dict()["model.0.conv.unit0.conv.weight"])  # trained
    for site in ("site-1", "site-2"):
        acc = EventAccumulator(str(ws / "server/simulate_job/tb_events" / site), size_guidance={"images": 0})
        acc.Reload()
        assert "ssl/loss" in acc.Tags()["scalars"] and "ssl/preview" in acc.Tags()["images"], acc.Tags()
        shots = acc.Images("ssl/preview")
        assert [e.step for e in shots] == [0, 1]  # one image per round
        assert (shots[0].height, shots[0].width) == (3 * 32 + 2 * 2, 4 * 32 + 3 * 2)  # 3 rows x 4 images

    out = tmp_path / "unet.pt"
    assert flssl(["export-backbone", "--checkpoint", str(app / "FL_global_model.pt"), "--out", str(out)]) == 0
    exported = torch.load(out, map_location="cpu", weights_only=True)
    from fl_plugins.flare.finetune_handler import FinetuneHandler
    from fl_plugins.flare.handler import SiteContext
    from fl_plugins.flare.job_builder import build_job, job_settings
    from fl_plugins.flare.persistor import ConfigModelPersistor

    over = {"model": {"pretrained": str(out), **TINY_UNET}, "image_size": 32,
            "trainer": {"batch_size": 4, "steps_per_round": 1}}
    build_job("finetune_seg_unet", over)  # the job takes the export
    s = job_settings("finetune_seg_unet", over)
    # what the fine-tuning job's server sends in round 0: its persistor builds the model with model.pretrained
    start = ConfigModelPersistor(model_config=s["model"]).build_global_model().state_dict()
    loaded = [k for k in start if not k.startswith("model.2.")]  # all but the output block (classes vs channels)
    assert loaded and set(loaded) <= set(exported)
    for k in loaded:
        assert torch.equal(start[k], exported[k]), k
    h = FinetuneHandler(SiteContext("site-1", str(synth_seg_data / "site-1" / "datalist.json"), str(tmp_path)),
                        s["model"], dict(s["trainer"]), image_size=s["image_size"])
    params = {k: v.numpy() for k, v in start.items() if k in h.federated_params()}
    res = h.train(FLModel(params=params, params_type=ParamsType.FULL, current_round=0, total_rounds=1))
    assert np.isfinite(res.meta["train_loss"]) and set(res.params) == set(params)
