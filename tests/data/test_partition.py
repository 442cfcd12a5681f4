"""The slice-position partition (methods-spec 7.2) and the FCL batches "one slice per partition of V volumes"."""

from __future__ import annotations

import pytest
import torch

from fl_plugins.data import PartitionBatches, position_partition, slice_partitions

#: S = 4, part = round_half_up(D / 4), partition(i) = min(i // part, 3), written out by hand for D = 6..20
HAND = {
    6: "001122", 7: "0011223", 8: "00112233", 9: "001122333", 10: "0001112223", 11: "00011122233",
    12: "000111222333", 13: "0001112223333", 14: "00001111222233", 15: "000011112222333",
    16: "0000111122223333", 17: "00001111222233333", 18: "000001111122222333", 19: "0000011111222223333",
    20: "00000111112222233333",
}


@pytest.mark.parametrize("depth", sorted(HAND))
def test_partition_formula_for_depths_6_to_20(depth):
    assert "".join(str(position_partition(i, depth, 4)) for i in range(depth)) == HAND[depth]


def _items(depths: list[int]) -> list[dict]:
    return [{"volume_id": f"v{v}", "slice_index": s, "num_slices": d} for v, d in enumerate(depths) for s in range(d)]


def test_slice_partitions_of_items():
    vol, part, ids = slice_partitions(_items([8, 6]), 4)
    assert ids == ["v0", "v1"] and vol == [0] * 8 + [1] * 6
    assert "".join(map(str, part)) == HAND[8] + HAND[6]
    with pytest.raises(ValueError, match="no 'num_slices'"):
        slice_partitions([{"volume_id": "a", "slice_index": 0}], 4)
    with pytest.raises(ValueError, match="num_partitions must be an int >= 1"):
        slice_partitions(_items([8]), 0)


def test_batches_hold_one_slice_per_partition_of_distinct_volumes_in_order():
    vol, part, ids = slice_partitions(_items([8, 10, 12, 9, 14]), 4)
    batches = PartitionBatches(vol, part, ids, 4, 3, torch.Generator().manual_seed(0))
    assert batches.batch_size == 12 and batches.skipped == []
    for _ in range(20):
        idx = next(batches)
        assert [part[i] for i in idx] == [0, 1, 2, 3] * 3
        vols = [vol[i] for i in idx]
        assert len({tuple(vols[j:j + 4]) for j in range(0, 12, 4)}) == 3  # three distinct volumes
        assert all(len(set(vols[j:j + 4])) == 1 for j in range(0, 12, 4))


def test_batches_skip_a_volume_with_fewer_slices_than_partitions_and_use_all_when_few():
    vol, part, ids = slice_partitions(_items([8, 3, 10]), 4)  # v1 (3 slices) has no partition 3
    batches = PartitionBatches(vol, part, ids, 4, 8, torch.Generator().manual_seed(0))
    assert batches.skipped == ["v1"] and batches.volumes_per_batch == 2 and batches.batch_size == 8
    assert {vol[i] for i in next(batches)} == {0, 2}


@pytest.mark.parametrize(("depths", "vpb", "match"), [
    ([], 2, "no volumes"),
    ([3, 2], 2, "no volume has a slice in each of the 4 partitions"),
    ([8, 8], 1, "volumes_per_batch must be an int >= 2"),
])
def test_batches_bad_input_is_named(depths, vpb, match):
    vol, part, ids = slice_partitions(_items(depths), 4)
    with pytest.raises(ValueError, match=match):
        PartitionBatches(vol, part, ids, 4, vpb, torch.Generator(), where="site-1")
