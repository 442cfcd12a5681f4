"""Masked-image-modelling pieces (fl_plugins.core.mim): exact mask counts, seeding, patch ordering, losses by hand."""

import pytest
import torch

from fl_plugins.core.mim import (
    check_mask_ratio,
    grid_shape,
    masked_patch_mse,
    masked_pixel_loss,
    norm_pix_target,
    patch_mask_to_pixels,
    patchify,
    random_patch_mask,
    unpatchify,
)

# (patches N, ratio, masked per sample): round(ratio * N) (Python rounds halves to even), clamped to [1, N - 1]
MASK_COUNTS = [
    (16, 0.75, 12),
    (64, 0.6, 38),  # 38.4
    (10, 0.75, 8),  # 7.5 -> 8
    (10, 0.25, 2),  # 2.5 -> 2
    (7, 0.5, 4),  # 3.5 -> 4
    (3, 0.1, 1),  # 0.3 -> 0 -> at least 1 masked
    (3, 0.9, 2),  # 2.7 -> 3 -> at least 1 visible
]


@pytest.mark.parametrize("n,ratio,expected", MASK_COUNTS)
def test_mask_count_is_exact_per_sample(n, ratio, expected):
    mask, ids = random_patch_mask(5, n, ratio, torch.Generator().manual_seed(0))
    assert mask.shape == (5, n) and mask.dtype == torch.bool
    assert mask.sum(dim=1).tolist() == [expected] * 5
    assert (ids.sort(dim=1).values == torch.arange(n)).all()  # a permutation per sample
    masked_by_ids = torch.zeros(5, n, dtype=torch.bool).scatter_(1, ids[:, n - expected:], True)
    assert torch.equal(mask, masked_by_ids)  # the last ids are the masked ones, the first the kept ones


def test_same_seed_same_mask_other_seed_other_mask():
    a, ia = random_patch_mask(4, 64, 0.75, torch.Generator().manual_seed(7))
    b, ib = random_patch_mask(4, 64, 0.75, torch.Generator().manual_seed(7))
    c, _ = random_patch_mask(4, 64, 0.75, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and torch.equal(ia, ib)
    assert not torch.equal(a, c)


def test_masked_patch_mse_is_zero_on_perfect_masked_patches_and_ignores_visible_ones():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 6, 4, generator=g)
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    pred = target.clone()
    pred[~mask] = torch.randn(int((~mask).sum()), 4, generator=g) * 100  # garbage on the visible patches
    assert float(masked_patch_mse(pred, target, mask)) == 0.0
    pred_off = pred.clone()
    pred_off[mask] += 2.0  # every masked value off by 2 -> squared error 4
    other_visible = pred_off.clone()
    other_visible[~mask] = 0.0
    assert float(masked_patch_mse(pred_off, target, mask)) == pytest.approx(4.0)
    assert float(masked_patch_mse(other_visible, target, mask)) == pytest.approx(4.0)


def test_masked_patch_mse_by_hand():
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0], [2.0, 4.0]]])
    pred = torch.zeros(1, 3, 2)
    mask = torch.tensor([[True, False, True]])
    # per-patch MSE: (1 + 1) / 2 = 1, (4 + 16) / 2 = 10 -> mean over the two masked patches = 5.5
    assert float(masked_patch_mse(pred, target, mask)) == pytest.approx(5.5)


def test_norm_pix_target_by_hand():
    patches = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]]], dtype=torch.float64)
    # mean 2.5, population variance 1.25: (x - 2.5) / sqrt(1.25 + 1e-6); a constant patch becomes 0
    expected = torch.tensor([[[-1.3416402498438813, -0.44721341661462705, 0.44721341661462705, 1.3416402498438813],
                              [0.0, 0.0, 0.0, 0.0]]], dtype=torch.float64)
    assert torch.allclose(norm_pix_target(patches), expected, atol=1e-12)


def test_patchify_2d_order_by_hand():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    expected = torch.tensor([[[0.0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]])
    assert torch.equal(patchify(x, 2), expected)


def test_patchify_channels_are_innermost():
    x = torch.stack([torch.arange(4.0), 10 + torch.arange(4.0)]).reshape(1, 2, 2, 2)
    assert patchify(x, 2).tolist() == [[[0.0, 10.0, 1.0, 11.0, 2.0, 12.0, 3.0, 13.0]]]


def test_patchify_3d_order_by_hand():
    x = torch.arange(16.0).reshape(1, 1, 2, 2, 4)  # value = 8 d + 4 h + w
    expected = torch.tensor([[[0.0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]]])
    assert torch.equal(patchify(x, 2), expected)


@pytest.mark.parametrize("shape,p", [((2, 3, 8, 12), 4), ((1, 1, 6, 6), 3), ((2, 2, 4, 8, 6), 2),
                                     ((1, 1, 8, 8, 8), 4)])
def test_patchify_unpatchify_round_trip(shape, p):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    grid = grid_shape(shape[2:], p)
    patches = patchify(x, p)
    assert patches.shape == (shape[0], len(x[0, 0].flatten()) // p ** len(grid), p ** len(grid) * shape[1])
    assert torch.equal(unpatchify(patches, p, grid, shape[1]), x)


def test_patch_mask_to_pixels_marks_whole_patches():
    mask = torch.tensor([[True, False, False, True]])
    pix = patch_mask_to_pixels(mask, (2, 2), 2)
    assert pix.shape == (1, 1, 4, 4)
    assert pix[0, 0].int().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]


@pytest.mark.parametrize("kind,expected", [("l1", (1 + 4) / (2 + 1e-5)), ("mse", (1 + 16) / (2 + 1e-5))])
def test_masked_pixel_loss_by_hand(kind, expected):
    target = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    pix = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    assert float(masked_pixel_loss(torch.zeros_like(target), target, pix, kind)) == pytest.approx(expected)


def test_masked_pixel_loss_divides_by_channels():
    target = torch.ones(1, 2, 2, 2)
    pix = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])  # one masked pixel, two channels -> |err| sum 2, / 1 / C=2
    assert float(masked_pixel_loss(torch.zeros_like(target), target, pix, "l1")) == pytest.approx(1 / (1 + 1e-5))
    with pytest.raises(ValueError, match="loss kind"):
        masked_pixel_loss(target, target, pix, "huber")


@pytest.mark.parametrize("ratio", [0, 1, 1.5, -0.2, True, "0.5"])
def test_bad_mask_ratio_names_the_setting(ratio):
    with pytest.raises(ValueError, match=r"mask_ratio must be a number in \(0, 1\)"):
        check_mask_ratio(ratio)
    with pytest.raises(ValueError, match="mask_ratio"):
        random_patch_mask(2, 16, ratio)


def test_check_mask_ratio_names_the_caller_setting():
    with pytest.raises(ValueError, match="mae setting 'mask_ratio' must be .* got 1.5"):
        check_mask_ratio(1.5, "mae setting 'mask_ratio'")
    assert check_mask_ratio(0.75) == 0.75


@pytest.mark.parametrize("spatial,p", [((30, 32), 8), ((32, 32, 12), 8), ((16, 16), 5)])
def test_size_not_divisible_names_the_setting(spatial, p):
    with pytest.raises(ValueError, match=rf"not divisible by patch_size={p}"):
        grid_shape(spatial, p)
    with pytest.raises(ValueError, match="patch_size"):
        patchify(torch.zeros(1, 1, *spatial), p)


def test_too_few_patches_and_bad_shapes():
    with pytest.raises(ValueError, match="at least 2 patches"):
        random_patch_mask(1, 1, 0.5)
    with pytest.raises(ValueError, match="patch_size must be a positive int"):
        grid_shape((8, 8), 0)
    with pytest.raises(ValueError, match="do not fit grid"):
        unpatchify(torch.zeros(1, 4, 5), 2, (2, 2), 1)
    with pytest.raises(ValueError, match="do not match"):
        masked_patch_mse(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4), torch.zeros(1, 3, dtype=torch.bool))
