"""FCLOpt, PTNU and DP end to end on nvflare's task machinery (ControllerHarness) with the real site handlers on
generated volumes: the sites' and the server's predicted targets are bit-identical every round (also for a site that
missed a round and is resynchronised), the target never travels down without a reason, DP's uploads and corrections,
and the communication accounting against the payload sizes."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fl_plugins.flare.fclopt_controller import COMM_FILE, FCLOptController, payload_bytes
from fl_plugins.flare.fclopt_handler import FCLOptHandler
from fl_plugins.flare.handler import SiteContext
from fl_plugins.methods import build
from fl_plugins.methods.fclopt import structural_pairs
from fl_plugins.wire import META_TARGET_UPLOADED, TASK_TRAIN
from tests.flare.fake_engine import ControllerHarness

TINY = {"backbone": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}, "image_size": 32,
        "volumes_per_batch": 2, "proj_hidden_dim": 16, "proj_dim": 8, "pred_hidden_dim": 16}
STEPS = 2
SITES = ["site-1", "site-2"]


def _handlers(data: Path, mode: str, dp: float | None, extra: dict | None = None) -> dict[str, FCLOptHandler]:
    cfg = {**TINY, "target_mode": mode, **(extra or {})}
    return {s: FCLOptHandler(SiteContext(s, str(data / s / "datalist.json"), tempfile.mkdtemp(prefix=f"{s}_")),
                             dict(cfg), steps_per_round=STEPS, total_rounds=4, dp_threshold=dp) for s in SITES}


def _run(tmp_path, data, mode="ptnu", dp=None, rounds=3, skip=frozenset(), extra=None):
    """``skip``: (site, round) pairs in which the site fails its task (it misses the round); ``extra``: more
    ``fclopt`` settings."""
    handlers = _handlers(data, mode, dp, extra)
    method = build("fclopt", {**TINY, "target_mode": mode, **(extra or {})})
    fed = method.state_taxonomy()["federated"]
    init = {k: v.numpy() for k, v in method.state_dict().items() if k in fed}
    ctrl = FCLOptController(num_rounds=rounds, num_clients=1, task_check_period=0.005, final_validation=False,
                            ptnu=mode == "ptnu", dp=dp is not None, target_momentum=method.config.target_momentum,
                            local_steps=STEPS)
    checks: list[tuple[str, int, bool]] = []  # (site, round, site's target == server's bitwise)

    def act(site: str, task: str, m: FLModel):
        assert task == TASK_TRAIN
        if (site, m.current_round) in skip:
            return "error"
        server_target = {k: v.copy() for k, v in ctrl.xi_hat.items()} if ctrl.xi_hat is not None else None
        res = handlers[site].train(m)
        if mode == "ptnu":
            mine = handlers[site]._xi_hat
            same = server_target is not None and set(mine) == set(server_target) and all(
                mine[k].tobytes() == server_target[k].tobytes() for k in mine)
            checks.append((site, m.current_round, same))
        return res

    h = ControllerHarness(ctrl, SITES, tmp_path, lambda: FLModel(params={k: v.copy() for k, v in init.items()},
                                                                 params_type=ParamsType.FULL))
    h.go(act, timeout=120)
    return h, handlers, checks


def _target_downloads(h: ControllerHarness) -> list[tuple[str, int]]:
    """(site, round) of every task the server sent with the target in it."""
    return [(s, m.current_round) for s, _, m in h.received if any(k.startswith("target.") for k in m.params)]


def test_structural_pairs_are_the_same_partition_of_the_next_volume():
    part, vol = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2]), torch.tensor([5, 5, 5, 7, 7, 7, 9, 9, 9])
    assert structural_pairs(part, vol).tolist() == [3, 4, 5, 6, 7, 8, 0, 1, 2]
    with pytest.raises(ValueError, match="partition 1 of volume 5 has no slice of another volume"):
        structural_pairs(torch.tensor([0, 1, 0]), torch.tensor([5, 5, 7]))


def test_ptnu_targets_are_bit_identical_on_every_party_and_never_downloaded(tmp_path, synth_seg_data):
    h, handlers, checks = _run(tmp_path, synth_seg_data, "ptnu", dp=None, rounds=3)
    assert len(checks) == 6 and all(same for _, _, same in checks), checks
    for site, _name, m in h.received:
        assert not any(k.startswith("target.") for k in m.params), (site, m.current_round)  # PTNU: no download
    summary = json.loads((tmp_path / COMM_FILE).read_text())
    assert summary["mode"] == "fclopt+ptnu" and summary["target_upload_fraction"] == 1.0  # no DP: every site uploads
    assert summary["bytes_per_site_per_round"]["down"]["target"] == 0


def test_a_site_that_missed_a_round_is_resynchronised_and_agrees_again(tmp_path, synth_seg_data):
    h, handlers, checks = _run(tmp_path, synth_seg_data, "ptnu", dp=None, rounds=4, skip={("site-2", 1)})
    assert all(same for _, _, same in checks), checks
    assert ("site-2", 2, True) in checks and ("site-2", 3, True) in checks
    got_target = _target_downloads(h)
    assert got_target == [("site-2", 2)]  # the one resynchronisation, nothing else


def test_a_site_that_joins_late_is_sent_the_target_and_then_predicts_it(tmp_path, synth_seg_data):
    """site-2 takes no part in rounds 0 and 1 (its handler has never trained nor predicted) and joins in round 2:
    the task of round 2 carries the target, with DP on; from then on every party's target is bit-identical."""
    skip = {("site-2", 0), ("site-2", 1)}
    h, handlers, checks = _run(tmp_path, synth_seg_data, "ptnu", dp=1e9, rounds=4, skip=skip)
    assert [c for c in checks if c[0] == "site-2"] == [("site-2", 2, True), ("site-2", 3, True)]
    assert all(same for _, _, same in checks), checks
    got_target = _target_downloads(h)
    # every task offered to a site absent from the previous round carries the target (the server cannot know
    # whether it will answer): round 1 (absent in 0, offered but failed) and round 2 (absent in 1, joins)
    assert got_target == [("site-2", 1), ("site-2", 2)]
    summary = json.loads((tmp_path / COMM_FILE).read_text())
    assert summary["target_upload_fraction"] == 0.0  # DP with a huge threshold: the late site uploads nothing either


def test_dp_uploads_only_above_the_threshold_and_corrections_reach_every_site(tmp_path, synth_seg_data):
    # delta = 0: every site uploads every round (a round where every site uploads); the corrected target goes to all
    h, handlers, checks = _run(tmp_path, synth_seg_data, "ptnu", dp=0.0, rounds=3)
    assert all(same for _, _, same in checks), checks
    downs = _target_downloads(h)
    assert downs == [(s, r) for r in (1, 2) for s in SITES]  # after each round with uploads
    # delta huge: nobody uploads, nothing is corrected, the target never travels
    h2, _, checks2 = _run(tmp_path / "b", synth_seg_data, "ptnu", dp=1e9, rounds=3)
    assert all(same for _, _, same in checks2)
    summary = json.loads((tmp_path / "b" / COMM_FILE).read_text())
    assert summary["mode"] == "fclopt+ptnu+dp" and summary["target_upload_fraction"] == 0.0
    assert summary["bytes_per_site_per_round"]["up"]["target"] == 0
    assert summary["bytes_per_site_per_round"]["down"]["target"] == 0


def test_fclopt_alone_carries_the_target_both_ways_and_accounting_matches_the_payloads(tmp_path, synth_seg_data):
    h, handlers, _ = _run(tmp_path, synth_seg_data, "fedavg", rounds=2)
    summary = json.loads((tmp_path / COMM_FILE).read_text())
    m = handlers["site-1"].method
    want = payload_bytes({k: v.numpy() for k, v in m.federated_state_dict().items()})
    assert summary["mode"] == "fclopt" and summary["site_rounds"] == 4
    for direction in ("up", "down"):
        got = summary["bytes_per_site_per_round"][direction]
        assert got == {p: float(want[p]) for p in ("online", "predictor", "target")}
    assert want["target"] > 0 and want["online"] == want["target"]  # the target is a copy of the online network


def test_local_predictor_never_crosses_the_wire_and_each_site_keeps_its_own(tmp_path, synth_seg_data):
    method = build("fclopt", {**TINY, "local_predictor": True})
    tax = method.state_taxonomy()
    pred = sorted(k for k in method.state_dict() if k.startswith("predictor."))
    assert pred and set(pred) <= set(tax["site"]) and not set(pred) & set(tax["federated"])
    h, handlers, checks = _run(tmp_path, synth_seg_data, "ptnu", dp=1e9, rounds=3, extra={"local_predictor": True})
    assert len(checks) == 6 and all(same for _, _, same in checks), checks  # PTNU still bit-identical
    for site, _name, m in h.received:
        assert not any(k.startswith(("predictor.", "target.")) for k in m.params), (site, m.current_round)
    summary = json.loads((tmp_path / COMM_FILE).read_text())
    per = summary["bytes_per_site_per_round"]
    assert per["up"]["predictor"] == per["down"]["predictor"] == 0 and per["up"]["target"] == 0
    assert per["total"] == per["up"]["online"] + per["down"]["online"] > 0  # the online network only, both ways
    p1, p2 = (handlers[s].method.predictor.state_dict() for s in SITES)
    assert any(not torch.equal(p1[k], p2[k]) for k in p1)  # trained apart, never averaged


def test_local_predictor_starts_each_round_where_the_site_left_it(synth_seg_data):
    """Round r's local training starts from the site's own predictor of the end of round r - 1 (not an average, not
    the initial one), while the online network starts from the broadcast weights."""
    h = _handlers(synth_seg_data, "fedavg", None, {"local_predictor": True})["site-1"]
    starts, ends = [], []
    train = h.local_train

    def spy(global_step):
        starts.append({k: v.clone() for k, v in h.method.predictor.state_dict().items()})
        out = train(global_step)
        ends.append({k: v.clone() for k, v in h.method.predictor.state_dict().items()})
        return out

    h.local_train = spy
    init = {k: v.numpy().copy() for k, v in h.method.federated_state_dict().items()}
    assert not any(k.startswith("predictor.") for k in init)
    for rnd in range(2):
        res = h.train(FLModel(params=dict(init), params_type=ParamsType.FULL, current_round=rnd))
        assert not any(k.startswith("predictor.") for k in res.params)
    assert all(torch.equal(starts[1][k], ends[0][k]) for k in ends[0])
    assert any(not torch.equal(starts[1][k], starts[0][k]) for k in ends[0])
    with pytest.raises(ValueError, match="local_predictor"):
        build("fclopt", {**TINY, "local_predictor": "yes"})


def test_handler_refuses_a_round_it_cannot_predict(synth_seg_data):
    h = _handlers(synth_seg_data, "ptnu", None)["site-1"]
    params = {k: v.numpy() for k, v in h.method.federated_state_dict().items()}
    with pytest.raises(ValueError, match="carries no target and this site cannot predict it"):
        h.train(FLModel(params=params, params_type=ParamsType.FULL, current_round=3))
    res = h.train(FLModel(params=params, params_type=ParamsType.FULL, current_round=0))
    assert res.meta[META_TARGET_UPLOADED] is True and any(k.startswith("target.") for k in res.params)
    with pytest.raises(ValueError, match="dp_threshold must be a number >= 0"):
        _handlers(synth_seg_data, "ptnu", -0.5)
    with pytest.raises(ValueError, match="dp_threshold needs fclopt.target_mode='ptnu'"):
        _handlers(synth_seg_data, "fedavg", 0.1)


def test_every_trainable_parameter_gets_a_gradient():
    m = build("fclopt", TINY)
    b = {"image": torch.randn(8, 1, 32, 32), "part": torch.arange(4).repeat(2), "vol": torch.arange(2).repeat_interleave(4)}
    loss, stats = m.training_step(b, 0, torch.Generator().manual_seed(0))
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing and all(not p.requires_grad for p in m.target.parameters())
    assert 0 <= stats["loss"] <= 4 and np.isfinite(stats["output_std"])


def test_a_restarted_site_continues_from_its_saved_ptnu_state(synth_seg_data):
    a = _handlers(synth_seg_data, "ptnu", None)["site-1"]
    params = {k: v.numpy() for k, v in a.method.federated_state_dict().items()}
    a.train(FLModel(params=params, params_type=ParamsType.FULL, current_round=0))
    b = FCLOptHandler(a.site, {**TINY, "target_mode": "ptnu"}, steps_per_round=STEPS, total_rounds=4)
    assert b._last_round == 0 and all(b._xi_hat[k].tobytes() == a._xi_hat[k].tobytes() for k in a._xi_hat)
    b.train(FLModel(params=params, params_type=ParamsType.FULL, current_round=1))  # predicts round 1 from round 0
    assert b._last_round == 1
