"""The nvflare internals fl_plugins relies on (fl_plugins/flare/nvflare_internals.py), pinned to the installed
nvflare: the version is the one they were checked against, each one still exists with the expected signature and is
still used where nvflare uses it, each setter has the effect it claims on nvflare's real objects, the controllers
touch none of them directly; and the constructor contract of a job's ``fl.controller``
(fl_plugins/flare/controller_protocol.py)."""

from __future__ import annotations

import ast
import importlib
import inspect
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.impl import wf_comm_server
from nvflare.apis.impl.wf_comm_server import WFCommServer
from nvflare.apis.shareable import make_reply
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.utils.fl_model_utils import FLModelUtils
from nvflare.app_common.workflows.base_model_controller import BaseModelController
from nvflare.app_common.workflows.fedavg import FedAvg
from nvflare.app_common.workflows.model_controller import ModelController
from nvflare.job_config.fed_job_config import FedJobConfig

from fl_plugins.flare import nvflare_internals as ni
from fl_plugins.flare.controller_protocol import (
    JOB_CONTROLLER_KWARGS,
    OPTIONAL_CONTROLLER_KWARGS,
    ControllerClass,
    accepted_kwargs,
    missing_controller_kwargs,
)
from fl_plugins.flare.controllers import FedAvgWithFinalValidation
from fl_plugins.flare.stagewise import StagewiseController
from tests.flare.fake_engine import FakeEngine

SITES = ["site-1", "site-2", "site-3"]
FLARE_DIR = Path(__file__).resolve().parents[2] / "fl_plugins" / "flare"
CONTROLLER_FILES = ("controllers.py", "stagewise.py", "fcl_controller.py", "fclopt_controller.py")


# ------------------------------------------------------------------------------------------------ pinned version


def test_the_installed_nvflare_is_the_one_the_internals_were_checked_against():
    installed = ni.installed_nvflare()
    recheck = "\n".join(f"  - {i.qualname} ({i.kind}; nvflare uses it in {', '.join(i.read_in) or '-'}; "
                        f"we use it in {i.used_by})" for i in ni.INTERNALS)
    assert ".".join(installed.split(".")[:2]) == ni.PINNED_NVFLARE, (
        f"nvflare {installed} is installed, fl_plugins/flare/nvflare_internals.py was checked against nvflare "
        f"{ni.PINNED_NVFLARE}: re-check each of these internals in the new nvflare's source (that it exists, its "
        f"meaning, that the nvflare code named still reads or calls it), then set PINNED_NVFLARE:\n{recheck}")


def test_every_internal_exists_with_the_expected_signature_and_use():
    checked = ni.check_internals()
    assert checked == ni.INTERNALS
    names = {(i.owner.split(":")[1], i.name) for i in checked}
    # the ones the issue names, and every private nvflare method a controller overrides
    assert {("WFCommServer", "_task_check_period"), ("BaseModelController", "_current_num_targets"),
            ("BaseModelController", "_current_min_responses"), ("BaseModelController", "_current_failed_clients"),
            ("FedAvg", "_aggregate_one_result"), ("FedAvg", "_get_aggregated_result"),
            ("BaseModelController", "_process_result")} <= names
    assert ("nvflare.app_common.workflows.fedavg:FedAvg", "_aggregate_one_result") in ni.PRIVATE_METHODS


def _without_attribute(cls: type, name: str):
    original = cls.__init__

    def init(self, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        delattr(self, name)

    return init


def _monitor_tasks(self):  # a WFCommServer monitor that no longer sleeps _task_check_period
    pass


def _get_args(self, component, custom_dir):  # a job config that no longer reads the serialisation hook
    return {}


@pytest.mark.parametrize("target, name, value, message", [
    (FedAvg, "_get_aggregated_result", None,
     "FedAvg._get_aggregated_result: no such method"),
    (BaseModelController, "_process_result", lambda self, task, ctx: None,
     "BaseModelController._process_result: parameters ('self', 'task', 'ctx'), expected ('self', 'client_task', "
     "'fl_ctx')"),
    (WFCommServer, "__init__", _without_attribute(WFCommServer, "_task_check_period"),
     "WFCommServer._task_check_period: a fresh WFCommServer has no attribute '_task_check_period'"),
    (FedAvg, "__init__", _without_attribute(FedAvg, "_current_num_targets"),
     "BaseModelController._current_num_targets: a fresh FedAvg has no attribute '_current_num_targets'"),
    (WFCommServer, "_monitor_tasks", _monitor_tasks,
     "WFCommServer._task_check_period: nvflare.apis.impl.wf_comm_server.WFCommServer._monitor_tasks no longer "
     "uses it"),
    (FedJobConfig, "_get_args", _get_args,
     "FedJobConfig._always_serialize_args: nvflare.job_config.fed_job_config.FedJobConfig._get_args no longer uses it"),
])
def test_a_changed_internal_is_named_with_the_installed_version(monkeypatch, target, name, value, message):
    if value is None:
        monkeypatch.delattr(target, name)
    else:
        monkeypatch.setattr(target, name, value)
    with pytest.raises(RuntimeError) as err:
        ni.check_internals()
    text = str(err.value)
    assert message in text
    assert f"nvflare {ni.installed_nvflare()} (internals checked against {ni.PINNED_NVFLARE})" in text


def test_a_missing_owner_class_is_named():
    gone = ni.Internal("nvflare.apis.impl.wf_comm_server:NoSuchServer", "_x", "attribute", "a test")
    with pytest.raises(RuntimeError, match=r"NoSuchServer\._x: nvflare\.apis\.impl\.wf_comm_server has no "
                                           r"'NoSuchServer' \(used by a test\)"):
        ni.check_internals((gone,))


# ------------------------------------------------------------------------------------------------ the setters


def test_set_task_check_period_is_the_period_the_task_monitor_sleeps(monkeypatch):
    comm = WFCommServer()
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        comm._all_done = True  # one pass of the monitor loop

    monkeypatch.setattr(wf_comm_server, "time", types.SimpleNamespace(sleep=sleep, time=__import__("time").time))
    comm._monitor_tasks()
    assert slept == [0.2]  # nvflare's default
    assert ni.set_task_check_period(comm, 0.05) is True
    comm._all_done = False
    comm._monitor_tasks()
    assert slept == [0.2, 0.05]


def test_set_task_check_period_without_the_attribute_and_bad_values():
    assert ni.set_task_check_period(types.SimpleNamespace(), 0.05) is False
    for bad in (0, -1.0, True, "0.1", None):
        with pytest.raises(ValueError, match=f"task_check_period must be a number of seconds > 0, got {bad!r}"):
            ni.set_task_check_period(WFCommServer(), bad)


def test_a_controllers_task_check_period_reaches_the_communicator():
    ctrl = FedAvgWithFinalValidation(num_rounds=1, num_clients=1, task_check_period=0.05)
    assert ni.task_check_period(ctrl) == 0.05
    comm = WFCommServer()
    ctrl.set_communicator(comm)
    assert comm._task_check_period == 0.05
    stage = StagewiseController(task_check_period=0.03)
    comm = WFCommServer()
    stage.set_communicator(comm)
    assert ni.task_check_period(stage) == 0.03 and comm._task_check_period == 0.03


def _system(ctrl: Any) -> tuple[WFCommServer, FakeEngine]:
    engine = FakeEngine(SITES)
    comm = WFCommServer()
    ctrl.set_communicator(comm)
    comm._engine = engine
    ctrl.engine = engine
    ctrl.fl_ctx = engine.new_context()
    return comm, engine


def _fetch(comm: WFCommServer, engine: FakeEngine, site: str) -> tuple[str, FLModel]:
    with engine.new_context() as ctx:
        name, task_id, data = comm.process_task_request(engine.client(site), ctx)
    assert name == "train", f"{site} got no task"
    return task_id, FLModelUtils.from_shareable(data)


def _submit(comm: WFCommServer, engine: FakeEngine, site: str, task_id: str, reply: Any) -> None:
    with engine.new_context() as ctx:
        comm.process_submission(engine.client(site), "train", task_id, reply, ctx)


def _panics(engine: FakeEngine) -> list[Any]:
    return [data for event, data in engine.events if event == EventType.FATAL_SYSTEM_ERROR]


def test_send_per_site_gives_every_site_its_own_task_and_the_round_its_error_tolerance():
    """Three one-site tasks, two results needed: one site's error is ignored (the round can still reach two); as
    nvflare leaves it after per-site sends (the last one-site task: one target, one needed) the same error ends the
    job."""
    ctrl = FedAvgWithFinalValidation(num_rounds=1, num_clients=2)
    comm, engine = _system(ctrl)
    got: list[FLModel] = []
    models = {s: FLModel(params={"w": np.full(2, i, np.float32)}, params_type=ParamsType.FULL)
              for i, s in enumerate(SITES)}
    ni.send_per_site(ctrl, "train", models, min_responses=2, callback=got.append)
    assert (ctrl._current_num_targets, ctrl._current_min_responses, ctrl._current_failed_clients) == (3, 2, set())
    tasks = {s: _fetch(comm, engine, s) for s in SITES}
    for i, s in enumerate(SITES):  # each site received its own payload
        np.testing.assert_array_equal(tasks[s][1].params["w"], np.full(2, i, np.float32))
    _submit(comm, engine, "site-1", tasks["site-1"][0], make_reply(ReturnCode.EXECUTION_EXCEPTION))
    assert _panics(engine) == []
    _submit(comm, engine, "site-2", tasks["site-2"][0], FLModelUtils.to_shareable(FLModel(params={"w": np.ones(2)})))
    assert [site for site in (m.meta["client_name"] for m in got)] == ["site-2"]

    # what nvflare's own per-site sends leave behind: the last one-site task's tolerance
    ctrl = FedAvgWithFinalValidation(num_rounds=1, num_clients=2)
    comm, engine = _system(ctrl)
    for s, m in models.items():
        ModelController.send_model(ctrl, "train", m, targets=[s], callback=got.append)
    assert (ctrl._current_num_targets, ctrl._current_min_responses) == (1, 1)
    task_id, _ = _fetch(comm, engine, "site-1")
    _submit(comm, engine, "site-1", task_id, make_reply(ReturnCode.EXECUTION_EXCEPTION))
    assert len(_panics(engine)) == 1


def test_set_target_count_sets_what_accept_train_result_reads():
    ctrl = FedAvgWithFinalValidation(num_rounds=1, num_clients=2)
    _, engine = _system(ctrl)
    ctrl._current_failed_clients = {"old"}
    ni.set_target_count(ctrl, 3, 2)
    assert ctrl._current_failed_clients == set()
    error = make_reply(ReturnCode.EXECUTION_EXCEPTION)
    with engine.new_context() as ctx:
        assert ctrl._accept_train_result("site-1", error, ctx) is False  # ignored: 2 of 3 can still answer
        assert _panics(engine) == []
        assert ctrl._accept_train_result("site-2", error, ctx) is False  # 1 of 3 left < 2: the job ends
    assert len(_panics(engine)) == 1
    for bad in ((-1, 1), (1, True), (2.0, 1)):
        with pytest.raises(ValueError, match="must be an int >= 0, got"):
            ni.set_target_count(ctrl, *bad)


def test_fedavg_counters_are_the_ones_its_aggregate_reports():
    """What note_params_type / count_received set is what FedAvg's own aggregate reports (built-in average)."""
    from nvflare.app_common.aggregators.weighted_aggregation_helper import WeightedAggregationHelper

    avg = FedAvg(num_rounds=1)
    avg._aggr_helper, avg._aggr_metrics_helper = WeightedAggregationHelper(), WeightedAggregationHelper()
    avg._expected_count = 3  # what FedAvg.run sets for a round of three sites
    avg.fl_ctx = None
    avg.current_round = 0
    ni.note_params_type(avg, ParamsType.DIFF)
    ni.note_params_type(avg, ParamsType.FULL)  # only the first result's counts
    for _ in range(2):
        avg._aggr_helper.add(data={"w": np.ones(2)}, weight=1.0, contributor_name="s", contribution_round=0)
    assert ni.count_received(avg) == (1, 3)
    assert ni.count_received(avg) == (2, 3)
    assert ni.received_count(avg) == 2
    result = avg._get_aggregated_result()
    assert result.params_type == ParamsType.DIFF
    assert result.meta["nr_aggregated"] == 2


# ------------------------------------------------------------------------------------------------ no direct use


def _private_nvflare_bases(cls: type) -> list[type]:
    return [b for b in cls.__mro__[1:] if b.__module__.startswith("nvflare.")]


def test_the_controllers_touch_no_listed_internal_directly():
    """Outside nvflare_internals.py, the four controller modules read or write none of the listed attributes."""
    attributes = {i.name for i in ni.INTERNALS if i.kind == "attribute"}
    found = []
    for name in CONTROLLER_FILES:
        tree = ast.parse((FLARE_DIR / name).read_text())
        found += [f"{name}:{node.lineno}: .{node.attr}" for node in ast.walk(tree)
                  if isinstance(node, ast.Attribute) and node.attr in attributes]
    assert found == [], "use fl_plugins.flare.nvflare_internals instead of:\n" + "\n".join(found)


def test_every_private_nvflare_method_a_controller_overrides_is_listed():
    listed = {(owner.split(":")[1], name) for owner, name in ni.PRIVATE_METHODS}
    overrides: dict[str, list[str]] = {}
    for name in CONTROLLER_FILES:
        module = importlib.import_module(f"fl_plugins.flare.{name[:-3]}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__:
                continue
            for attr, value in vars(cls).items():
                if not attr.startswith("_") or attr.startswith("__") or not inspect.isfunction(value):
                    continue
                owners = [b.__name__ for b in _private_nvflare_bases(cls) if attr in vars(b)]
                if owners:
                    overrides[f"{cls.__name__}.{attr}"] = owners
    assert {"FedAvgWithFinalValidation._aggregate_one_result", "FedAvgWithFinalValidation._get_aggregated_result",
            "FCLOptController._aggregate_one_result", "StagewiseController._process_result"} <= set(overrides)
    unlisted = {m: o for m, o in overrides.items() if not any((b, m.split(".")[1]) in listed for b in o)}
    assert unlisted == {}, f"list them in nvflare_internals.INTERNALS: {unlisted}"


# ------------------------------------------------------------------------------------------------ controller contract


def _controllers() -> dict[str, type]:
    from fl_plugins.flare import job_builder

    out = {}
    for key, ref in job_builder.CONTROLLERS.items():
        if isinstance(ref, str):
            module, _, attr = ref.partition(":")
            ref = getattr(importlib.import_module(module), attr)
        out[key] = ref
    return out


def test_the_known_controllers_are_there():
    assert {"fedavg", "fcl", "fclopt"} <= set(_controllers())


@pytest.mark.parametrize("key", sorted(_controllers()))
def test_every_job_controller_accepts_what_the_job_builder_passes(key):
    cls = _controllers()[key]
    assert missing_controller_kwargs(cls) == [], f"{key}: {cls.__qualname__}"
    assert isinstance(cls, ControllerClass)
    from fl_plugins.flare.aggregators import WeightedAverage

    kwargs = {"num_clients": 2, "num_rounds": 3, "persistor_id": "persistor", "task_check_period": 0.05,
              "aggregator": WeightedAverage(), "key_metric": "val_dice", "round_timeout": 60,
              "memory_gc_rounds": 5, "resume_from": "round_checkpoint.pt"}
    assert set(kwargs) == {*JOB_CONTROLLER_KWARGS, *OPTIONAL_CONTROLLER_KWARGS}
    ctrl = cls(**kwargs)
    assert isinstance(ctrl, ModelController)
    assert (ctrl.num_clients, ctrl.num_rounds, ctrl.round_timeout, ctrl.resume_from) == (2, 3, 60,
                                                                                         "round_checkpoint.pt")
    assert ni.task_check_period(ctrl) == 0.05 and ctrl.key_metric == "val_dice"
    assert ctrl.aggregator is kwargs["aggregator"] and ctrl.memory_gc_rounds == 5


def test_missing_kwargs_follow_kwargs_up_the_mro():
    class Narrow(ModelController):
        def __init__(self, num_clients: int = 1, **kwargs: Any) -> None:
            super().__init__(**kwargs)

        def run(self) -> None:
            pass

    # persistor_id / task_check_period come from ModelController -> BaseModelController; then no **kwargs
    assert missing_controller_kwargs(Narrow) == ["num_rounds", "aggregator", "key_metric", "round_timeout",
                                                 "memory_gc_rounds", "resume_from"]
    assert {"num_clients", "persistor_id", "task_check_period", "ignore_result_error"} <= accepted_kwargs(Narrow)
    # the stage-wise workflow has its own job shape: it is not a FedAvg-family controller
    assert missing_controller_kwargs(StagewiseController) == ["num_rounds", "aggregator", "memory_gc_rounds"]
    with pytest.raises(TypeError, match="cls must be a class, got 'fedavg'"):
        accepted_kwargs("fedavg")
