"""PNG/JPEG folders with a CSV of labels (datalist format "images"): split -> datalists -> dataset items, and every
bad input named with its CSV row, file and value."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fl_plugins.cli import main as flssl
from fl_plugins.data import DataError, build_dataset, data_geometry, load_datalist, validate_datalist
from fl_plugins.flare.data_check import job_data_notes

GREY = 100  # the body value of every test image; one pixel 0 and one 255 fix the min-max of the 'unit' preset
COLOUR = (200, 100, 50)


def _image(path: Path, rgb: bool, shape: tuple[int, int] = (20, 24)) -> None:
    a = np.empty((*shape, 3), np.uint8)
    a[:] = COLOUR if rgb else GREY
    a[0, 0], a[0, 1] = 0, 255
    Image.fromarray(a if rgb else a[..., 0]).save(path)


def _classification(root: Path, n: int = 16, rgb: bool = False, suffix: str = "png", columns=None,
                    names: bool = False, patients: bool = True) -> Path:
    """n images, labels 0/1 alternating (or class names), 2 images per patient of the same class."""
    c = {"image": "image", "label": "label", "patient": "patient", **(columns or {})}
    (root / "img").mkdir(parents=True)
    lines = [",".join([c["image"], c["label"]] + ([c["patient"]] if patients else []))]
    for i in range(n):
        cls = (i // 2) % 2
        _image(root / "img" / f"case{i:02d}.{suffix}", rgb)
        lab = ["benign", "malignant"][cls] if names else str(cls)
        lines.append(",".join([f"img/case{i:02d}.{suffix}", lab] + ([f"p{i // 2}"] if patients else [])))
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv"


def _segmentation(root: Path, n: int = 6) -> Path:
    """n 20x20 grey images with masks of classes 0 (background), 1 (top-left block), 2 (bottom-right block)."""
    (root / "img").mkdir(parents=True)
    (root / "masks").mkdir()
    lines = ["image,mask"]
    for i in range(n):
        _image(root / "img" / f"s{i}.png", False, (20, 20))
        m = np.zeros((20, 20), np.uint8)
        m[2:9, 2:9], m[11:18, 11:18] = 1, 2
        Image.fromarray(m).save(root / "masks" / f"s{i}.png")
        lines.append(f"img/s{i}.png,masks/s{i}.png")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv"


def _split(csv: Path, out: Path, *extra: str, sites: int = 2) -> int:
    return flssl(["split", "--dataset", str(csv), "--out", str(out), "--sites", str(sites), *extra])


@pytest.mark.parametrize("suffix,rgb", [("png", False), ("png", True), ("jpg", False)])
def test_classification_csv_split_to_items(tmp_path, suffix, rgb):
    csv = _classification(tmp_path / "ds", rgb=rgb, suffix=suffix)
    assert _split(csv, tmp_path / "out", *(["--rgb"] if rgb else [])) == 0
    assert flssl(["check-data", str(tmp_path / "out")]) == 0
    owner: dict[str, str] = {}
    for site in ("site-1", "site-2"):
        dl = load_datalist(tmp_path / "out" / site / "datalist.json")
        assert (dl["format"], dl["task"], dl["num_classes"], dl["modality_preset"]) == ("images", "classification", 2,
                                                                                        "unit")
        assert dl.get("rgb", False) is rgb
        for s in ("training", "validation", "test"):
            for e in dl[s]:
                assert owner.setdefault(e["patient"], site) == site  # a patient's images on one site
        assert {e["label"] for e in dl["training"]} == {0, 1}  # stratified: both classes train on every site
        ds = build_dataset(dl, dl["training"], image_size=16)
        item = ds[0]
        assert item["image"].shape == (3 if rgb else 1, 16, 16) and item["image"].dtype == torch.float32
        assert item["label"].dtype == torch.int64 and item["label"].ndim == 0
        assert int(item["label"]) == dl["training"][0]["label"]
        native = build_dataset(dl, dl["training"], image_size=None)[0]["image"]
        assert native.shape[-2:] == (20, 24)
        if suffix == "png":  # lossless: a known pixel value round-trips to its 'unit' value
            want = (np.array(COLOUR, np.float32) / 255 if rgb
                    else np.array([GREY / 255], np.float32))
            assert np.allclose(native[:, 10, 10].numpy(), want, atol=1e-6)
            assert np.allclose(item["image"][:, 8, 8].numpy(), want, atol=1e-5)  # a flat region stays flat
    assert len(owner) == 8
    geo = data_geometry(dl)
    assert (geo.spatial_dims, geo.file_channels) == (2, 3 if rgb else 1)


def test_rgb_images_grey_by_default_and_said(tmp_path):
    csv = _classification(tmp_path / "ds", rgb=True, n=8)
    assert _split(csv, tmp_path / "out", sites=1) == 0
    dl = load_datalist(tmp_path / "out" / "site-1" / "datalist.json")
    img = build_dataset(dl, dl["training"], image_size=None)[0]["image"]
    luma = np.dot(np.array(COLOUR, np.float32), [0.299, 0.587, 0.114]) / 255  # white has luma 255
    assert img.shape[0] == 1 and abs(float(img[0, 10, 10]) - luma) < 1e-5
    assert "to keep 3 channels split with --rgb" in job_data_notes(dl)[0]
    grey = _classification(tmp_path / "grey", n=8)
    assert _split(grey, tmp_path / "o2", "--rgb", sites=1) == 2  # --rgb on grey images is refused


def test_columns_named_and_class_names(tmp_path, capsys):
    cols = {"image": "file", "label": "diagnosis", "patient": "subject"}
    csv = _classification(tmp_path / "ds", columns=cols, names=True)
    assert _split(csv, tmp_path / "bad") == 2
    err = capsys.readouterr().err
    assert "no column 'image'" in err and "['file', 'diagnosis', 'subject']" in err and "--image-column" in err
    assert _split(csv, tmp_path / "out", "--image-column", "file", "--label-column", "diagnosis",
                  "--patient-column", "subject") == 0
    dl = load_datalist(tmp_path / "out" / "site-1" / "datalist.json")
    assert dl["labels"] == {"0": "benign", "1": "malignant"} and dl["num_classes"] == 2
    summary = json.loads((tmp_path / "out" / "split_summary.json").read_text())
    assert summary["grouped_by"] == "column 'subject'" and summary["stratified_by_class"]


def test_segmentation_csv_items_and_nearest_masks(tmp_path):
    csv = _segmentation(tmp_path / "ds")
    assert _split(csv, tmp_path / "out", "--val-fraction", "0.2", "--test-fraction", "0", sites=1) == 0
    assert flssl(["check-data", str(tmp_path / "out")]) == 0
    dl = load_datalist(tmp_path / "out" / "site-1" / "datalist.json")
    assert (dl["format"], dl["task"], dl["num_classes"]) == ("images", "segmentation", 3)
    assert json.loads((tmp_path / "out" / "split_summary.json").read_text())["grouped_by"] == "image"
    for size in (13, 32):  # down and up by non-integer factors: a mask keeps only class values
        item = build_dataset(dl, dl["training"], image_size=size)[0]
        assert item["image"].shape == (1, size, size) and item["image"].dtype == torch.float32
        assert item["label"].shape == (size, size) and item["label"].dtype == torch.int64
        assert set(item["label"].unique().tolist()) == {0, 1, 2}
        assert item["volume_id"] == Path(dl["training"][0]["image"]).stem
        assert (item["slice_index"], item["num_slices"]) == (0, 1)
    ssl_item = build_dataset(dl, dl["training"], image_size=16, with_labels=False)[0]
    assert "label" not in ssl_item and ssl_item["num_slices"] == 1


def _rows(csv: Path, edit) -> Path:
    lines = csv.read_text().splitlines()
    edit(lines)
    csv.write_text("\n".join(lines) + "\n")
    return csv


@pytest.mark.parametrize("kind,edit,extra,expect", [
    ("cls", lambda ls: ls.__setitem__(2, "img/nothere.png,0,p0"), [], ["row 2 (line 3)", "nothere.png",
                                                                       "does not exist"]),
    ("cls", lambda ls: ls.__setitem__(3, "img/case02.png,x,p1"), [], ["row 3 (line 4)", "'x'", "not a class id"]),
    ("cls", lambda ls: ls.__setitem__(3, "img/case02.png,-1,p1"), [], ["row 3 (line 4)", "'-1'", "negative"]),
    ("cls", lambda ls: ls.__setitem__(4, "img/case03.png,2,p1"), ["--num-classes", "2"],
     ["row 4 (line 5)", "'2'", "range(num_classes=2)"]),
    ("cls", lambda ls: ls.__setitem__(1, "img/case00.png,,p0"), [], ["row 1 (line 2)", "'label'", "empty"]),
    ("seg", lambda ls: ls.__setitem__(2, "img/s1.png,masks/gone.png"), [], ["row 2 (line 3)", "gone.png"]),
    ("seg", lambda ls: None, ["--num-classes", "2"], ["row 1 (line 2)", "value 2", "range(num_classes=2)"]),
    ("seg", lambda ls: ls.__setitem__(0, "image,segmentation"), [], ["no column 'label'", "no column 'mask'",
                                                                     "['image', 'segmentation']", "--mask-column"]),
])
def test_split_names_bad_csv_input(tmp_path, capsys, kind, edit, extra, expect):
    csv = _classification(tmp_path / "ds") if kind == "cls" else _segmentation(tmp_path / "ds")
    assert _split(_rows(csv, edit), tmp_path / "out", *extra) == 2
    err = capsys.readouterr().err
    assert str(csv) in err or "row" not in expect[0], err
    for e in expect:
        assert e in err, err
    assert "not valid JSON" not in err


@pytest.mark.parametrize("damage,expect", [
    ("unreadable", ["is not a readable PNG/JPEG image", "case"]),
    ("label", ["field 'label' = 7", "range(num_classes=2)"]),
    ("missing", ["does not exist"]),
])
def test_check_data_names_csv_row(tmp_path, capsys, damage, expect):
    csv = _classification(tmp_path / "ds", n=8)
    assert _split(csv, tmp_path / "out", sites=1) == 0
    dl_path = tmp_path / "out" / "site-1" / "datalist.json"
    dl = json.loads(dl_path.read_text())
    e = dl["training"][0]
    if damage == "unreadable":
        Path(e["image"]).write_bytes(b"not a png")
    elif damage == "label":
        e["label"] = 7
        dl_path.write_text(json.dumps(dl))
    else:
        Path(e["image"]).unlink()
    assert flssl(["check-data", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"(row {e['csv_row']} of {str(csv)!r})" in err, err
    for x in expect:
        assert x in err, err
    if damage != "label":
        assert Path(e["image"]).name in err


def test_mask_value_outside_num_classes_found_by_deep_check(tmp_path):
    csv = _segmentation(tmp_path / "ds", n=3)
    assert _split(csv, tmp_path / "out", "--val-fraction", "0", "--test-fraction", "0", sites=1) == 0
    dl = load_datalist(tmp_path / "out" / "site-1" / "datalist.json")
    dl["num_classes"] = 2
    with pytest.raises(DataError, match=r"row 1 of .*mask file .*s0\.png.* values \[2\] outside range\(num_classes=2"):
        validate_datalist(dl, sections=("training",), deep=True)


def test_csv_given_to_check_data_says_split_first(tmp_path, capsys):
    csv = _classification(tmp_path / "ds", n=4)
    assert flssl(["check-data", str(csv)]) == 2
    assert "is a CSV of labels, not a site datalist: run 'flssl split --dataset" in capsys.readouterr().err


def test_labelled_per_site_flags_that_many_patients_and_too_many_is_named(tmp_path):
    from fl_plugins.data import split_images_csv

    csv = _classification(tmp_path / "ds", n=16)  # 8 patients of 2 images; per site of 2: 4, 1 val + 1 test
    paths = split_images_csv(csv, tmp_path / "out", num_sites=2, seed=0, labelled_per_site=1)
    summary = json.loads((tmp_path / "out" / "split_summary.json").read_text())
    for p in paths:
        dl = load_datalist(p)
        labelled = {e["patient"] for e in dl["training"] if e["labelled"]}
        assert len(labelled) == 1 and sum(e["labelled"] for e in dl["training"]) == 2  # both images of one patient
        assert summary["sites"][dl["site"]]["labelled_patients"] == 1
        assert summary["sites"][dl["site"]]["patients"]["training"] == 2
    again = split_images_csv(csv, tmp_path / "again", num_sites=2, seed=0, labelled_per_site=1)
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    with pytest.raises(DataError, match=r"labelled_per_site=3 exceeds the 2 training patients of site-1"):
        split_images_csv(csv, tmp_path / "bad", num_sites=2, labelled_per_site=3)
