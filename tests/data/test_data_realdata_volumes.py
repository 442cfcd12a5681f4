"""Real MSD hippocampus crops (../shared/data) read in volume mode, the data of ``mae3d_pretrain`` (skipped
elsewhere)."""

from __future__ import annotations

import json

import pytest
import torch

from fl_plugins.data import build_dataset, data_geometry, load_datalist, split_decathlon
from fl_plugins.data.nifti import read_shape

from .conftest import SHARED_DATA

HIPPO = SHARED_DATA / "msd_hippocampus" / "dataset.json"

pytestmark = [pytest.mark.realdata,
              pytest.mark.skipif(not HIPPO.is_file(), reason="../shared/data/msd_hippocampus not available")]


def test_hippocampus_volumes_at_32(tmp_path):
    paths = split_decathlon(HIPPO, tmp_path, num_sites=3, seed=0, volumes=True)
    dl = load_datalist(paths[0])
    assert json.loads(paths[0].read_text())["volumes"] is True and data_geometry(dl).spatial_dims == 3
    assert dl["modality_preset"] == "mr"
    ds = build_dataset(dl, dl["training"][:2], image_size=32, with_labels=True)
    assert len(ds) == 2
    for i in range(2):
        item = ds[i]
        x = item["image"]
        assert x.shape == (1, 32, 32, 32) and x.dtype == torch.float32 and torch.isfinite(x).all()
        assert item["label"].shape == (32, 32, 32) and item["label"].dtype == torch.int64
        assert set(torch.unique(item["label"]).tolist()) == {0, 1, 2}  # anterior and posterior both survive
        # z-scored per volume (MR preset): the content is ~zero-mean, unit-ish std (trilinear smoothing lowers it)
        content = x[x != 0]
        assert abs(float(content.mean())) < 0.1 and 0.7 < float(content.std()) < 1.2
        # aspect kept: the longest side (52 voxels) fills the cube, the ~35-voxel sides are padded with zeros
        h, w, d = read_shape(dl["training"][i]["image"])
        assert w == max(h, w, d)
        filled = [int((x[0].abs().sum(dim=tuple(a for a in range(3) if a != ax)) > 0).sum()) for ax in range(3)]
        assert filled[1] == 32 and all(abs(filled[a] - round(s * 32 / w)) <= 1 for a, s in ((0, h), (2, d)))
