"""Data that does not fit a ready job is caught before FLARE starts (check-data --job, the simulate pre-flight)
and when a site starts, with the file, the setting and what to do; notes say what the data layer does to RGB."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fl_plugins.cli import _num_classes_from_data
from fl_plugins.cli import main as flssl
from fl_plugins.data import data_geometry, load_datalist
from fl_plugins.flare.data_check import job_data_notes
from fl_plugins.flare.jobs.data_fit import job_data_problems
from fl_plugins.flare.job_builder import job_settings


def _medmnist_site(root: Path, images: np.ndarray, num_classes: int = 2) -> Path:
    """A one-site MedMNIST-format datalist over a small hand-made ``.npz``."""
    root.mkdir(parents=True)
    n = images.shape[0]
    labels = (np.arange(n) % num_classes).reshape(-1, 1)
    np.savez(root / "data.npz", **{f"{s}_images": images for s in ("train", "val", "test")},
             **{f"{s}_labels": labels for s in ("train", "val", "test")})
    entries = lambda split: [{"npz": "data.npz", "split": split, "index": i, "label": int(labels[i, 0])}  # noqa: E731
                             for i in range(n)]
    dl = {"format": "medmnist", "task": "classification", "num_classes": num_classes, "modality_preset": "unit",
          "training": entries("train"), "validation": entries("val"), "test": entries("test")}
    (root / "datalist.json").write_text(json.dumps(dl))
    return root / "datalist.json"


@pytest.mark.parametrize("shape,dims,channels", [((6, 28, 28), 2, 1), ((6, 28, 28, 3), 2, 3), ((6, 8, 28, 28), 3, 1)])
def test_geometry_read_from_the_file_header(tmp_path, shape, dims, channels):
    dl = load_datalist(_medmnist_site(tmp_path / "s", np.zeros(shape, np.uint8)))
    geo = data_geometry(dl)
    assert (geo.spatial_dims, geo.file_channels) == (dims, channels)


def test_3d_data_for_a_2d_job_is_named(tmp_path):
    dl = load_datalist(_medmnist_site(tmp_path / "s", np.zeros((6, 8, 28, 28), np.uint8)))
    (p,) = job_data_problems("finetune_cls", job_settings("finetune_cls"), dl)
    assert "holds 3D images" in p and "data.npz" in p and "'finetune_cls' trains a 2D model" in p
    assert p.endswith("trains a 2D model: --set model.spatial_dims=3")  # the ViT over slices (models.slice_classifier)
    assert job_data_problems("finetune_cls", job_settings("finetune_cls", {"model": {"spatial_dims": 3}}), dl) == []
    (p,) = job_data_problems("finetune_cls_cnn", job_settings("finetune_cls_cnn"), dl)
    assert p.endswith("trains a 2D model: --set model.spatial_dims=3")
    assert job_data_problems("finetune_cls_cnn", job_settings("finetune_cls_cnn", {"model": {"spatial_dims": 3}}),
                             dl) == []
    assert "holds 3D images" in job_data_problems("dino_pretrain", job_settings("dino_pretrain"), dl)[0]


@pytest.mark.parametrize("job", ["unet_inpaint_pretrain", "mae_vit_pretrain", "mae3d_pretrain"])
def test_pretraining_jobs_refuse_data_of_the_other_dimensionality(tmp_path, synth_seg_data, job):
    """A 2D pretraining job refuses 3D volumes and the 3D job refuses 2D images, naming the job, the datalist and
    the job that fits."""
    from fl_plugins.flare.job_builder import JOBS

    if job not in JOBS:
        pytest.skip(f"job {job} is not registered (its method is not in this tree yet)")
    vol = load_datalist(_medmnist_site(tmp_path / "s3", np.zeros((6, 8, 28, 28), np.uint8)))
    img = load_datalist(synth_seg_data / "site-1" / "datalist.json")
    if job == "mae3d_pretrain":
        (p,) = job_data_problems(job, job_settings(job), img)
        assert p.startswith(f"datalist {img['datalist_path']!r} holds 2D images")
        assert f"but job {job!r} trains on 3D images: use job mae_vit_pretrain" in p
        assert job_data_problems(job, job_settings(job), vol) == []
    else:
        (p,) = job_data_problems(job, job_settings(job), vol)
        assert p.startswith(f"datalist {vol['datalist_path']!r} holds 3D images") and "data.npz" in p
        assert f"but job {job!r} trains on 2D images: use job mae3d_pretrain" in p
        assert job_data_problems(job, job_settings(job), img) == []
    if job == "unet_inpaint_pretrain":  # a 3D U-Net set by hand on 2D data: the setting is named
        (p,) = job_data_problems(job, job_settings(job, {"unet_inpaint": {"unet": {"spatial_dims": 3}}}), img)
        assert p.endswith("trains on 3D images: --set unet_inpaint.unet.spatial_dims=2")


def test_task_and_class_count_mismatches_name_the_setting(synth_seg_data, synth_cls_data):
    seg = load_datalist(synth_seg_data / "site-1" / "datalist.json")
    (p,) = job_data_problems("finetune_cls", job_settings("finetune_cls"), seg)
    assert "is for task 'segmentation' but job 'finetune_cls' fine-tunes for 'classification'" in p
    assert "use job finetune_seg_unet or finetune_seg_vit" in p
    (p,) = job_data_problems("finetune_seg_unet", job_settings("finetune_seg_unet", {"model": {"num_classes": 4}}), seg)
    assert "job 'finetune_seg_unet' has model.num_classes=4 but datalist" in p
    assert p.endswith("declares num_classes=3: --set model.num_classes=3")
    cls = load_datalist(synth_cls_data / "site-1" / "datalist.json")
    assert job_data_problems("finetune_cls", job_settings("finetune_cls"), cls) == []


def test_rgb_note(tmp_path):
    dl = load_datalist(_medmnist_site(tmp_path / "s", np.zeros((6, 28, 28, 3), np.uint8)))
    (note,) = job_data_notes(dl)
    assert "RGB images are converted to one grey channel" in note


def test_check_data_with_job_and_simulate_preflight_refuse_before_flare(synth_seg_data, tmp_path, capsys):
    assert flssl(["check-data", str(synth_seg_data), "--job", "finetune_seg_unet"]) == 0
    assert flssl(["check-data", str(synth_seg_data), "--job", "finetune_cls"]) == 2
    assert "the data does not fit job 'finetune_cls'" in capsys.readouterr().err
    rc = flssl(["simulate", "--job", "finetune_cls", "--data", str(synth_seg_data), "-w", str(tmp_path / "ws"),
                "--sites", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "the data does not fit the job" in err and "fine-tunes for 'classification'" in err
    assert not (tmp_path / "ws").exists()  # FLARE never started


def test_num_classes_taken_from_the_datalist_unless_set(tmp_path, capsys):
    from fl_plugins.data import generate_synthetic_segmentation

    generate_synthetic_segmentation(tmp_path / "d", num_sites=1, volumes_per_site=3, num_slices=4, size=32,
                                    num_classes=4, seed=0)
    template = str(tmp_path / "d" / "{site}" / "datalist.json")
    overrides: dict = {}
    _num_classes_from_data(template, "finetune_seg_unet", overrides)
    assert overrides == {"model": {"num_classes": 4}} and "model.num_classes=4 from" in capsys.readouterr().out
    user = {"model": {"num_classes": 5}}
    _num_classes_from_data(template, "finetune_seg_unet", user)
    assert user == {"model": {"num_classes": 5}}  # the user's setting wins (and the pre-flight then names it)


def test_pretrained_backbone_report_and_a_file_that_does_not_fit(synth_seg_data, tmp_path, capsys, caplog):
    import torch

    from fl_plugins.models.backbone import BackboneSpec, create_backbone
    from fl_plugins.models.factory import build_model
    from fl_plugins.models.pretrained_report import pretrained_report

    vit = {"name": "vit_tiny_patch16_224", "img_size": 64, "patch_size": 8, "in_chans": 1, "depth": 6}
    good = tmp_path / "good.pt"
    torch.save(create_backbone(BackboneSpec.from_dict(vit)).state_dict(), good)
    with caplog.at_level("INFO"):
        model = build_model({"arch": "vit_seg", "num_classes": 3, "backbone": vit, "pretrained": str(good)})
    assert "loaded all" in caplog.text and str(good) in caplog.text
    report = pretrained_report(model, str(good))
    assert "backbone" in report and "loaded from the file" in report
    assert "decoder" in report and "randomly initialised (trained from scratch)" in report
    bad = tmp_path / "bad.pt"
    torch.save(create_backbone(BackboneSpec.from_dict(dict(vit, depth=2))).state_dict(), bad)
    rc = flssl(["simulate", "--job", "finetune_seg_vit", "--data", str(synth_seg_data), "-w", str(tmp_path / "ws"),
                "--sites", "2", "--pretrained", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and "--pretrained" in err and str(bad) in err and "does not fit the backbone" in err
    assert not (tmp_path / "ws").exists()  # refused before FLARE started


def test_messages_for_what_hospitals_have(tmp_path, capsys):
    """A CSV given to split, a Decathlon dataset.json given to check-data, a dataset too small for its sites: each
    message names the file and what to do (options that exist)."""
    import nibabel as nib

    csv = tmp_path / "labels.csv"
    csv.write_text("image,label\na.png,0\n")
    assert flssl(["split", "--dataset", str(csv), "--out", str(tmp_path / "o"), "--sites", "1"]) == 2
    err = capsys.readouterr().err
    assert str(csv) in err and "row 1 (line 2)" in err and "a.png" in err and "not valid JSON" not in err
    (tmp_path / "ds" / "imagesTr").mkdir(parents=True)
    (tmp_path / "ds" / "labelsTr").mkdir()
    for d in ("imagesTr", "labelsTr"):
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.float32), np.eye(4)), tmp_path / "ds" / d / "c1.nii.gz")
    ds = tmp_path / "ds" / "dataset.json"
    ds.write_text(json.dumps({"labels": {"0": "bg", "1": "fg"}, "modality": {"0": "MRI"},
                              "training": [{"image": "./imagesTr/c1.nii.gz", "label": "./labelsTr/c1.nii.gz"}]}))
    assert flssl(["check-data", str(ds)]) == 2
    err = capsys.readouterr().err
    assert "is a dataset description (Decathlon dataset.json), not a site datalist: run 'flssl split" in err
    assert flssl(["split", "--dataset", str(ds), "--out", str(tmp_path / "o"), "--sites", "1"]) == 2
    err = capsys.readouterr().err
    assert "--val-fraction 0 --test-fraction 0" in err and "--eval-only" in err and "smaller" not in err
    assert flssl(["split", "--dataset", str(ds), "--out", str(tmp_path / "o"), "--sites", "1", "--val-fraction", "0",
                  "--test-fraction", "0"]) == 0  # a one-case dataset goes to one site, all training


def _rgb_npz(path: Path, n: int = 12) -> Path:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8)
    labels = (np.arange(n) % 2).reshape(-1, 1)
    np.savez(path, **{f"{s}_images": images for s in ("train", "val", "test")},
             **{f"{s}_labels": labels for s in ("train", "val", "test")})
    return path


def test_rgb_kept_as_three_channels_when_asked(tmp_path):
    """RGB is converted to grey by default (and said); split --rgb keeps 3 channels, and the job must then take 3
    input channels (the check names the setting)."""
    from fl_plugins.data import build_dataset

    src = _rgb_npz(tmp_path / "rgb.npz")
    assert flssl(["split", "--dataset", str(src), "--out", str(tmp_path / "grey"), "--sites", "2"]) == 0
    assert flssl(["split", "--dataset", str(src), "--out", str(tmp_path / "rgb"), "--sites", "2", "--rgb"]) == 0
    grey = load_datalist(tmp_path / "grey" / "site-1" / "datalist.json")
    rgb = load_datalist(tmp_path / "rgb" / "site-1" / "datalist.json")
    g_img = build_dataset(grey, grey["training"], image_size=None)[0]["image"]
    c_img = build_dataset(rgb, rgb["training"], image_size=None)[0]["image"]
    assert tuple(g_img.shape) == (1, 28, 28) and tuple(c_img.shape) == (3, 28, 28)
    raw = np.load(src)["train_images"][int(rgb["training"][0]["index"])].astype(np.float32) / 255
    assert np.allclose(c_img.numpy(), raw.transpose(2, 0, 1))
    assert np.allclose(g_img[0].numpy(), raw @ np.array([0.299, 0.587, 0.114], np.float32), atol=1e-5)
    assert "to keep 3 channels split with --rgb" in job_data_notes(grey)[0] and job_data_notes(rgb) == []
    (p,) = job_data_problems("finetune_cls_cnn", job_settings("finetune_cls_cnn"), rgb)
    assert "keeps RGB images as 3 channels" in p and p.endswith("--set model.in_channels=3")
    (p,) = job_data_problems("finetune_cls", job_settings("finetune_cls"), rgb)
    assert p.endswith("--set model.backbone.in_chans=3")
    fits = job_settings("finetune_cls_cnn", {"model": {"in_channels": 3}})
    assert job_data_problems("finetune_cls_cnn", fits, rgb) == []
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

    from fl_plugins.flare.finetune_handler import FinetuneHandler
    from fl_plugins.flare.handler import SiteContext

    h = FinetuneHandler(SiteContext("site-1", str(tmp_path / "rgb" / "site-1" / "datalist.json"), str(tmp_path)),
                        fits["model"], dict(fits["trainer"], batch_size=4, steps_per_round=1), image_size=28)
    out = h.train(FLModel(params=h.federated_params(), params_type=ParamsType.FULL, current_round=0))
    assert out.params["conv1.weight"].shape[1] == 3  # the first convolution takes the 3 colour channels


def test_rgb_on_grey_data_is_refused(tmp_path, capsys):
    grey = tmp_path / "g.npz"
    np.savez(grey, **{f"{s}_images": np.zeros((4, 28, 28), np.uint8) for s in ("train", "val", "test")},
             **{f"{s}_labels": np.zeros((4, 1), np.int64) for s in ("train", "val", "test")})
    assert flssl(["split", "--dataset", str(grey), "--out", str(tmp_path / "o"), "--sites", "1", "--rgb"]) == 2
    assert "--rgb: MedMNIST file" in capsys.readouterr().err
