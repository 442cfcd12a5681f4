from __future__ import annotations

import numpy as np
import pytest

from fl_plugins.data import DataError, get_preset
from fl_plugins.data.presets import CT_WINDOW_LEVEL, CT_WINDOW_WIDTH


def test_mr_zscore_over_nonzero_voxels_by_hand():
    v = np.array([[0.0, 2.0], [4.0, 6.0]], dtype=np.float32)
    out = get_preset("mr")(v)
    vals = np.array([2.0, 4.0, 6.0])
    expect = (vals - vals.mean()) / vals.std()
    assert out.dtype == np.float32 and out.shape == v.shape
    assert out[0, 0] == 0.0
    np.testing.assert_allclose(out.ravel()[1:], expect, rtol=1e-6)


@pytest.mark.parametrize("value", [0.0, 7.0])
def test_mr_constant_volume_is_finite(value):
    out = get_preset("mr")(np.full((3, 3, 2), value, dtype=np.float32))
    assert np.isfinite(out).all() and np.all(out == 0)


def test_ct_window_default_and_custom_by_hand():
    hu = np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0])
    np.testing.assert_allclose(get_preset("ct")(hu), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    assert (CT_WINDOW_LEVEL, CT_WINDOW_WIDTH) == (40.0, 400.0)
    np.testing.assert_allclose(get_preset("ct", level=0, width=100)(np.array([-50.0, 0.0, 25.0])), [0, 0.5, 0.75])


def test_unit_minmax_by_hand_and_constant():
    np.testing.assert_allclose(get_preset("unit")(np.array([2.0, 4.0, 6.0])), [0.0, 0.5, 1.0])
    assert np.all(get_preset("unit")(np.full(4, 3.0)) == 0)


@pytest.mark.parametrize("name,kw", [("imagenet", {}), ("MR", {}), ("mr", {"level": 1}), ("ct", {"width": 0})])
def test_bad_preset_names_the_value(name, kw):
    with pytest.raises(DataError) as e:
        get_preset(name, **kw)
    msg = str(e.value)
    assert (repr(name) in msg) or ("width" in msg)
    if not kw:
        assert "'ct'" in msg and "'mr'" in msg and "'unit'" in msg
