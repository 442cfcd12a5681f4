from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from fl_plugins.data import (
    DataError,
    SliceDataset,
    VolumeDataset,
    build_dataset,
    build_split_datasets,
    labelled_entries,
    load_datalist,
    slices_by_volume,
)
from fl_plugins.data.decathlon import pad_to_square


def test_slice_items_shapes_keys_and_order(seg_sites):
    dl = load_datalist(seg_sites[0])
    ds = SliceDataset(dl["training"], preset="mr", image_size=32)
    assert len(ds) == 2 * 12
    item = ds[13]
    assert set(item) == {"image", "label", "volume_id", "slice_index", "num_slices"}
    assert item["image"].shape == (1, 32, 32) and item["image"].dtype == torch.float32
    assert item["label"].shape == (32, 32) and item["label"].dtype == torch.int64
    assert (item["volume_id"], item["slice_index"], item["num_slices"]) == ("site-1_case001", 1, 12)
    groups = slices_by_volume(ds)
    assert groups == {"site-1_case000": list(range(12)), "site-1_case001": list(range(12, 24))}
    assert slices_by_volume([ds[i] for i in (14, 12, 13)]) == {"site-1_case001": [1, 2, 0]}


def test_slice_keeps_position_and_matches_volume(seg_sites):
    """Slice k of the dataset is slice k (last axis) of the preset-normalised volume; labels are exact."""
    dl = load_datalist(seg_sites[0])
    e = dl["validation"][0]
    ds = SliceDataset([e], preset="unit", image_size=64)
    vol = nib.load(e["image"]).get_fdata(dtype=np.float32)
    lab = np.asarray(nib.load(e["label"]).dataobj)
    unit = (vol - vol.min()) / (vol.max() - vol.min())
    for k in (0, 5, 11):
        item = ds[k]
        assert item["slice_index"] == k
        np.testing.assert_allclose(item["image"][0].numpy(), unit[..., k], atol=1e-5)
        np.testing.assert_array_equal(item["label"].numpy(), lab[..., k])


def test_unlabelled_slices_have_no_label_and_cache_loads_once(seg_sites, monkeypatch):
    import fl_plugins.data.decathlon as dec

    calls = []
    real = dec.read_image
    monkeypatch.setattr(dec, "read_image", lambda p: calls.append(p) or real(p))
    ds = SliceDataset(load_datalist(seg_sites[1])["training"], with_labels=False, image_size=16)
    items = [ds[i] for i in range(len(ds))] + [ds[0]]
    assert all("label" not in it for it in items)
    assert len(calls) == 2  # each volume read once


def test_pad_to_square_and_resize_non_square(tmp_path):
    img = np.arange(6 * 4 * 2, dtype=np.float32).reshape(6, 4, 2)
    lab = np.zeros((6, 4, 2), np.uint8)
    lab[:, :2] = 2
    nib.save(nib.Nifti1Image(img, np.eye(4)), tmp_path / "i.nii.gz")
    nib.save(nib.Nifti1Image(lab, np.eye(4)), tmp_path / "l.nii.gz")
    x = pad_to_square(torch.ones(2, 6, 4))
    assert x.shape == (2, 6, 6) and x[:, :, 0].sum() == 0 and x[:, :, 5].sum() == 0
    ds = SliceDataset([{"image": str(tmp_path / "i.nii.gz"), "label": str(tmp_path / "l.nii.gz")}], image_size=12)
    item = ds[1]
    assert item["image"].shape == (1, 12, 12) and set(item["label"].unique().tolist()) == {0, 2}
    assert item["label"][:, :2].sum() == 0  # left padding column stays background


def test_volume_dataset_items(seg_sites):
    dl = load_datalist(seg_sites[0])
    item = VolumeDataset(dl["test"], preset="mr")[0]
    assert set(item) == {"image", "label", "volume_id"}
    assert item["image"].shape == (1, 64, 64, 12) and item["image"].dtype == torch.float32
    assert item["label"].shape == (64, 64, 12) and item["label"].dtype == torch.int64
    assert item["volume_id"] == "site-1_case003"
    nz = item["image"][item["image"] != 0]
    assert abs(float(nz.mean())) < 1e-4 and abs(float(nz.std(unbiased=False)) - 1) < 1e-3


def test_build_split_datasets_both_formats(seg_sites, mt_sites):
    dl = load_datalist(seg_sites[0])
    tr, va = build_split_datasets(dl, labelled_entries(dl["training"]), dl["validation"], image_size=32)
    assert isinstance(tr, SliceDataset) and tr.preset == "mr" and va[0]["image"].shape == (1, 32, 32)
    dl = load_datalist(mt_sites[0])
    tr, va = build_split_datasets(dl, dl["training"], dl["validation"], image_size=32)
    assert tr[0]["image"].shape == (1, 32, 32) and tr[0]["label"].ndim == 0
    dl["task"] = "segmentation"
    with pytest.raises(DataError, match="medmnist"):
        build_dataset(dl, dl["training"])


@pytest.mark.parametrize("kw,expect", [({"with_labels": True}, "no 'label'"), ({"image_size": 0}, "image_size")])
def test_slice_dataset_bad_args(seg_sites, kw, expect):
    entries = [{"image": e["image"]} for e in load_datalist(seg_sites[0])["training"]]
    with pytest.raises(DataError, match=expect):
        SliceDataset(entries, **kw)
    with pytest.raises(DataError, match="no entries"):
        SliceDataset([])
