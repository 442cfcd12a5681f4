"""engine.knn.knn_items / knn_label: the k-NN monitor's seeded sample and its annotation-free labels."""

from __future__ import annotations

import numpy as np

from fl_plugins.data import position_partition
from fl_plugins.engine.knn import knn_items, knn_label


def _slices(n=12):
    return [{"image": np.full((1, 2, 2), i, np.float32), "slice_index": i, "num_slices": n, "label": 99}
            for i in range(n)]


def test_slice_items_are_labelled_by_position_partition_not_by_their_label():
    items = knn_items(_slices(), 100, seed=0)
    assert [it["label"] for it in items] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert [int(it["image"][0, 0, 0]) for it in items] == list(range(12))  # dataset order
    assert set(items[0]) == {"image", "label"}


def test_image_items_keep_their_class():
    ds = [{"image": np.zeros((1, 2, 2)), "label": np.int64(i % 3)} for i in range(7)]
    assert [it["label"] for it in knn_items(ds, 7, seed=1)] == [0, 1, 2, 0, 1, 2, 0]
    assert knn_label({"label": 2}) == 2 and knn_label({"slice_index": 5, "num_slices": 6, "label": 0}) == 2


def test_sample_is_seeded_capped_and_sorted():
    a = knn_items(_slices(), 5, seed=3)
    idx = sorted(np.random.default_rng(3).permutation(12)[:5].tolist())
    assert [int(it["image"][0, 0, 0]) for it in a] == idx
    assert [it["label"] for it in a] == [position_partition(i, 12) for i in idx]
    assert [it["label"] for it in knn_items(_slices(), 5, seed=3)] == [it["label"] for it in a]


def test_custom_label_fn():
    assert [it["label"] for it in knn_items(_slices(4), 4, 0, label_fn=lambda it: it["slice_index"] * 10)] == [
        0, 10, 20, 30]


def test_zero_items():
    assert knn_items(_slices(), 0, 0) == []
