"""``flssl export-backbone`` on the masked-image-modelling jobs' checkpoints: the file loads where the printed hint
says (U-Net inpainting: finetune_seg_unet's model.pretrained; MAE 2D: the timm ViT; MAE 3D: MONAI's ViT), and the
simulate pre-flight reports what a U-Net export fills and refuses one that does not fit, before FLARE starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fl_plugins.cli import main as flssl
from fl_plugins.flare.job_builder import build_job

SMALL = {"unet_inpaint_pretrain": {"unet_inpaint": {"unet": {"channels": [4, 8], "strides": [2]}}},
         "mae_vit_pretrain": {"mae": {"backbone": {"depth": 1}, "decoder_depth": 1}},
         "mae3d_pretrain": {"mae": {"backbone": {"depth": 1}, "decoder_depth": 1}}}


def _checkpoint(job: str, tmp_path: Path) -> tuple[Path, Path, torch.nn.Module]:
    """(checkpoint, job folder, global model): the job's seeded initial global model (the method's state module),
    changed a little, saved as the server saves it."""
    from fl_plugins.flare.persistor import ConfigModelPersistor

    build_job(job, SMALL[job]).export_job(str(tmp_path / "jobs"))
    job_dir = tmp_path / "jobs" / job
    server = json.loads((job_dir / "app/config/config_fed_server.json").read_text())
    args = next(c for c in server["components"] if c["id"] == "persistor")["args"]
    model = ConfigModelPersistor(**args).build_global_model()
    with torch.no_grad():  # not the initial weights: what is exported is what the checkpoint holds
        for p in model.parameters():
            p.add_(0.01)
    ckpt = tmp_path / "FL_global_model.pt"
    torch.save({"model": model.state_dict()}, ckpt)
    return ckpt, job_dir, model


@pytest.mark.parametrize("job", sorted(SMALL))
def test_export_backbone_of_mim_jobs_loads_where_the_hint_says(job, tmp_path, capsys):
    ckpt, job_dir, model = _checkpoint(job, tmp_path)
    out = tmp_path / "backbone.pt"
    assert flssl(["export-backbone", "--checkpoint", str(ckpt), "--out", str(out), "--job", str(job_dir)]) == 0
    printed = capsys.readouterr().out
    sd = torch.load(out, map_location="cpu", weights_only=True)
    if job == "unet_inpaint_pretrain":
        from fl_plugins.models.factory import build_model

        assert "--job finetune_seg_unet --pretrained" in printed
        assert "--set 'model.channels=[4,8]' --set 'model.strides=[2]'" in printed and "teacher" not in printed
        seg = build_model({"arch": "unet", "num_classes": 3, "channels": [4, 8], "strides": [2],
                           "pretrained": str(out)})
        own = seg.state_dict()
        for k, v in model.state_dict().items():  # the U-Net itself
            if not k.startswith("model.2."):  # all but the output block
                assert torch.equal(own[k], v), k
    elif job == "mae_vit_pretrain":
        from fl_plugins.models.backbone import create_backbone

        assert "--job finetune_seg_vit --pretrained" in printed and "teacher" not in printed
        vit = create_backbone(model.config.backbone)
        vit.load_state_dict(sd)  # strict: exactly the timm ViT's keys
        assert torch.equal(vit.pos_embed, model.encoder.pos_embed)
    else:
        from monai.networks.nets import ViT

        from fl_plugins.methods.mae import vit3d_kwargs

        assert "monai.networks.nets.ViT(" in printed
        vit = ViT(**vit3d_kwargs(model.config))
        vit.load_state_dict(sd)  # strict: exactly MONAI's ViT keys
        assert torch.equal(vit.patch_embedding.patch_embeddings.weight,
                           model.mae.patch_embedding.patch_embeddings.weight)


def test_simulate_preflight_reports_a_unet_export_and_refuses_one_that_does_not_fit(synth_seg_data, tmp_path,
                                                                                      capsys):
    ckpt, job_dir, _ = _checkpoint("unet_inpaint_pretrain", tmp_path)
    out = tmp_path / "unet.pt"
    assert flssl(["export-backbone", "--checkpoint", str(ckpt), "--out", str(out), "--job", str(job_dir)]) == 0
    capsys.readouterr()
    # the default U-Net of finetune_seg_unet has other channels than this tiny export: refused, FLARE never starts
    rc = flssl(["simulate", "--job", "finetune_seg_unet", "--data", str(synth_seg_data), "-w", str(tmp_path / "ws"),
                "--sites", "2", "--pretrained", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "--pretrained" in err and str(out) in err and "does not fit this U-Net" in err
    assert not (tmp_path / "ws").exists()
