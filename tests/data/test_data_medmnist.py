from __future__ import annotations

import numpy as np
import pytest
import torch

from fl_plugins.data import DataError, MedMNISTDataset
from fl_plugins.data.synthetic import write_npz_deterministic


@pytest.fixture()
def npz_files(tmp_path):
    rng = np.random.default_rng(0)
    out = {}
    for name, shape in (("d2", (28, 28)), ("rgb", (28, 28, 3)), ("d3", (28, 28, 28))):
        arrays = {}
        for s, n in (("train", 5), ("val", 2), ("test", 3)):
            arrays[f"{s}_images"] = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
            arrays[f"{s}_labels"] = rng.integers(0, 2, size=(n, 1), dtype=np.uint8)
        out[name] = (write_npz_deterministic(tmp_path / f"{name}.npz", arrays), arrays)
    return out


@pytest.mark.parametrize("name,shape", [("d2", (1, 28, 28)), ("rgb", (1, 28, 28)), ("d3", (1, 28, 28, 28))])
def test_items_scaled_and_shaped(npz_files, name, shape):
    path, arrays = npz_files[name]
    ds = MedMNISTDataset([{"npz": str(path), "split": "val", "index": 1}])
    item = ds[0]
    assert set(item) == {"image", "label"}
    assert item["image"].shape == shape and item["image"].dtype == torch.float32
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert item["label"].dtype == torch.int64 and item["label"].ndim == 0
    assert int(item["label"]) == int(arrays["val_labels"][1, 0])
    if name == "d2":
        np.testing.assert_allclose(item["image"][0].numpy(), arrays["val_images"][1] / 255.0, atol=1e-6)


def test_entry_label_wins_resize_and_lazy_cache(npz_files, monkeypatch):
    import fl_plugins.data.medmnist as mm

    path, _ = npz_files["d2"]
    calls = []
    real = mm.load_npz
    monkeypatch.setattr(mm, "load_npz", lambda p: calls.append(p) or real(p))
    entries = [{"npz": str(path), "split": "train", "index": i, "label": 1} for i in range(5)]
    ds = MedMNISTDataset(entries, image_size=32)
    assert calls == []  # lazy
    items = [ds[i] for i in range(5)]
    assert len(calls) == 1 and all(int(it["label"]) == 1 for it in items) and items[0]["image"].shape == (1, 32, 32)
    assert "label" not in MedMNISTDataset(entries, with_labels=False)[0]


def test_bad_npz(tmp_path, npz_files):
    bad = tmp_path / "bad.npz"
    write_npz_deterministic(bad, {"train_images": np.zeros((1, 28, 28), np.uint8)})
    with pytest.raises(DataError, match="lacks keys") as e:
        MedMNISTDataset([{"npz": str(bad), "split": "train", "index": 0}])[0]
    assert "bad.npz" in str(e.value)
    path, _ = npz_files["d2"]
    with pytest.raises(DataError, match="index 99"):
        MedMNISTDataset([{"npz": str(path), "split": "test", "index": 99}])[0]
