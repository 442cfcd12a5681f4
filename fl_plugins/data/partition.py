"""Slice-position partition of a volume (methods-spec 7.2): the label-free class of a slice.

The FCL/GCL partition splits a volume of ``D`` slices into ``S`` contiguous groups (``S = 4``): slice ``i`` is in
group ``min(i // round_half_up(D / S), S - 1)``. The k-NN monitor uses it as the class of a slice, so that no
annotation is read.
"""

from __future__ import annotations

import math

__all__ = ["position_partition"]


def position_partition(slice_index: int, num_slices: int, num_partitions: int = 4) -> int:
    """Partition id of slice ``i`` of a volume of ``D`` slices: ``min(i // round_half_up(D / S), S - 1)``.

    ``S = num_partitions`` (4 in methods-spec 7.2); ``round_half_up(x) = floor(x + 0.5)``, at least 1 (so a
    volume of fewer than ``S / 2`` slices puts slice ``i`` in group ``min(i, S - 1)``).
    """
    part = max(1, int(math.floor(num_slices / num_partitions + 0.5)))
    return min(slice_index // part, num_partitions - 1)
