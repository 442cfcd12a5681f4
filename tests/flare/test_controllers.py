"""FedAvgWithFinalValidation's site handling with small fakes (no FLARE system): every connected site per round, a
site deemed disconnected is dropped from the standing round (which then completes) and from later rounds.

The communicator is nvflare's real ``WFCommServer`` (task scheduling, task requests, submissions, dead-client watch
list, ``BcastTaskManager.check_task_exit``), driven by hand instead of by its monitor thread; only the engine is fake.
"""

from __future__ import annotations

import numpy as np
import pytest
from nvflare.apis.controller_spec import Task, TaskCompletionStatus
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.impl.wf_comm_server import WFCommServer
from nvflare.apis.shareable import Shareable
from nvflare.app_common.workflows.model_controller import ModelController

from fl_plugins.flare.controllers import (
    BestModelSelection,
    FedAvgWithFinalValidation,
    FinalValidation,
    NotEnoughSitesError,
    SiteLiveness,
    plain_metrics,
)
from tests.flare.fake_engine import FakeEngine

SITES = ["site-1", "site-2", "site-3"]


def _system(deliver_events: bool = True, **kwargs) -> tuple[FedAvgWithFinalValidation, WFCommServer, FakeEngine]:
    engine = FakeEngine(SITES)
    ctrl = FedAvgWithFinalValidation(num_rounds=3, **{"num_clients": 2, **kwargs})
    comm = WFCommServer()
    ctrl.set_communicator(comm)
    comm._engine = engine  # what initialize_run sets (without starting the monitor thread)
    comm._dead_client_grace = 0.0  # dead_client_grace_period 0 (FedJob fail_fast)
    ctrl.engine = engine  # what start_controller sets
    ctrl.fl_ctx = engine.new_context()
    if deliver_events:
        engine.handlers.append(ctrl)
    return ctrl, comm, engine


def _disconnect(comm: WFCommServer, engine: FakeEngine, site: str) -> None:
    """What FLARE does once the site's heartbeats stop: dead report, then (grace 0) CLIENT_DISCONNECTED."""
    with engine.new_context() as ctx:
        comm.process_dead_client_report(site, ctx)
    comm._check_dead_clients()


def _round(ctrl: FedAvgWithFinalValidation, engine: FakeEngine, targets: list[str]) -> Task:
    task = Task(name="train", data=Shareable())
    with engine.new_context() as ctx:
        ctrl.broadcast(task=task, fl_ctx=ctx, targets=targets, min_responses=0)
    return task


def _answer(comm: WFCommServer, engine: FakeEngine, site: str) -> None:
    """The site asks for its task and sends a result."""
    with engine.new_context() as ctx:
        name, task_id, _ = comm.process_task_request(engine.client(site), ctx)
        assert name == "train", f"{site} got no task"
        comm.process_submission(engine.client(site), name, task_id, Shareable(), ctx)


def _check(comm: WFCommServer) -> None:
    comm._do_check_tasks()  # one pass of the task monitor


# ------------------------------------------------------------------------------------------------ sample_clients


def test_every_connected_site_every_round():
    ctrl, _, _ = _system()
    ctrl.current_round = 0
    for _ in range(5):  # nvflare's FedAvg would return a random 2 of the 3 here
        assert ctrl.sample_clients(ctrl.num_clients) == SITES


def test_sites_per_round_samples_that_many():
    ctrl, _, _ = _system(sites_per_round=2)
    ctrl.current_round = 0
    picks = [ctrl.sample_clients() for _ in range(20)]
    assert all(len(p) == 2 and set(p) <= set(SITES) and p == sorted(p) for p in picks)


def test_disconnected_site_skipped_then_back_after_reconnect():
    ctrl, comm, engine = _system()
    ctrl.current_round = 2
    _disconnect(comm, engine, "site-3")
    assert ctrl.connected_sites() == (["site-1", "site-2"], ["site-3"])
    assert ctrl.sample_clients() == ["site-1", "site-2"]
    with engine.new_context() as ctx:
        comm.client_is_active("site-3", "test: its job talks to the server again", ctx)
    assert ctrl.sample_clients() == SITES


def test_too_few_sites_left_is_an_error_naming_them():
    ctrl, comm, engine = _system()
    ctrl.current_round = 4
    _disconnect(comm, engine, "site-2")
    _disconnect(comm, engine, "site-3")
    with pytest.raises(NotEnoughSitesError, match=r"round 4: only 1 connected site\(s\) \['site-1'\].*at least 2"):
        ctrl.sample_clients()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_clients": 0}, "num_clients must be an int >= 1, got 0"),
        ({"num_clients": 2.0}, "num_clients must be an int >= 1, got 2.0"),
        ({"sites_per_round": 0}, "sites_per_round must be an int >= 1 or None, got 0"),
        ({"sites_per_round": True}, "sites_per_round must be an int >= 1 or None, got True"),
        ({"num_clients": 3, "sites_per_round": 2}, r"sites_per_round must be >= num_clients \(3, .*got 2"),
        ({"validation_timeout": -5}, "validation_timeout must be an int >= 0, got -5"),
        ({"final_validation": "yes"}, "final_validation must be a bool, got 'yes'"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FedAvgWithFinalValidation(**kwargs)


# ------------------------------------------------------------------------------------------------ dropping a site


def test_lost_site_dropped_and_round_completes():
    ctrl, comm, engine = _system()
    ctrl.current_round = 1
    task = _round(ctrl, engine, ctrl.sample_clients())
    assert task.targets == SITES
    for s in ("site-1", "site-2", "site-3"):  # all three got the task ...
        with engine.new_context() as ctx:
            assert comm.process_task_request(engine.client(s), ctx)[0] == "train"
    for s in ("site-1", "site-2"):  # ... two answer (re-asking returns the task they already hold)
        _answer(comm, engine, s)
    _check(comm)
    assert comm.get_num_standing_tasks() == 1, "waits for site-3"

    _disconnect(comm, engine, "site-3")  # -> CLIENT_DISCONNECTED -> drop_site
    assert task.targets == ["site-1", "site-2"]
    _check(comm)
    assert comm.get_num_standing_tasks() == 0
    assert task.completion_status == TaskCompletionStatus.OK
    assert ctrl.sample_clients() == ["site-1", "site-2"]  # the next round skips it


def test_without_the_handler_the_round_keeps_waiting():
    """Control: the same events not delivered to the controller (nvflare's own dead-client check only ends such a
    task after ``dead_client_check_lead_time``, 30 s after it was scheduled; see docs/deployment.md 9.3)."""
    ctrl, comm, engine = _system(deliver_events=False)
    ctrl.current_round = 1
    task = _round(ctrl, engine, SITES)
    for s in ("site-1", "site-2"):
        _answer(comm, engine, s)
    _disconnect(comm, engine, "site-3")
    _check(comm)
    assert task.targets == SITES and comm.get_num_standing_tasks() == 1


def test_drop_only_touches_standing_tasks_that_wait_for_the_site():
    ctrl, comm, engine = _system()
    ctrl.current_round = 0
    done = _round(ctrl, engine, SITES)
    for s in SITES:
        _answer(comm, engine, s)
    _check(comm)
    assert not done.is_standing
    other = _round(ctrl, engine, ["site-1", "site-2"])
    with engine.new_context() as ctx:
        assert ctrl.drop_site("site-3", ctx) == []
    assert done.targets == SITES and other.targets == ["site-1", "site-2"]
    with engine.new_context() as ctx:
        assert ctrl.drop_site("site-2", ctx) == ["train"]
    assert other.targets == ["site-1"]


def test_other_events_and_missing_names_are_ignored():
    ctrl, comm, engine = _system()
    task = _round(ctrl, engine, SITES)
    with engine.new_context() as ctx:
        ctrl.handle_event("_some_other_event", ctx)
        ctrl.handle_event("_client_disconnected", ctx)  # no DISCONNECTED_CLIENT_NAME prop
    assert task.targets == SITES


def test_only_own_tasks_are_remembered():
    ctrl, comm, engine = _system()
    first = _round(ctrl, engine, SITES)
    for s in SITES:
        _answer(comm, engine, s)
    _check(comm)
    second = _round(ctrl, engine, SITES)
    assert ctrl._own_tasks == [second] and first not in ctrl._own_tasks


def test_plain_metrics_makes_site_metrics_json_ready():
    """nvflare's NPValidator reports numpy.float32 (json.dumps refused it and failed the final validation)."""
    m = plain_metrics({"accuracy": np.float32(0.5), "n": np.int64(3), "ok": True, "name": "x",
                       "per_class": [np.float64(0.25), 1], "hist": np.arange(3), 7: None})
    assert m == {"accuracy": 0.5, "n": 3, "ok": True, "name": "x", "per_class": [0.25, 1], "hist": "[0 1 2]",
                 "7": None}
    assert type(m["accuracy"]) is float and type(m["n"]) is int


class _StageWise(SiteLiveness, FinalValidation, ModelController):
    """Another controller (not FedAvg) composed from the reusable server pieces, as a stage-wise or two-phase
    workflow would be: it gets lost-site handling and final validation without copying them."""

    def __init__(self, num_clients: int = 2) -> None:
        super().__init__()
        self.num_clients = num_clients
        self.current_round = 0
        self.init_site_liveness()
        self.init_final_validation()

    def run(self) -> None:  # pragma: no cover - not driven here
        pass


def test_site_liveness_is_reusable_by_any_model_controller():
    engine = FakeEngine(SITES)
    ctrl = _StageWise(num_clients=2)
    comm = WFCommServer()
    ctrl.set_communicator(comm)
    comm._engine = engine
    comm._dead_client_grace = 0.0
    ctrl.engine = engine
    ctrl.fl_ctx = engine.new_context()
    engine.handlers.append(ctrl)
    task = _round(ctrl, engine, ctrl.sample_clients())
    assert task.targets == SITES
    for s in ("site-1", "site-2"):
        _answer(comm, engine, s)
    _disconnect(comm, engine, "site-3")
    assert task.targets == ["site-1", "site-2"]
    _check(comm)
    assert comm.get_num_standing_tasks() == 0 and task.completion_status == TaskCompletionStatus.OK
    assert ctrl.sample_clients() == ["site-1", "site-2"]
    _disconnect(comm, engine, "site-2")
    with pytest.raises(NotEnoughSitesError, match=r"only 1 connected site\(s\) \['site-1'\]"):
        ctrl.sample_clients()


class _Best(BestModelSelection):
    def __init__(self, app_root, key_metric="val_dice") -> None:
        self.fl_ctx = FLContext()
        self.fl_ctx.set_prop(FLContextKey.APP_ROOT, str(app_root))
        self.init_best_model(key_metric)
        self.logged: list[str] = []

    def info(self, msg):
        self.logged.append(msg)

    def log_warning(self, fl_ctx, msg, fire_event=False):
        self.logged.append(msg)


def test_best_model_candidates_scored_by_the_unweighted_site_mean_and_saved_with_their_score(tmp_path):
    import json

    import torch

    best = _Best(tmp_path)
    w0, w1, w2 = ({"w": np.full(2, v, np.float32)} for v in (0.0, 1.0, 2.0))
    assert best.consider_candidate(w0, -1, {"site-1": {"val_dice": 0.2}, "site-2": {"val_dice": 0.4}}, "round 0")
    assert not best.consider_candidate(w1, 0, {"site-1": {"val_dice": 0.1}, "site-2": {"val_dice": 0.5}}, "round 1")
    # 0.45 = (0.3 + 0.6) / 2 beats 0.3 although a sample-weighted mean could rank them otherwise
    assert best.consider_candidate(w2, 1, {"site-1": {"val_dice": 0.3}, "site-2": {"val_dice": 0.6}},
                                   "the final validation")
    w2["w"][:] = 9.0  # written later by the files' thread (ServerFiles), from a copy taken at the choice
    best.flush_files()
    saved = torch.load(tmp_path / "best_FL_global_model.pt", weights_only=False)
    assert torch.equal(saved["model"]["w"], torch.full((2,), 2.0))
    assert saved["best"] == json.loads((tmp_path / "best_metric.json").read_text())
    assert saved["best"]["score"] == pytest.approx(0.45) and saved["best"]["aggregate"] == 1
    assert saved["best"]["round"] == "the final validation"
    assert not best.consider_candidate(w0, 2, {"site-1": {"loss": 1.0}}, "round 3")  # no key metric reported
    assert "no site reported 'val_dice'" in best.logged[-1]


def test_best_model_selection_off_and_bad_key_metric(tmp_path):
    assert not _Best(tmp_path, key_metric=None).consider_candidate({"w": np.zeros(1)}, 0, {"s": {"x": 1.0}}, "r")
    assert not (tmp_path / "best_FL_global_model.pt").exists()
    with pytest.raises(ValueError, match="key_metric must be a metric name or None, got ''"):
        _Best(tmp_path, key_metric="")


def test_the_jobs_task_check_period_reaches_the_servers_task_monitor():
    """nvflare 2.9 writes it to an attribute the monitor does not read; the controller writes the one it does."""
    ctrl = FedAvgWithFinalValidation(num_rounds=1, num_clients=1, task_check_period=0.05)
    comm = WFCommServer()
    assert comm._task_check_period == 0.2  # nvflare's default, which the job's setting never replaced before
    ctrl.set_communicator(comm)
    assert comm._task_check_period == 0.05
