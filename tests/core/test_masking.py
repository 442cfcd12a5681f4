"""iBOT block masks: ratios within range, per-batch sampling, seeded determinism."""

import pytest
import torch

from fl_plugins.core.masking import BlockMaskGenerator, sample_ibot_masks


@pytest.mark.parametrize("grid,n_images", [((8, 8), 32), ((4, 4), 8), ((14, 14), 10)])
def test_ratios_within_range_and_half_the_images_masked(grid, n_images):
    n_patches = grid[0] * grid[1]
    masks = sample_ibot_masks(n_images, grid, (0.1, 0.5), 0.5, torch.Generator().manual_seed(0))
    assert masks.shape == (n_images, *grid) and masks.dtype == torch.bool
    counts = masks.flatten(1).sum(1)
    assert int((counts > 0).sum()) <= n_images // 2
    assert int(counts.max()) <= int(0.5 * n_patches)  # never above the largest drawn ratio
    if grid == (8, 8):  # large enough grid: every drawn target is reached
        assert int((counts > 0).sum()) == n_images // 2
        ratios = counts[counts > 0].float() / n_patches
        assert float(ratios.min()) >= int(0.1 * n_patches) / n_patches


def test_ratios_are_spread_over_the_linspace():
    masks = sample_ibot_masks(40, (8, 8), (0.1, 0.5), 0.5, torch.Generator().manual_seed(1))
    ratios = sorted((masks.flatten(1).sum(1)[masks.flatten(1).any(1)].float() / 64).tolist())
    assert ratios[0] < 0.2 and ratios[-1] > 0.4  # stratified U(p_i, p_i+1) covers the whole range


def test_block_generator_respects_target_and_blocks():
    gen = BlockMaskGenerator((8, 8))
    for target in (0, 4, 10, 32):
        mask = gen(target, torch.Generator().manual_seed(target))
        assert int(mask.sum()) <= target
        if target >= 4:
            assert int(mask.sum()) > 0


def test_seeded_determinism():
    a = sample_ibot_masks(16, (8, 8), generator=torch.Generator().manual_seed(123))
    b = sample_ibot_masks(16, (8, 8), generator=torch.Generator().manual_seed(123))
    c = sample_ibot_masks(16, (8, 8), generator=torch.Generator().manual_seed(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mask_ratio_min_max": (0.6, 0.5)}, "mask_ratio_min_max"),
        ({"mask_sample_probability": 1.5}, "mask_sample_probability"),
    ],
)
def test_bad_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_ibot_masks(4, (4, 4), **kwargs)
