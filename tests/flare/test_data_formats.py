"""What hospitals have: Decathlon datasets of one or few cases (all to one site, evaluation-only sets) and a PNG
folder with a CSV of labels trained end to end by the fine-tuning handler."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from PIL import Image

from fl_plugins.cli import main as flssl
from fl_plugins.data import DataError, load_datalist, validate_datalist
from fl_plugins.engine.finetune import federated_keys
from fl_plugins.flare.finetune_handler import FinetuneHandler
from fl_plugins.flare.handler import SiteContext
from fl_plugins.models.factory import build_model

EVAL_ONLY = "is evaluation-only"


def _decathlon(root: Path, sections: dict[str, int]) -> Path:
    """Real 8x8x2 NIfTI cases (a foreground square) in the given sections of a dataset.json."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    ds: dict = {"name": "Few", "labels": {"0": "background", "1": "fg"}, "modality": {"0": "MRI"}}
    k = 0
    for section, n in sections.items():
        ds[section] = []
        for _ in range(n):
            k += 1
            img = np.random.default_rng(k).random((8, 8, 2)).astype(np.float32)
            lab = np.zeros((8, 8, 2), np.uint8)
            lab[2:6, 2:6] = 1
            for d, a in (("imagesTr", img), ("labelsTr", lab)):
                nib.save(nib.Nifti1Image(a, np.eye(4)), root / d / f"case{k}.nii.gz")
            ds[section].append({"image": f"./imagesTr/case{k}.nii.gz", "label": f"./labelsTr/case{k}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps(ds))
    return root / "dataset.json"


def _split(ds: Path, out: Path, sites: int, *extra: str) -> int:
    return flssl(["split", "--dataset", str(ds), "--out", str(out), "--sites", str(sites), *extra])


@pytest.mark.parametrize("cases,sites,extra,expect", [
    (1, 1, [], ["site-1 gets only 1 patients/cases", "--val-fraction 0 --test-fraction 0", "--eval-only"]),
    (2, 2, [], ["--sites 1 puts every case on one site", "--val-fraction 0 --test-fraction 0", "--eval-only"]),
    (1, 2, [], ["num_sites=2 exceeds the 1 training", "--sites 1 or fewer", "--eval-only"]),
])
def test_few_cases_error_names_real_options(tmp_path, capsys, cases, sites, extra, expect):
    assert _split(_decathlon(tmp_path / "ds", {"training": cases}), tmp_path / "out", sites, *extra) == 2
    err = capsys.readouterr().err
    assert "smaller" not in err and "dataset.json" in err
    for e in expect:
        assert e in err, err


@pytest.mark.parametrize("cases,extra,sizes", [
    (1, ["--val-fraction", "0", "--test-fraction", "0"], (1, 0, 0)),
    (3, [], (1, 1, 1)),
])
def test_few_cases_to_one_site(tmp_path, capsys, cases, extra, sizes):
    assert _split(_decathlon(tmp_path / "ds", {"training": cases}), tmp_path / "out", 1, *extra) == 0
    dl = load_datalist(tmp_path / "out" / "site-1" / "datalist.json")
    assert tuple(len(dl[s]) for s in ("training", "validation", "test")) == sizes and "eval_only" not in dl
    capsys.readouterr()
    assert flssl(["check-data", str(tmp_path / "out")]) == 0  # empty sections are noted, not refused
    out = capsys.readouterr().out
    assert ("section 'validation' is empty" in out) == (sizes[1] == 0)


@pytest.mark.parametrize("sections,extra", [({"test": 3}, []), ({"training": 2, "validation": 1}, ["--eval-only"])])
def test_eval_only_split_evaluates_and_refuses_training(tmp_path, capsys, sections, extra):
    ds = _decathlon(tmp_path / "ds", sections)
    out = tmp_path / "out"
    assert flssl(["check-data", str(ds)]) == 2  # a dataset description, even with a test section only
    assert "is a dataset description (Decathlon dataset.json)" in capsys.readouterr().err
    assert _split(ds, out, 2, *extra) == 0
    dls = [load_datalist(out / s / "datalist.json") for s in ("site-1", "site-2")]
    assert all(dl["eval_only"] and dl["training"] == [] == dl["validation"] for dl in dls)
    assert sum(len(dl["test"]) for dl in dls) == 3
    assert json.loads((out / "split_summary.json").read_text())["eval_only"] is True
    capsys.readouterr()
    assert flssl(["check-data", str(out)]) == 0
    assert "evaluation-only" in capsys.readouterr().out
    # flssl evaluate reads the test sections
    cfg = {"arch": "unet", "num_classes": 2, "channels": [4, 8], "strides": [2], "num_res_units": 0}
    torch.save(build_model(cfg).state_dict(), tmp_path / "model.pt")
    assert flssl(["evaluate", "--checkpoint", str(tmp_path / "model.pt"), "--model-config", json.dumps(cfg),
                  "--data", str(out), "--image-size", "8", "--out", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["metric"] == "dice" and r["overall"]["n"] == 3
    # training refuses, with what to do
    with pytest.raises(DataError, match=f"{EVAL_ONLY}.*flssl evaluate"):
        validate_datalist(dls[0], sections=("training", "validation"))
    capsys.readouterr()
    assert flssl(["check-data", str(out), "--job", "finetune_seg_unet"]) == 2
    assert EVAL_ONLY in capsys.readouterr().err
    assert flssl(["simulate", "--job", "finetune_seg_unet", "--data", str(out), "-w", str(tmp_path / "ws"),
                  "--sites", "2"]) == 2
    assert EVAL_ONLY in capsys.readouterr().err and not (tmp_path / "ws").exists()


def _png_csv(root: Path, task: str, n: int = 24) -> Path:
    """n noisy 40x40 PNGs; odd ones hold a bright square (class 1; segmentation: the mask's class 1)."""
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = ["image,label" if task == "classification" else "image,mask"]
    for i in range(n):
        a = rng.integers(0, 60, (40, 40), dtype=np.uint8)
        m = np.zeros((40, 40), np.uint8)
        if i % 2:
            a[10:30, 10:30] += 150
            m[10:30, 10:30] = 1
        Image.fromarray(a).save(root / "img" / f"x{i}.png")
        Image.fromarray(m).save(root / "img" / f"m{i}.png")
        lines.append(f"img/x{i}.png,{i % 2}" if task == "classification" else f"img/x{i}.png,img/m{i}.png")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv"


def test_finetune_handler_trains_on_csv_classification(tmp_path):
    """A PNG folder + CSV -> flssl split -> the fine-tuning handler trains 2 steps and validates."""
    assert _split(_png_csv(tmp_path / "ds", "classification"), tmp_path / "out", 2) == 0
    cfg = {"arch": "vit_classifier", "num_classes": 2, "head": "linear",
           "backbone": {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "depth": 1}}
    site = SiteContext("site-1", str(tmp_path / "out" / "site-1" / "datalist.json"), str(tmp_path), lambda *a: None)
    h = FinetuneHandler(site, cfg, {"task": "classification", "lr": 1e-3, "batch_size": 4, "steps_per_round": 2},
                        image_size=32)
    m = build_model(cfg)
    sd = m.state_dict()
    g = FLModel(params={k: sd[k].numpy().astype(np.float32) for k in federated_keys(m)},
                params_type=ParamsType.FULL, current_round=0, total_rounds=1)
    out = h.train(g)
    assert h.num_train_items == 9 and set(out.params) == set(g.params)  # 12 images: 1 validation, 2 test
    assert {"val_accuracy", "val_balanced_accuracy"} <= set(out.metrics)
    assert any(not np.array_equal(out.params[k], g.params[k]) for k in out.params)  # it trained


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_dino_handler_on_csv_images(tmp_path, caplog, task):
    """SSL pretraining reads the same datalists; the k-NN monitor uses the class labels (classification) and is off,
    said, for segmentation images (one-slice items carry no annotation-free label)."""
    from fl_plugins import methods
    from fl_plugins.flare.ssl_handler import SSLHandler

    assert _split(_png_csv(tmp_path / "ds", task), tmp_path / "out", 2) == 0
    tiny = {"backbone": {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "depth": 1},
            "batch_size": 8, "out_dim": 32, "hidden_dim": 32, "bottleneck_dim": 16, "local_crop_size": 16,
            "n_local_crops": 2}
    site = SiteContext("site-1", str(tmp_path / "out" / "site-1" / "datalist.json"), str(tmp_path))
    with caplog.at_level("WARNING"):
        h = SSLHandler(site, "dino", dict(tiny, total_steps=None), steps_per_round=2, total_rounds=1, knn_max_items=64,
                       spatial_dims=2)
    m = methods.build("dino", dict(tiny, total_steps=2))
    out = h.train(FLModel(params={k: v.numpy() for k, v in m.federated_state_dict().items()},
                          params_type=ParamsType.FULL, current_round=0, total_rounds=1))
    assert out.meta["NUM_STEPS_CURRENT_ROUND"] == h.num_train_items == 9
    if task == "classification":
        assert 0.0 <= out.metrics["knn_accuracy"] <= 1.0
    else:
        assert "k-NN monitor off: PNG/JPEG segmentation images" in caplog.text and "knn_accuracy" not in out.metrics
