"""Site state kept between rounds (FCL's round model, FCLOpt's PTNU state) is saved as tensors and read back with
``weights_only=True``: the arrays round-trip bit for bit, and a file holding any other pickled object is refused
without running it."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from fl_plugins.engine.checkpoint import load_arrays, save_arrays


def test_arrays_round_trip_bit_for_bit(tmp_path):
    rng = np.random.default_rng(0)
    obj = {"round": 3, "xi_hat": {"target.a": rng.standard_normal((4, 3)).astype(np.float32),
                                  "target.b": rng.integers(0, 9, 5).astype(np.int64)},
           "theta": None, "params": {"w": np.float16(rng.standard_normal((2, 2)))}}
    save_arrays(obj, tmp_path / "s.pt")
    back = load_arrays(tmp_path / "s.pt")
    assert back["round"] == 3 and back["theta"] is None
    for k, v in obj["xi_hat"].items():
        assert back["xi_hat"][k].dtype == v.dtype and np.array_equal(back["xi_hat"][k], v)
    assert back["params"]["w"].dtype == np.float16 and np.array_equal(back["params"]["w"], obj["params"]["w"])


class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_pickled_object_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "ran.txt"
    torch.save({"round": 0, "params": _Marker(marker)}, tmp_path / "evil.pt", pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(pickle.UnpicklingError):
        load_arrays(tmp_path / "evil.pt")
    assert not marker.exists()
