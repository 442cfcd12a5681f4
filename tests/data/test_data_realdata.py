"""Checks on the real data in ../shared/data (developers and CI have it; skipped elsewhere)."""

from __future__ import annotations

import json

import pytest
import torch

from fl_plugins.data import SliceDataset, VolumeDataset, load_datalist, split_decathlon, validate_datalist

from .conftest import SHARED_DATA

ACDC = SHARED_DATA / "acdc" / "dataset.json"
HIPPO = SHARED_DATA / "msd_hippocampus" / "dataset.json"

pytestmark = pytest.mark.realdata


@pytest.mark.skipif(not ACDC.is_file(), reason="../shared/data/acdc not available")
def test_acdc_three_sites_patients_never_straddle(tmp_path):
    paths = split_decathlon(ACDC, tmp_path, num_sites=3, seed=0, labelled_per_site=2, modality_preset="unit")
    source = json.loads(ACDC.read_text())
    owner: dict[str, str] = {}
    for p in paths:
        dl = load_datalist(p)
        validate_datalist(dl, ("training", "validation", "test"))
        for s in ("training", "validation", "test"):
            for e in dl[s]:
                assert owner.setdefault(e["patient"], dl["site"]) == dl["site"]
        assert len({e["patient"] for e in dl["training"] if e["labelled"]}) == 2
    assert len(owner) == len({e["patient"] for s in ("training", "validation", "test") for e in source[s]}) == 100
    val_src = {e["patient"] for e in source["validation"]}
    val_split = {e["patient"] for p in paths for e in load_datalist(p)["validation"]}
    assert val_split == val_src  # ACDC's own validation patients stay validation


@pytest.mark.skipif(not ACDC.is_file(), reason="../shared/data/acdc not available")
def test_acdc_volume_slices(tmp_path):
    e = dict(json.loads(ACDC.read_text())["training"][0])
    for k in ("image", "label"):
        e[k] = str((ACDC.parent / e[k]).resolve())
    ds = SliceDataset([e], preset="mr", image_size=64)
    item = ds[len(ds) // 2]
    assert item["image"].shape == (1, 64, 64) and item["num_slices"] == len(ds) >= 6
    assert item["volume_id"] == "patient003_frame01"
    assert set(torch.unique(item["label"]).tolist()) <= {0, 1, 2, 3} and item["label"].max() > 0


@pytest.mark.skipif(not HIPPO.is_file(), reason="../shared/data/msd_hippocampus not available")
def test_hippocampus_volume_and_split(tmp_path):
    paths = split_decathlon(HIPPO, tmp_path, num_sites=4, seed=0)
    dl = load_datalist(paths[0])
    validate_datalist({**dl, "validation": dl["validation"][:2]}, ("validation",), deep=True)
    item = VolumeDataset(dl["validation"][:1], preset="mr")[0]
    assert item["image"].ndim == 4 and item["image"].shape[1:] == item["label"].shape
    assert set(torch.unique(item["label"]).tolist()) <= {0, 1, 2}
