"""Slice-position partition of a volume (methods-spec 7.2): the label-free class of a slice.

The FCL/GCL partition splits a volume of ``D`` slices into ``S`` contiguous groups (``S = 4``): slice ``i`` is in
group ``min(i // round_half_up(D / S), S - 1)``. The k-NN monitor uses it as the class of a slice, so that no
annotation is read.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["position_partition", "slice_partitions", "PartitionBatches"]


def position_partition(slice_index: int, num_slices: int, num_partitions: int = 4) -> int:
    """Partition id of slice ``i`` of a volume of ``D`` slices: ``min(i // round_half_up(D / S), S - 1)``.

    ``S = num_partitions`` (4 in methods-spec 7.2); ``round_half_up(x) = floor(x + 0.5)``, at least 1 (so a
    volume of fewer than ``S / 2`` slices puts slice ``i`` in group ``min(i, S - 1)``).
    """
    part = max(1, int(math.floor(num_slices / num_partitions + 0.5)))
    return min(slice_index // part, num_partitions - 1)


def slice_partitions(dataset: Any, num_partitions: int = 4) -> tuple[list[int], list[int], list[str]]:
    """Volume index and partition id of every item of a slice dataset, without reading an image.

    Args:
        dataset: a :class:`~fl_plugins.data.decathlon.SliceDataset` (its ``index`` and ``num_slices``) or any
            sequence of items with ``volume_id``, ``slice_index`` and ``num_slices``.
        num_partitions: ``S``.

    Returns:
        ``(vol [N], part [N], volume_ids [V])``: item ``i`` is slice ``slice_index`` of volume ``volume_ids[vol[i]]``
        in partition ``part[i]`` (:func:`position_partition`).
    """
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, int) or num_partitions < 1:
        raise ValueError(f"num_partitions must be an int >= 1, got {num_partitions!r}")
    index = getattr(dataset, "index", None)
    if index is not None and hasattr(dataset, "num_slices") and hasattr(dataset, "volume_ids"):
        vol = [v for v, _ in index]
        part = [position_partition(s, dataset.num_slices[v], num_partitions) for v, s in index]
        return vol, part, list(dataset.volume_ids)
    ids: dict[str, int] = {}
    vol, part = [], []
    for item in dataset:
        for key in ("volume_id", "slice_index", "num_slices"):
            if key not in item:
                raise ValueError(f"slice item has no {key!r}: partitions need slices of volumes (a Decathlon "
                                 "datalist of NIfTI volumes)")
        vol.append(ids.setdefault(str(item["volume_id"]), len(ids)))
        part.append(position_partition(int(item["slice_index"]), int(item["num_slices"]), num_partitions))
    return vol, part, list(ids)


class PartitionBatches:
    """Endless batches of item indices "one random slice per partition, in partition order" (methods-spec 7.2).

    Each batch draws ``volumes_per_batch`` distinct volumes uniformly (all of them when the site has fewer) and,
    from each, one uniformly random slice of every partition ``0..S-1``: ``V * S`` indices, volume by volume.
    A volume in which some partition has no slice (fewer slices than partitions) cannot give a full set: it is left
    out and named in :attr:`skipped`.

    Args:
        vol, part: per item, from :func:`slice_partitions`.
        volume_ids: names of the volumes (for messages).
        num_partitions: ``S``.
        volumes_per_batch: ``V`` (>= 2: a local positive is a slice of *another* volume).
        generator: the random stream (the site's seed).
        where: who is asking, for error messages (e.g. the datalist path).

    Raises:
        ValueError: no volume (a site with no volumes) or none with a slice in every partition.
    """

    def __init__(self, vol: list[int], part: list[int], volume_ids: list[str], num_partitions: int,
                 volumes_per_batch: int, generator: Any, where: str = "this site") -> None:
        import torch

        if isinstance(volumes_per_batch, bool) or not isinstance(volumes_per_batch, int) or volumes_per_batch < 2:
            raise ValueError(f"volumes_per_batch must be an int >= 2 (local positives come from other volumes), got "
                             f"{volumes_per_batch!r}")
        if len(vol) != len(part):
            raise ValueError(f"vol and part differ in length: {len(vol)} vs {len(part)}")
        if not vol:
            raise ValueError(f"{where}: no volumes, so no slices to train on (the training section is empty)")
        slots: dict[int, list[list[int]]] = {}
        for i, (v, p) in enumerate(zip(vol, part)):
            slots.setdefault(v, [[] for _ in range(num_partitions)])[p].append(i)
        self.skipped = sorted(volume_ids[v] for v, s in slots.items() if any(not x for x in s))
        self.slots = [s for _, s in sorted(slots.items()) if all(s)]
        if len(self.slots) < 1:
            raise ValueError(f"{where}: no volume has a slice in each of the {num_partitions} partitions (every volume "
                             f"has fewer than {num_partitions} slices?): {self.skipped[:5]}")
        self.num_partitions = num_partitions
        self.volumes_per_batch = min(volumes_per_batch, len(self.slots))
        self.generator = generator
        self._torch = torch

    @property
    def batch_size(self) -> int:
        return self.volumes_per_batch * self.num_partitions

    def __iter__(self) -> PartitionBatches:
        return self

    def __next__(self) -> list[int]:
        t = self._torch
        chosen = t.randperm(len(self.slots), generator=self.generator)[:self.volumes_per_batch].tolist()
        out = []
        for v in chosen:
            for items in self.slots[v]:
                out.append(items[int(t.randint(len(items), (1,), generator=self.generator))])
        return out
