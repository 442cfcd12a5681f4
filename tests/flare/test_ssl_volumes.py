"""3D MAE (``mae3d_pretrain``) on Decathlon volumes: a datalist in volume mode (``"volumes": true``) fits the 3D job,
2D jobs refuse it naming the field, and SSLHandler trains MAE 3D on it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fl_plugins.data import generate_synthetic_segmentation, load_datalist
from fl_plugins.flare.jobs.data_fit import job_data_problems
from fl_plugins.flare.handler import SiteContext
from fl_plugins.flare.job_builder import job_settings
from fl_plugins.flare.ssl_handler import SSLHandler

MAE3D = {"variant": "mae", "spatial_dims": 3, "batch_size": 2, "backbone": {"img_size": 16, "patch_size": 4,
                                                                           "depth": 1}, "decoder_depth": 1}


def _site(root: Path, volumes: bool = True) -> Path:
    """1 site: 2 training + 1 validation + 1 test synthetic volumes (16 x 16 x 8), datalist in volume mode."""
    (p,) = generate_synthetic_segmentation(root, num_sites=1, volumes_per_site=4, num_slices=8, size=16, seed=3)
    if volumes:
        p.write_text(json.dumps({**json.loads(p.read_text()), "volumes": True}))
    return p


def test_mae3d_trains_on_decathlon_volumes(tmp_path):
    images: list = []
    site = SiteContext("site-1", str(_site(tmp_path / "d")), str(tmp_path),
                       log_image=lambda tag, image, step: images.append(image))
    h = SSLHandler(site, "mae", dict(MAE3D), steps_per_round=2, total_rounds=1, knn_every=1, spatial_dims=3)
    assert h.num_train_items == 2 and h.knn_val == []  # whole volumes: no k-NN label, monitor off
    assert h.preview_images.shape == (1, 1, 16, 16, 16)  # the validation volume
    before = {k: v.clone() for k, v in h.method.federated_state_dict().items()}
    stats = h.local_train(0)
    assert math.isfinite(stats["loss"])
    after = h.method.federated_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # 2 AdamW steps changed the weights
    h.log_round(stats, 0)
    assert len(images) == 1 and images[0].shape == (1, 3 * 16 + 4, 16)


def test_sslhandler_refuses_the_other_mode_naming_the_field(tmp_path):
    site = SiteContext("site-1", str(_site(tmp_path / "d", volumes=False)), str(tmp_path))
    with pytest.raises(ValueError, match=r"holds 2D images.*trains on 3D images: .*flssl split --volumes"):
        SSLHandler(site, "mae", dict(MAE3D), steps_per_round=1, knn_every=0, spatial_dims=3)


def test_data_checks_volume_mode(tmp_path):
    vol = load_datalist(_site(tmp_path / "v"))
    assert job_data_problems("mae3d_pretrain", job_settings("mae3d_pretrain"), vol) == []
    (p,) = job_data_problems("mae_vit_pretrain", job_settings("mae_vit_pretrain"), vol)
    assert p.startswith(f"datalist {vol['datalist_path']!r} holds 3D images") and '"volumes": true' in p
    assert 'use job mae3d_pretrain, or read its volumes as 2D slices instead: remove "volumes": true' in p
    for job in ("dino_pretrain", "finetune_seg_unet"):
        (p,) = job_data_problems(job, job_settings(job), vol)
        assert 'remove "volumes": true from the datalist (or split again without --volumes)' in p
    sl = load_datalist(_site(tmp_path / "s", volumes=False))
    (p,) = job_data_problems("mae3d_pretrain", job_settings("mae3d_pretrain"), sl)
    assert p.endswith("use job mae_vit_pretrain, or read its volumes whole (3D) instead: split with flssl split "
                      '--volumes (datalist field "volumes": true)')


def test_split_volumes_then_check_data(tmp_path, capsys):
    """``flssl split --volumes`` writes a datalist that check-data accepts for mae3d_pretrain, refuses for 2D."""
    from fl_plugins.cli import main as flssl

    src = _site(tmp_path / "src", volumes=False).parent
    ds = {"name": "tiny", "labels": {"0": "bg", "1": "a", "2": "b"},
          "training": [{"image": f"imagesTr/site-1_case00{i}.nii.gz", "label": f"labelsTr/site-1_case00{i}.nii.gz"}
                       for i in range(4)]}
    (src / "dataset.json").write_text(json.dumps(ds))
    out = tmp_path / "sites"
    assert flssl(["split", "--dataset", str(src / "dataset.json"), "--out", str(out), "--sites", "1", "--volumes",
                  "--val-fraction", "0.25", "--test-fraction", "0.25"]) == 0
    assert json.loads((out / "site-1" / "datalist.json").read_text())["volumes"] is True
    assert flssl(["check-data", str(out), "--job", "mae3d_pretrain"]) == 0
    capsys.readouterr()
    assert flssl(["check-data", str(out), "--job", "mae_vit_pretrain"]) == 2
    assert 'remove "volumes": true' in capsys.readouterr().err
    npz = tmp_path / "x.npz"
    npz.write_bytes(b"")
    assert flssl(["split", "--dataset", str(npz), "--out", str(tmp_path / "o"), "--sites", "1", "--volumes"]) == 2
    assert "leave --volumes out" in capsys.readouterr().err
