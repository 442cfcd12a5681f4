from __future__ import annotations

import json
import time

import nibabel as nib
import numpy as np
import pytest

from fl_plugins.data import DataError, generate_synthetic_multitask, generate_synthetic_segmentation, load_datalist


def _vol(path):
    return nib.load(path).get_fdata(dtype=np.float32)


def _lab(path):
    return np.asarray(nib.load(path).dataobj)


def test_layout_sections_and_speed(tmp_path):
    t0 = time.perf_counter()
    paths = generate_synthetic_segmentation(tmp_path, num_sites=2, volumes_per_site=4, num_slices=12, size=64)
    assert time.perf_counter() - t0 < 5.0  # ~0.3 s on one free core; generous for the shared 2-core machine
    assert [p.parent.name for p in paths] == ["site-1", "site-2"]
    dl = load_datalist(paths[1])
    assert (len(dl["training"]), len(dl["validation"]), len(dl["test"])) == (2, 1, 1)
    assert dl["site"] == "site-2" and dl["format"] == "decathlon" and dl["task"] == "segmentation"
    img = nib.load(dl["training"][0]["image"])
    assert img.shape == (64, 64, 12) and img.get_data_dtype() == np.float32
    assert nib.load(dl["training"][0]["label"]).get_data_dtype() == np.uint8


@pytest.mark.parametrize("num_classes", [2, 3, 4])
def test_labels_exact(seg_sites, tmp_path, num_classes):
    paths = generate_synthetic_segmentation(tmp_path, num_sites=1, volumes_per_site=3, num_slices=8, size=32,
                                            num_classes=num_classes)
    dl = load_datalist(paths[0])
    assert dl["num_classes"] == num_classes and len(dl["labels"]) == num_classes
    for e in dl["training"] + dl["validation"] + dl["test"]:
        assert set(np.unique(_lab(e["label"])).tolist()) == set(range(num_classes))


def test_deterministic_bytes(seg_sites, tmp_path):
    again = generate_synthetic_segmentation(tmp_path, num_sites=2, volumes_per_site=4, num_slices=12, size=64,
                                            num_classes=4, seed=0)
    for a, b in zip(seg_sites, again, strict=True):
        assert a.read_bytes() == b.read_bytes()
        for rel in ("imagesTr/site-2_case001.nii.gz", "labelsTr/site-2_case001.nii.gz"):
            if (a.parent / rel).exists():
                assert (a.parent / rel).read_bytes() == (b.parent / rel).read_bytes()
    other = generate_synthetic_segmentation(tmp_path / "s1", num_sites=1, volumes_per_site=3, num_slices=12,
                                            size=64, num_classes=4, seed=1)
    assert not np.array_equal(_lab(other[0].parent / "labelsTr/site-1_case000.nii.gz"),
                              _lab(seg_sites[0].parent / "labelsTr/site-1_case000.nii.gz"))


def test_sites_differ_in_intensity_statistics(seg_sites):
    """Same anatomy classes, different acquisition: per-site tissue contrast differs (site-2 is inverted)."""
    contrast = []
    for p in seg_sites:
        e = load_datalist(p)["training"][0]
        v, lab = _vol(e["image"]), _lab(e["label"])
        body = v[(lab == 0) & (v > np.percentile(v, 60))].mean()
        contrast.append(v[lab == 1].mean() / body)
    assert contrast[0] > 1.3 and contrast[1] < 0.8  # bright blood pool on site-1, dark after inversion on site-2


def test_anatomy_changes_smoothly_with_slice(seg_sites):
    for p in seg_sites:
        for e in load_datalist(p)["training"]:
            lab = _lab(e["label"])
            area = (lab > 0).reshape(-1, lab.shape[2]).sum(0).astype(float)
            steps = np.abs(np.diff(area))
            assert steps.max() < 0.2 * area.max()  # neighbours differ little
            assert area[-1] > 3 * area[0]  # apex vs base differ a lot
            assert (lab[..., 0] == 3).sum() == 0 and (lab[..., -1] == 3).sum() > 0  # organ-2 absent at the apex


def test_labelled_per_site(tmp_path):
    paths = generate_synthetic_segmentation(tmp_path, num_sites=1, volumes_per_site=6, num_slices=4, size=16,
                                            labelled_per_site=2)
    flags = [e["labelled"] for e in json.loads(paths[0].read_text())["training"]]
    assert flags == [True, True, False, False]


@pytest.mark.parametrize(
    "kw,expect",
    [({"volumes_per_site": 2}, "volumes_per_site"), ({"num_classes": 5}, "num_classes"),
     ({"labelled_per_site": 9}, "labelled_per_site=9"), ({"num_slices": 1}, "num_slices")],
)
def test_bad_arguments(tmp_path, kw, expect):
    with pytest.raises(DataError, match=expect):
        generate_synthetic_segmentation(tmp_path, **kw)


def test_multitask_sites_are_different_tasks(mt_sites, tmp_path):
    counts = []
    for p in mt_sites:
        dl = load_datalist(p)
        assert dl["format"] == "medmnist" and dl["task"] == "classification"
        z = np.load(dl["training"][0]["npz"])
        assert z["train_images"].dtype == np.uint8 and z["train_images"].shape[1:] == (28, 28)
        assert z["train_labels"].shape == (len(dl["training"]), 1)
        assert set(np.unique(z["train_labels"]).tolist()) == set(range(dl["num_classes"]))
        assert [e["label"] for e in dl["validation"]] == z["val_labels"][:, 0].tolist()
        counts.append((dl["num_classes"], dl["dataset"]))
    assert counts == [(2, "synthetic_shape"), (3, "synthetic_texture"), (4, "synthetic_position")]
    again = generate_synthetic_multitask(tmp_path, class_counts=(2, 3, 4), images_per_site=60, seed=0)
    for a, b in zip(mt_sites, again, strict=True):
        assert a.read_bytes() == b.read_bytes()
        assert next(a.parent.glob("*.npz")).read_bytes() == next(b.parent.glob("*.npz")).read_bytes()


def test_multitask_classes_are_separable(mt_sites):
    """Sanity: a nearest-class-mean classifier on raw pixels beats chance on the position task."""
    dl = load_datalist(mt_sites[2])
    z = np.load(dl["training"][0]["npz"])
    x, y = z["train_images"].reshape(len(z["train_images"]), -1) / 255.0, z["train_labels"][:, 0]
    means = np.stack([x[y == c].mean(0) for c in range(4)])
    xt, yt = z["test_images"].reshape(len(z["test_images"]), -1) / 255.0, z["test_labels"][:, 0]
    pred = np.argmin(((xt[:, None] - means[None]) ** 2).sum(-1), 1)
    assert (pred == yt).mean() > 0.6
