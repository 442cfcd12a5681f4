"""Decathlon datalists in volume mode (``"volumes": true``, ``flssl split --volumes``): one item per volume fitted
into an ``S^3`` cube, reported as 3D by ``data_geometry``."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fl_plugins.data import (
    DataError,
    VolumeDataset,
    build_dataset,
    data_geometry,
    generate_synthetic_segmentation,
    get_preset,
    load_datalist,
)


def _volume_datalist(root: Path, volumes: object = True) -> Path:
    """1 synthetic site (2 training + 1 validation + 1 test volumes of 16 x 16 x 8 voxels, 3 classes), its
    datalist switched to volume mode."""
    (p,) = generate_synthetic_segmentation(root, num_sites=1, volumes_per_site=4, num_slices=8, size=16,
                                           num_classes=3, seed=2)
    dl = json.loads(p.read_text())
    dl["volumes"] = volumes
    p.write_text(json.dumps(dl))
    return p


def test_volume_items_keep_aspect_and_voxels(tmp_path):
    """16 x 16 x 8 at S=16: no resampling, the 8 slices centred between 4 + 4 zero slices, labels exact."""
    dl = load_datalist(_volume_datalist(tmp_path))
    assert data_geometry(dl).spatial_dims == 3 and '"volumes": true' in data_geometry(dl).source
    ds = build_dataset(dl, dl["training"], image_size=16, with_labels=True)
    assert isinstance(ds, VolumeDataset) and len(ds) == 2
    item = ds[1]
    assert set(item) == {"image", "label", "volume_id"} and item["volume_id"] == "site-1_case001"
    assert item["image"].shape == (1, 16, 16, 16) and item["image"].dtype == torch.float32
    assert item["label"].shape == (16, 16, 16) and item["label"].dtype == torch.int64
    assert type(item["image"]) is torch.Tensor  # a plain tensor, not MONAI's MetaTensor
    e = dl["training"][1]
    vol = get_preset("mr")(nib.load(e["image"]).get_fdata(dtype=np.float32))
    np.testing.assert_allclose(item["image"][0, :, :, 4:12].numpy(), vol, atol=1e-6)
    assert (item["image"][0, :, :, :4] == 0).all() and (item["image"][0, :, :, 12:] == 0).all()
    lab = np.asarray(nib.load(e["label"]).dataobj).astype(np.int64)
    np.testing.assert_array_equal(item["label"][:, :, 4:12].numpy(), lab)
    assert (item["label"][:, :, :4] == 0).all()


def test_volume_resize_down_and_normalisation(tmp_path):
    dl = load_datalist(_volume_datalist(tmp_path))
    ds = build_dataset(dl, dl["training"] + dl["validation"], image_size=8, with_labels=True)
    items = [ds[i] for i in range(len(ds))]
    for it in items:
        assert it["image"].shape == (1, 8, 8, 8) and torch.isfinite(it["image"]).all()
        assert set(torch.unique(it["label"]).tolist()) <= {0, 1, 2} and it["label"].max() > 0
        assert (it["image"][0, :, :, :2] == 0).all()  # 16 x 16 x 8 -> 8 x 8 x 4, padded 2 + 2
    nz = items[0]["image"][0, :, :, 2:6]
    assert abs(float(nz.mean())) < 0.5 and 0.5 < float(nz.std()) < 1.5  # MR z-score survives the resampling
    unit = VolumeDataset(dl["training"], preset="unit", image_size=8, with_labels=False)[0]
    assert set(unit) == {"image", "volume_id"} and 0 <= float(unit["image"].min()) and float(unit["image"].max()) <= 1


def test_volume_cache_returns_copies(tmp_path):
    dl = load_datalist(_volume_datalist(tmp_path))
    ds = build_dataset(dl, dl["training"], image_size=8, with_labels=False, cache=True)
    a = ds[0]
    a["image"].zero_()
    assert ds[0]["image"].abs().sum() > 0 and 0 in ds._cache


@pytest.mark.parametrize("value,fmt", [("yes", "decathlon"), (1, "decathlon"), (True, "medmnist")])
def test_volumes_field_checked(tmp_path, value, fmt):
    p = _volume_datalist(tmp_path, volumes=value)
    if fmt == "medmnist":
        dl = json.loads(p.read_text())
        dl.update(format="medmnist", task="classification", training=[], validation=[], test=[])
        p.write_text(json.dumps(dl))
    with pytest.raises(DataError, match="field 'volumes'.*'flssl split --volumes'"):
        load_datalist(p)


def test_without_the_field_still_slices(tmp_path):
    dl = load_datalist(_volume_datalist(tmp_path, volumes=False))
    assert data_geometry(dl).spatial_dims == 2
    assert build_dataset(dl, dl["training"], image_size=16)[0]["image"].shape == (1, 16, 16)


def test_split_volumes_writes_the_field(tmp_path):
    from fl_plugins.data import split_decathlon

    (p,) = generate_synthetic_segmentation(tmp_path / "src", num_sites=1, volumes_per_site=4, num_slices=4, size=16)
    ds = {"name": "tiny", "labels": {"0": "bg", "1": "a", "2": "b"}, "modality": {"0": "MRI"},
          "training": [{"image": str(p.parent / f"imagesTr/site-1_case00{i}.nii.gz"),
                        "label": str(p.parent / f"labelsTr/site-1_case00{i}.nii.gz")} for i in range(4)]}
    (tmp_path / "dataset.json").write_text(json.dumps(ds))
    (vol,) = split_decathlon(tmp_path / "dataset.json", tmp_path / "v", num_sites=1, volumes=True)
    (sl,) = split_decathlon(tmp_path / "dataset.json", tmp_path / "s", num_sites=1)
    assert json.loads(vol.read_text())["volumes"] is True and "volumes" not in json.loads(sl.read_text())
    assert data_geometry(load_datalist(vol)).spatial_dims == 3
