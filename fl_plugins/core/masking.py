"""BEiT/iBOT-style block masks for the student's global crops (DINOv2 ``masking.py`` + ``collate.py``).

Algorithm (methods-spec 3.2 [V], re-implemented from the description): a mask over an ``h x w`` patch grid
grows by rectangular blocks until the drawn number of patches is reached. Each block: area ~ U(min_num_patches,
remaining budget capped at ``max_num_patches``), log-aspect ~ U(log min_aspect, log max_aspect), random
position; it is accepted if it adds between 1 and the remaining budget of new patches (10 tries per block);
growth stops when the budget is met or no block fits.

Per batch (:func:`sample_ibot_masks`): ``floor(n * mask_sample_probability)`` of the ``n`` global crops get a
mask; the i-th masked image draws its ratio from ``U(p_i, p_{i+1})`` on ``linspace(r_min, r_max, n_masked + 1)``
(so ratios are spread over the range), the others get an empty mask; the order is then shuffled.

All randomness comes from an explicit ``torch.Generator``: same seed, same masks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "MASK_RATIO_MIN_MAX",
    "MASK_SAMPLE_PROBABILITY",
    "BlockMaskGenerator",
    "sample_ibot_masks",
]

MASK_RATIO_MIN_MAX = (0.1, 0.5)  # DINOv2 ibot.mask_ratio_min_max [V]
MASK_SAMPLE_PROBABILITY = 0.5  # DINOv2 ibot.mask_sample_probability [V]


def _uniform(generator: torch.Generator | None, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(generator: torch.Generator | None, low: int, high_inclusive: int) -> int:
    return int(torch.randint(low, high_inclusive + 1, (), generator=generator))


class BlockMaskGenerator:
    """Draw block masks over a ``grid_size = (h, w)`` patch grid.

    Args:
        grid_size: ``(h, w)`` patches (= crop size / patch size).
        min_num_patches: smallest block area (4 [V]).
        min_aspect: smallest block aspect ratio; the largest is ``1 / min_aspect`` (0.3 [V]).
        max_num_patches: largest block area; default ``0.5 * h * w`` [V].
    """

    def __init__(
        self,
        grid_size: tuple[int, int],
        min_num_patches: int = 4,
        min_aspect: float = 0.3,
        max_num_patches: int | None = None,
    ) -> None:
        h, w = grid_size
        if h < 1 or w < 1:
            raise ValueError(f"grid_size must be positive, got {grid_size}")
        if not 0.0 < min_aspect <= 1.0:
            raise ValueError(f"min_aspect must be in (0, 1], got {min_aspect}")
        self.height, self.width = int(h), int(w)
        self.num_patches = self.height * self.width
        self.min_num_patches = int(min_num_patches)
        self.max_num_patches = int(max_num_patches if max_num_patches is not None else 0.5 * self.num_patches)
        self.log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))

    def _add_block(self, mask: Tensor, budget: int, generator: torch.Generator | None) -> int:
        """Try (10 times) to add one block of at most ``budget`` new patches; returns the number added."""
        for _ in range(10):
            area = _uniform(generator, self.min_num_patches, budget)
            aspect = math.exp(_uniform(generator, *self.log_aspect))
            bh = int(round(math.sqrt(area * aspect)))
            bw = int(round(math.sqrt(area / aspect)))
            if 0 < bh < self.height and 0 < bw < self.width:
                top = _randint(generator, 0, self.height - bh)
                left = _randint(generator, 0, self.width - bw)
                block = mask[top : top + bh, left : left + bw]
                new = bh * bw - int(block.sum())
                if 0 < new <= budget:
                    block.fill_(True)
                    return new
        return 0

    def __call__(self, num_masking_patches: int, generator: torch.Generator | None = None) -> Tensor:
        """Return a ``[h, w]`` bool mask with at most ``num_masking_patches`` True entries (usually exactly)."""
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        count = 0
        while count < num_masking_patches:
            budget = min(num_masking_patches - count, self.max_num_patches)
            added = self._add_block(mask, budget, generator)
            if added == 0:
                break
            count += added
        return mask


def sample_ibot_masks(
    n_images: int,
    grid_size: tuple[int, int],
    mask_ratio_min_max: tuple[float, float] = MASK_RATIO_MIN_MAX,
    mask_sample_probability: float = MASK_SAMPLE_PROBABILITY,
    generator: torch.Generator | None = None,
    mask_generator: BlockMaskGenerator | None = None,
) -> Tensor:
    """Masks for the ``n_images`` student global crops of one batch.

    Args:
        n_images: number of global crops (``2 * batch``).
        grid_size: ``(h, w)`` patch grid of a global crop.
        mask_ratio_min_max: ``(r_min, r_max)`` with ``0 <= r_min <= r_max <= 1`` ((0.1, 0.5) [V]).
        mask_sample_probability: fraction of images that get a mask (0.5 [V]).
        generator: source of randomness (seed it for reproducible masks).
        mask_generator: reuse a :class:`BlockMaskGenerator` for ``grid_size`` (built if None).

    Returns:
        ``[n_images, h, w]`` bool, True = masked patch.
    """
    r_min, r_max = mask_ratio_min_max
    if not 0.0 <= r_min <= r_max <= 1.0:
        raise ValueError(f"mask_ratio_min_max must satisfy 0 <= min <= max <= 1, got {mask_ratio_min_max}")
    if not 0.0 <= mask_sample_probability <= 1.0:
        raise ValueError(f"mask_sample_probability must be in [0, 1], got {mask_sample_probability}")
    gen = mask_generator or BlockMaskGenerator(grid_size)
    if (gen.height, gen.width) != tuple(grid_size):
        raise ValueError(f"mask_generator grid {(gen.height, gen.width)} != grid_size {tuple(grid_size)}")
    n_masked = int(n_images * mask_sample_probability)  # floor, as DINOv2's collate [V]
    bounds = torch.linspace(r_min, r_max, n_masked + 1).tolist()
    masks = torch.zeros(n_images, gen.height, gen.width, dtype=torch.bool)
    for i in range(n_masked):
        ratio = _uniform(generator, bounds[i], bounds[i + 1])
        masks[i] = gen(int(gen.num_patches * ratio), generator)
    return masks[torch.randperm(n_images, generator=generator)]
