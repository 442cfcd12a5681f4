"""Multi-crop views for 1-channel images: shapes, validation, reproducibility, no [0, 1] clamping, collate."""

from __future__ import annotations

import pytest
import torch

from fl_plugins.data.view_config import VIEW_SETTING_FIELDS, views_for_method
from fl_plugins.data.views import MultiCropConfig, MultiCropDataset, MultiCropTransform, multicrop_collate


@pytest.mark.parametrize("variant,n_local", [("dino", 2), ("dinov2", 0), ("dino", 4)])
def test_view_count_and_sizes(variant, n_local):
    cfg = MultiCropConfig.for_variant(variant, global_crop_size=32, local_crop_size=16, n_local_crops=n_local)
    views = MultiCropTransform(cfg)(torch.rand(1, 48, 48))
    assert [tuple(v.shape) for v in views] == [(1, 32, 32)] * 2 + [(1, 16, 16)] * n_local
    assert all(v.dtype == torch.float32 and type(v) is torch.Tensor for v in views)
    expected = {"dino": (0.4, 1.0), "dinov2": (0.32, 1.0)}[variant]
    assert cfg.global_crop_scale == expected


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"global_crop_size": 30}, "global_crop_size=30 .*patch_size=8"),
        ({"local_crop_size": 12}, "local_crop_size=12 .*patch_size=8"),
        ({"blur_probs": (1.0, 1.2, 0.5)}, r"blur_probs\[1\]=1.2"),
    ],
)
def test_bad_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiCropConfig(**kwargs)


def test_reproducible_under_torch_seed():
    tf = MultiCropTransform(MultiCropConfig(global_crop_size=32, local_crop_size=16, n_local_crops=2, noise_prob=1.0))
    image = torch.rand(1, 40, 40)
    torch.manual_seed(5)
    a = tf(image)
    torch.manual_seed(5)
    b = tf(image)
    torch.manual_seed(6)
    c = tf(image)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_z_scored_intensities_are_not_clamped():
    torch.manual_seed(0)
    image = 3.0 * torch.randn(1, 32, 32)  # z-scored MR-like: negative values and values > 1
    cfg = MultiCropConfig(global_crop_size=32, local_crop_size=16, n_local_crops=1, intensity_prob=1.0)
    views = MultiCropTransform(cfg)(image)
    assert all(float(v.min()) < -0.5 and float(v.max()) > 1.5 for v in views[:2])


def test_dataset_and_collate():
    items = [{"image": torch.rand(1, 32, 32), "volume_id": "v", "slice_index": i, "num_slices": 4} for i in range(3)]
    ds = MultiCropDataset(
        items, MultiCropTransform(MultiCropConfig(global_crop_size=32, local_crop_size=16, n_local_crops=2))
    )
    batch = multicrop_collate([ds[i] for i in range(len(ds))])
    assert [tuple(b.shape) for b in batch] == [(3, 1, 32, 32)] * 2 + [(3, 1, 16, 16)] * 2
    with pytest.raises(ValueError, match="same number of views"):
        multicrop_collate([ds[0], ds[1][:3]])


def test_views_for_method_applies_the_settings_and_the_method_sizes():
    cfg = views_for_method("dinov2", 32, 16, 3, 8, {"intensity_prob": 0.0, "blur_sigma": [0.05, 0.6]})
    assert cfg == MultiCropConfig(global_crop_size=32, local_crop_size=16, n_local_crops=3, patch_size=8,
                                  global_crop_scale=(0.32, 1.0), local_crop_scale=(0.05, 0.32), intensity_prob=0.0,
                                  blur_sigma=(0.05, 0.6))
    assert views_for_method("dino", 64, 32, 4, 8) == MultiCropConfig.for_variant("dino")
    assert VIEW_SETTING_FIELDS == {"global_crop_scale", "local_crop_scale", "hflip_prob", "intensity_prob", "brightness",
                                   "contrast", "gamma", "blur_sigma", "blur_probs", "noise_prob", "noise_std",
                                   "solarize_prob"}


@pytest.mark.parametrize(("settings", "match"), [
    ({"n_local_crops": 2}, r"views\.n_local_crops is not a view setting: set dino\.n_local_crops instead"),
    ({"patch_size": 4}, r"views\.patch_size is not a view setting: set dino\.backbone instead"),
    ({"jitter": 0.4}, r"unknown view setting views\.jitter; known: \['blur_probs'"),
    ({"noise_prob": 2.0}, r"noise_prob=2.0 must be in \[0, 1\]"),
])
def test_views_for_method_rejects_bad_settings(settings, match):
    with pytest.raises(ValueError, match=match):
        views_for_method("dino", 64, 32, 4, 8, settings)
