"""Multi-crop views for 1-channel images: shapes, validation, reproducibility, no [0, 1] clamping, collate."""

from __future__ import annotations

import pytest
import torch

from fl_plugins.data.view_config import METHOD_OWNED_FIELDS, VIEW_SETTING_FIELDS, multicrop_views
from fl_plugins.data.views import MultiCropConfig, MultiCropDataset, MultiCropTransform, multicrop_collate

OWNED = {"global_crop_size": 64, "local_crop_size": 32, "n_local_crops": 4, "patch_size": 8}


@pytest.mark.parametrize("global_scale,n_local", [((0.4, 1.0), 2), ((0.32, 1.0), 0), ((0.4, 1.0), 4)])
def test_view_count_and_sizes(global_scale, n_local):
    cfg = MultiCropConfig(global_crop_size=32, local_crop_size=16, n_local_crops=n_local,
                          global_crop_scale=global_scale)
    views = MultiCropTransform(cfg)(torch.rand(1, 48, 48))
    assert [tuple(v.shape) for v in views] == [(1, 32, 32)] * 2 + [(1, 16, 16)] * n_local
    assert all(v.dtype == torch.float32 and type(v) is torch.Tensor for v in views)


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


def test_multicrop_views_the_method_values_then_the_settings():
    cfg = multicrop_views({"global_crop_size": 32, "local_crop_size": 16, "n_local_crops": 3, "patch_size": 8,
                           "global_crop_scale": [0.32, 1.0], "local_crop_scale": (0.05, 0.32)},
                          {"intensity_prob": 0.0, "blur_sigma": [0.05, 0.6]})
    assert cfg == MultiCropConfig(global_crop_size=32, local_crop_size=16, n_local_crops=3, patch_size=8,
                                  global_crop_scale=(0.32, 1.0), local_crop_scale=(0.05, 0.32), intensity_prob=0.0,
                                  blur_sigma=(0.05, 0.6))
    assert multicrop_views(OWNED) == MultiCropConfig()
    # a view setting overrides the method's default of the same name (views.global_crop_scale keeps working)
    assert multicrop_views({**OWNED, "global_crop_scale": (0.32, 1.0)},
                           {"global_crop_scale": [0.5, 1.0]}).global_crop_scale == (0.5, 1.0)
    assert VIEW_SETTING_FIELDS == {"global_crop_scale": (0.4, 1.0), "local_crop_scale": (0.05, 0.4), "hflip_prob": 0.5,
                                   "intensity_prob": 0.8, "brightness": 0.2, "contrast": 0.2, "gamma": (0.7, 1.5),
                                   "blur_sigma": (0.1, 2.0), "blur_probs": (1.0, 0.1, 0.5), "noise_prob": 0.2,
                                   "noise_std": 0.05, "solarize_prob": 0.0}
    assert not set(VIEW_SETTING_FIELDS) & METHOD_OWNED_FIELDS


@pytest.mark.parametrize(("method_views", "settings", "match"), [
    (OWNED, {"n_local_crops": 2}, r"^'n_local_crops' is not a view setting: the method sets it \(n_local_crops=4"),
    (OWNED, {"patch_size": 4}, r"^'patch_size' is not a view setting: the method sets it \(patch_size=8"),
    (OWNED, {"jitter": 0.4}, r"^unknown view setting 'jitter'; known: \['blur_probs'"),
    (OWNED, {"noise_prob": 2.0}, r"^view settings: noise_prob=2.0 must be in \[0, 1\]"),
    ({"global_crop_size": 64}, {}, r"missing \['local_crop_size', 'n_local_crops', 'patch_size'\]"),
    ({**OWNED, "crop": 1}, {}, r"unknown \['crop'\]"),
])
def test_multicrop_views_rejects_bad_settings_naming_the_field(method_views, settings, match):
    with pytest.raises(ValueError, match=match) as e:
        multicrop_views(method_views, settings)
    assert "dino." not in str(e.value) and "views." not in str(e.value)  # method-neutral, no job section
