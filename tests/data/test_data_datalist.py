from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fl_plugins.data import DataError, labelled_entries, load_datalist, validate_datalist


def _edit(path: Path, fn) -> Path:
    dl = json.loads(path.read_text())
    fn(dl)
    path.write_text(json.dumps(dl))
    return path


def test_load_resolves_relative_paths_and_fills_defaults(tiny_site):
    raw = json.loads(tiny_site.read_text())
    assert raw["training"][0]["image"].startswith("./")
    dl = load_datalist(tiny_site.parent)  # a folder holding datalist.json works too
    e = dl["training"][0]
    assert Path(e["image"]).is_absolute() and Path(e["image"]).is_file()
    assert Path(e["image"]).parent == tiny_site.parent.resolve() / "imagesTr"
    assert e["labelled"] is True and dl["datalist_path"] == str(tiny_site.resolve())
    assert validate_datalist(dl, ("training", "validation", "test"), deep=True) == {
        "training": 1, "validation": 1, "test": 1}


@pytest.mark.parametrize(
    "mutate,expect",
    [
        (lambda d: d.pop("task"), "'task'"),
        (lambda d: d.update(format="dicom"), "'dicom'"),
        (lambda d: d.update(task="detection"), "'detection'"),
        (lambda d: d.update(num_classes=0), "num_classes"),
        (lambda d: d.update(num_classes="3"), "'3'"),
        (lambda d: d.update(validation={"a": 1}), "'validation' must be a list"),
        (lambda d: d.update(modality_preset="imagenet"), "'imagenet'"),
        (lambda d: d["training"][0].pop("image"), "training[0]"),
        (lambda d: d["training"][0].update(labelled="yes"), "'yes'"),
        (lambda d: d["validation"][0].pop("label"), "validation[0]"),
    ],
)
def test_schema_errors_name_file_and_value(tiny_site, mutate, expect):
    _edit(tiny_site, mutate)
    with pytest.raises(DataError) as e:
        load_datalist(tiny_site)
    assert str(tiny_site) in str(e.value) and expect in str(e.value)


@pytest.mark.parametrize("content,expect", [("", "is empty"), ("{not json", "not valid JSON"), ("[1]", "object")])
def test_empty_or_invalid_datalist_file(tmp_path, content, expect):
    p = tmp_path / "datalist.json"
    p.write_text(content)
    with pytest.raises(DataError, match=expect) as e:
        load_datalist(p)
    assert str(p) in str(e.value)


def test_missing_and_empty_data_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist") as e:
        load_datalist(tmp_path / "nowhere" / "datalist.json")
    assert "nowhere" in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty") as e:
        load_datalist(tmp_path / "empty")
    assert "empty" in str(e.value)


def test_empty_section(tiny_site):
    _edit(tiny_site, lambda d: d.update(validation=[]))
    dl = load_datalist(tiny_site)
    with pytest.raises(DataError, match="'validation' is empty") as e:
        validate_datalist(dl)
    assert str(tiny_site.resolve()) in str(e.value)


def test_unlabelled_entries_may_omit_label(tiny_site):
    _edit(tiny_site, lambda d: d["training"][0].pop("label"))
    with pytest.raises(DataError, match="labelled but has no 'label'"):
        load_datalist(tiny_site)
    _edit(tiny_site, lambda d: d["training"][0].update(labelled=False))
    dl = load_datalist(tiny_site)
    assert labelled_entries(dl["training"]) == []
    validate_datalist(dl, deep=True)


def test_missing_image_file_and_missing_folder(tiny_site):
    dl = load_datalist(tiny_site)
    img = Path(dl["training"][0]["image"])
    img.unlink()
    with pytest.raises(DataError, match="does not exist") as e:
        validate_datalist(dl)
    assert img.name in str(e.value)
    for f in img.parent.iterdir():
        f.unlink()
    with pytest.raises(DataError, match="is empty") as e:
        validate_datalist(dl)
    assert "imagesTr" in str(e.value)
    img.parent.rmdir()
    with pytest.raises(DataError, match="does not exist") as e:
        validate_datalist(dl)
    assert "imagesTr" in str(e.value)


@pytest.mark.parametrize("which", ["image", "label"])
def test_corrupt_nifti_is_caught_only_by_deep(tiny_site, which):
    dl = load_datalist(tiny_site)
    bad = Path(dl["validation"][0][which])
    bad.write_bytes(b"this is not a NIfTI file at all" * 10)
    validate_datalist(dl)  # shallow: the file exists
    with pytest.raises(DataError) as e:
        validate_datalist(dl, deep=True)
    assert bad.name in str(e.value) and "validation[0]" in str(e.value)


def test_truncated_gzip_is_corrupt(tiny_site):
    dl = load_datalist(tiny_site)
    bad = Path(dl["training"][0]["image"])
    bad.write_bytes(bad.read_bytes()[:400])
    with pytest.raises(DataError, match="corrupt|readable") as e:
        validate_datalist(dl, deep=True)
    assert bad.name in str(e.value)


def test_label_outside_classes(tiny_site):
    dl = load_datalist(tiny_site)
    path = Path(dl["validation"][0]["label"])
    img = nib.load(path)
    lab = np.asarray(img.dataobj).copy()
    lab[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(lab, img.affine), path)
    with pytest.raises(DataError) as e:
        validate_datalist(dl, deep=True)
    msg = str(e.value)
    assert path.name in msg and "[7]" in msg and "num_classes=3" in msg


def test_shape_mismatch(tiny_site):
    dl = load_datalist(tiny_site)
    path = Path(dl["test"][0]["label"])
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 3), np.uint8), np.eye(4)), path)
    with pytest.raises(DataError) as e:
        validate_datalist(dl, sections=("test",), deep=True)
    assert path.name in str(e.value) and "(16, 16, 4)" in str(e.value) and "(16, 16, 3)" in str(e.value)


def test_medmnist_datalist_deep_checks(mt_sites, tmp_path):
    dl = load_datalist(mt_sites[1])
    assert validate_datalist(dl, ("training", "validation", "test"), deep=True)["training"] > 0
    dl["training"][0]["index"] = 10_000
    with pytest.raises(DataError, match="10000"):
        validate_datalist(dl, deep=True)


@pytest.mark.parametrize("modality,preset", [("MRI", "mr"), ({"0": "CT"}, "ct"), ({"0": "cine-MRI"}, "mr")])
def test_missing_preset_defaults_from_the_modality_with_a_warning(tiny_site, caplog, modality, preset):
    _edit(tiny_site, lambda d: (d.pop("modality_preset", None), d.update(modality=modality)))
    with caplog.at_level("WARNING"):
        dl = load_datalist(tiny_site)
    assert dl["modality_preset"] == preset and "from modality" in dl["modality_preset_reason"]
    assert f"no 'modality_preset'; using '{preset}'" in caplog.text and str(tiny_site) in caplog.text


@pytest.mark.parametrize("modality,expect", [
    (None, "required field 'modality_preset' is missing: set it to one of ['ct', 'mr', 'unit']"),
    ("PET", "required field 'modality_preset' is missing and modality 'PET' is not one of"),
])
def test_missing_preset_without_a_known_modality_is_an_error_naming_the_field(tiny_site, modality, expect):
    _edit(tiny_site, lambda d: (d.pop("modality_preset", None), d.update(modality=modality) if modality else None))
    with pytest.raises(DataError) as e:
        load_datalist(tiny_site)
    assert expect in str(e.value) and str(tiny_site) in str(e.value)


def test_medmnist_without_preset_is_unit(synth_cls_data, tmp_path):
    import shutil

    site = tmp_path / "site-1"
    shutil.copytree(synth_cls_data / "site-1", site)
    _edit(site / "datalist.json", lambda d: d.pop("modality_preset", None))
    dl = load_datalist(site / "datalist.json")
    assert dl["modality_preset"] == "unit" and "8-bit" in dl["modality_preset_reason"]
