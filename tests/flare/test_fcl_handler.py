"""The FCL task handler on synthetic volumes (2 training volumes x 12 slices per site): what leaves the site (exactly the
feature vectors and their partition ids, bounded, float16 / noisy on request, nothing when the site refuses), the
train task with remote features (the bank it trains against), bad remote payloads, bad data, the site's own policy."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fl_plugins.flare.fcl_handler import FCLHandler, site_policy
from fl_plugins.flare.handler import SiteContext
from fl_plugins.wire import (
    FEAT_KEY,
    META_NUM_STEPS,
    META_REMOTE_FEAT,
    META_REMOTE_PART,
    META_SHARES_FEATURES,
    PART_KEY,
    TASK_EXTRACT_FEATURES,
    TASK_TRAIN,
)

TINY = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}
CFG = {"backbone": TINY, "image_size": 32, "proj_dim": 8, "num_negatives": 16, "volumes_per_batch": 2}
N_SLICES = 24  # the training section: 2 volumes x 12 slices


def handler(data: Path, site: str = "site-1", datalist: Path | None = None, **kwargs) -> FCLHandler:
    ws = tempfile.mkdtemp(prefix=f"fcl_{site}_")  # the site's own job workspace
    ctx = SiteContext(site_name=site, datalist_path=str(datalist or data / site / "datalist.json"), workspace_dir=ws)
    return FCLHandler(ctx, dict(CFG), **{"steps_per_round": 2, "total_rounds": 2, **kwargs})


def ask(h: FCLHandler, rnd: int = 0, shift: float = 0.0) -> FLModel:
    """The extraction task: the round's global weights (the handler's own, shifted by ``shift``)."""
    return FLModel(params={k: v + shift for k, v in h.federated_params().items()}, params_type=ParamsType.FULL,
                   current_round=rnd, total_rounds=2)


def test_tasks_include_the_extraction():
    assert TASK_EXTRACT_FEATURES in FCLHandler.TASKS and TASK_TRAIN in FCLHandler.TASKS


@pytest.mark.parametrize(("kwargs", "m", "dtype"), [
    ({}, N_SLICES, np.float32),
    ({"max_features": 10}, 10, np.float32),
    ({"feature_dtype": "float16"}, N_SLICES, np.float16),
])
def test_only_feature_vectors_and_partition_ids_leave_the_site(synth_seg_data, kwargs, m, dtype):
    h = handler(synth_seg_data, **kwargs)
    out = h.extract_features(ask(h))
    assert set(out.params) == {FEAT_KEY, PART_KEY} and out.meta == {META_SHARES_FEATURES: True}
    feat, part = out.params[FEAT_KEY], out.params[PART_KEY]
    assert feat.shape == (m, 8) and feat.dtype == dtype and part.shape == (m,) and part.dtype == np.int32
    assert np.allclose(np.linalg.norm(feat.astype(np.float32), axis=1), 1.0, atol=1e-3)
    assert set(part.tolist()) <= {0, 1, 2, 3}
    # the partitions of 12-slice volumes: 3 slices each, so 6 of each in the full set
    if m == N_SLICES:
        assert np.bincount(part).tolist() == [6, 6, 6, 6]


def test_noise_changes_what_leaves_but_not_the_local_bank(synth_seg_data):
    h0 = handler(synth_seg_data)
    clean = h0.extract_features(ask(h0)).params[FEAT_KEY]
    h = handler(synth_seg_data, feature_noise_std=0.1)
    noisy = h.extract_features(ask(h)).params[FEAT_KEY]
    assert not np.allclose(clean, noisy, atol=1e-3)
    assert np.allclose(np.linalg.norm(noisy, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(h._bank_for(0).numpy(), clean, atol=1e-6)  # the site trains on its clean features


def test_a_site_that_refuses_shares_nothing_and_ignores_remote_features(synth_seg_data, caplog):
    h = handler(synth_seg_data, share_features=False)
    out = h.extract_features(ask(h))
    assert out.params[FEAT_KEY].shape == (0, 8) and out.params[PART_KEY].shape == (0,)
    assert out.meta[META_SHARES_FEATURES] is False
    g = FLModel(params=h.federated_params(), params_type=ParamsType.FULL, current_round=0,
                meta={META_REMOTE_FEAT: np.ones((5, 8), np.float32), META_REMOTE_PART: np.zeros(5, np.int32)})
    res = h.train(g)
    assert res.meta["loss_remote"] == 0.0 and len(h.method._bank[0]) == N_SLICES


def test_train_contrasts_against_local_and_remote_features(synth_seg_data):
    h = handler(synth_seg_data)
    remote = torch.nn.functional.normalize(torch.randn(20, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    g = FLModel(params=h.federated_params(), params_type=ParamsType.FULL, current_round=0,
                meta={META_REMOTE_FEAT: remote.numpy().astype(np.float16),
                      META_REMOTE_PART: (np.arange(20) % 4).astype(np.int32)})
    res = h.train(g)
    feat, part, is_remote = h.method._bank
    assert feat.shape == (N_SLICES + 20, 8) and int(is_remote.sum()) == 20 and part[-20:].tolist() == [0, 1, 2, 3] * 5
    assert set(res.params) == set(h.method.state_taxonomy()["federated"])  # encoder + projector, nothing else
    assert res.meta[META_NUM_STEPS] == N_SLICES and res.meta["loss_remote"] > 0
    assert all(np.isfinite(v).all() for v in res.params.values())


@pytest.mark.parametrize(("feat", "part", "why"), [
    (np.ones((4, 5), np.float32), np.zeros(4, np.int32), "shapes"),
    (np.full((4, 8), np.nan, np.float32), np.zeros(4, np.int32), "non-finite"),
    (np.ones((4, 8), np.float32), np.full(4, 7, np.int32), "partition ids outside"),
])
def test_bad_remote_features_are_refused_and_the_site_trains_on_local_terms(synth_seg_data, caplog, feat, part, why):
    h = handler(synth_seg_data)
    g = FLModel(params=h.federated_params(), params_type=ParamsType.FULL, current_round=1,
                meta={META_REMOTE_FEAT: feat, META_REMOTE_PART: part})
    with caplog.at_level(logging.ERROR):
        res = h.train(g)
    assert why in caplog.text and "training on local terms" in caplog.text
    assert res.meta["loss_remote"] == 0.0 and len(h.method._bank[0]) == N_SLICES


def test_the_bank_comes_from_the_rounds_global_model_with_or_without_extraction(synth_seg_data):
    a, b = handler(synth_seg_data), handler(synth_seg_data)
    start = a.local_features()
    a.extract_features(ask(a, shift=0.05))  # the weights come with the extraction
    res_a = a.train(FLModel(params={}, params_type=ParamsType.FULL, current_round=0))
    b.train(ask(b, shift=0.05))  # no extraction (the no-exchange baseline): the weights come with train
    assert torch.equal(a._local_bank[1], b._local_bank[1]) and not torch.allclose(a._local_bank[1], start)
    assert set(res_a.params) == set(a.federated_params())
    with pytest.raises(ValueError, match="train task of round 1 carries no weights, but this site did not receive"):
        a.train(FLModel(params={}, params_type=ParamsType.FULL, current_round=1))


def _write(dl: dict, path: Path) -> Path:
    path.write_text(json.dumps(dl))
    return path


def test_the_sites_datalist_can_only_tighten_sharing(synth_seg_data, tmp_path):
    dl = json.loads((synth_seg_data / "site-1" / "datalist.json").read_text())
    base = synth_seg_data / "site-1"
    dl = {**dl, "training": [{k: str(base / v) if k in ("image", "label") else v for k, v in e.items()}
                             for e in dl["training"]]}
    tight = _write({**dl, "feature_sharing": {"max_features": 5, "dtype": "float16"}}, tmp_path / "a.json")
    h = handler(synth_seg_data, datalist=tight, max_features=100)
    out = h.extract_features(ask(h))
    assert out.params[FEAT_KEY].shape == (5, 8) and out.params[FEAT_KEY].dtype == np.float16
    refuse = _write({**dl, "feature_sharing": {"share": False}}, tmp_path / "b.json")
    h = handler(synth_seg_data, datalist=refuse)
    assert h.extract_features(ask(h)).params[FEAT_KEY].shape == (0, 8)
    assert site_policy({"max_features": 5000}, True, 100, 0.0, "float32", "x") == (True, 100, 0.0, "float32")
    assert site_policy({"noise_std": 0.01}, True, 100, 0.1, "float16", "x") == (True, 100, 0.1, "float16")
    with pytest.raises(ValueError, match=r"'feature_sharing' must be a dict with keys among"):
        site_policy({"shar": False}, True, 100, 0.0, "float32", "dl.json")


def test_volumes_with_fewer_slices_than_partitions_are_named(tmp_path):
    from fl_plugins.data import generate_synthetic_segmentation

    generate_synthetic_segmentation(tmp_path, num_sites=1, volumes_per_site=3, num_slices=3, size=32, seed=0)
    with pytest.raises(ValueError, match=r"site site-1 .*no volume has a slice in each of the 4 partitions"):
        handler(tmp_path)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"max_features": 0}, "max_features must be an int >= 1"),
    ({"feature_noise_std": -1}, "feature_noise_std must be a number >= 0"),
    ({"feature_dtype": "int8"}, "feature_dtype must be one of"),
    ({"steps_per_round": 0}, "steps_per_round must be an int >= 1"),
])
def test_bad_settings_are_named(synth_seg_data, kwargs, match):
    with pytest.raises(ValueError, match=match):
        handler(synth_seg_data, **kwargs)


def test_in_process_exchange_gives_each_site_the_others_features(synth_seg_data):
    from fl_plugins.flare.inprocess import run_fedavg

    hs = [handler(synth_seg_data, "site-1", max_features=10), handler(synth_seg_data, "site-2", max_features=7)]
    out = run_fedavg(hs, hs[0].federated_params(), rounds=1, final_validation=False,
                     exchange={"feature_dim": 8, "num_partitions": 4, "max_features_per_site": 10})
    (ex,) = out["exchange"]
    assert ex["sharing"] == ["site-1", "site-2"] and ex["refused"] == {}
    assert ex["bytes_sent"] == {"site-1": 7 * (8 * 4 + 4), "site-2": 10 * (8 * 4 + 4)}
    assert [int(h.method._bank[2].sum()) for h in hs] == [7, 10]  # remote entries of each site's bank
    assert set(out["params"]) == set(hs[0].federated_params())


def test_a_restarted_handler_takes_the_rounds_model_from_its_workspace(synth_seg_data):
    a = handler(synth_seg_data)
    a.extract_features(ask(a, shift=0.05))
    b = FCLHandler(a.site, dict(CFG), steps_per_round=2, total_rounds=2)  # the same site, started again
    res = b.train(FLModel(params={}, params_type=ParamsType.FULL, current_round=0))
    assert torch.equal(b._local_bank[1], a._local_bank[1]) and set(res.params) == set(a.federated_params())
