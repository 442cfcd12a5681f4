"""Every use of nvflare's private state by this package's server workflows, in one place.

nvflare 2.9 leaves three things our controllers need without a public way to do them:

* **the task check period**: ``Controller.set_communicator`` copies the job's ``task_check_period`` to
  ``communicator.task_check_period``, but ``WFCommServer``'s task monitor sleeps ``communicator._task_check_period``
  (:func:`set_task_check_period`; the controller's own period, :func:`task_check_period`);
* **per-site sends**: FCL and FCLOpt send one task per site (each site its own payload) with
  ``ModelController.send_model``; every call resets ``BaseModelController``'s error-tolerance context
  (``_current_num_targets`` / ``_current_min_responses`` / ``_current_failed_clients``) to that one site, so it is set
  back to the whole round afterwards (:func:`set_target_count`, :func:`send_per_site`);
* **FedAvg's result counters**: ``FedAvgWithFinalValidation`` overrides ``FedAvg._aggregate_one_result`` and keeps
  its bookkeeping (``_params_type``, ``_received_count``, ``_expected_count``: :func:`note_params_type`,
  :func:`count_received`, :func:`received_count`).

Where a subclass must override or call a private nvflare method (``FedAvg._aggregate_one_result``,
``FedAvg._get_aggregated_result``, ``BaseModelController._process_result``) or sets a private hook nvflare reads
(``_always_serialize_args``), it is listed in :data:`INTERNALS`. :func:`check_internals` verifies every entry against
the installed nvflare (the attribute is set by a fresh instance, the method exists with the parameter names we call
it with, the nvflare function that uses it still names it) and raises a ``RuntimeError`` naming what changed;
``tests/flare/test_nvflare_internals.py`` runs it and fails when the installed nvflare is not :data:`PINNED_NVFLARE`.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.workflows.model_controller import ModelController

__all__ = ["INTERNALS", "PINNED_NVFLARE", "PRIVATE_METHODS", "Internal", "check_internals", "count_received",
           "installed_nvflare", "note_params_type", "received_count", "send_per_site", "set_target_count",
           "set_task_check_period", "task_check_period"]

#: nvflare major.minor every entry of :data:`INTERNALS` was checked against (the source of nvflare 2.9.0).
PINNED_NVFLARE = "2.9"

_WF = "nvflare.apis.impl.wf_comm_server:WFCommServer"
_CTRL = "nvflare.apis.impl.controller:Controller"
_BMC = "nvflare.app_common.workflows.base_model_controller:BaseModelController"
_FEDAVG = "nvflare.app_common.workflows.fedavg:FedAvg"
_JOBCFG = "nvflare.job_config.fed_job_config:FedJobConfig"


@dataclass(frozen=True)
class Internal:
    """One private nvflare name this package relies on.

    Attributes:
        owner: ``"module:Class"`` of the nvflare class it belongs to.
        name: the private attribute or method.
        kind: ``"attribute"`` (set by the owner's ``__init__``: checked on a fresh ``probe`` instance), ``"method"``
            (overridden or called: checked to exist with ``params``), ``"hook"`` (an attribute *we* set and nvflare
            reads with a default, so a rename would go unnoticed: only ``read_in`` is checked).
        used_by: the code of this package (or its tests) that relies on it.
        params: a method's parameter names, ``self`` first (``inspect.signature``).
        read_in: ``"module:Class.method"`` of the nvflare functions whose code (not comments or docstrings) must
            still name it: where nvflare reads the attribute or calls the method, i.e. what makes our use of it have
            an effect.
        probe: ``"module:Class"`` instantiated (no arguments) to check an attribute; default: ``owner``.
    """

    owner: str
    name: str
    kind: str
    used_by: str
    params: tuple[str, ...] | None = None
    read_in: tuple[str, ...] = ()
    probe: str | None = None

    @property
    def qualname(self) -> str:
        """``module.Class.name``."""
        return f"{self.owner.replace(':', '.')}.{self.name}"


#: Every private nvflare name used by fl_plugins.flare (and by the tests' drivers of nvflare's task machinery).
INTERNALS: tuple[Internal, ...] = (
    Internal(_WF, "_task_check_period", "attribute", "set_task_check_period (FedAvgWithFinalValidation and "
             "StagewiseController.set_communicator)", read_in=(f"{_WF}._monitor_tasks", f"{_WF}.wait_for_task")),
    Internal(_CTRL, "_task_check_period", "attribute", "task_check_period (StagewiseController's stage-close loop, "
             "set_communicator)", read_in=(f"{_CTRL}.set_communicator", f"{_FEDAVG}.run"), probe=_FEDAVG),
    Internal(_BMC, "_current_num_targets", "attribute", "set_target_count / send_per_site (FCL, FCLOpt)",
             read_in=(f"{_BMC}.broadcast_model", f"{_BMC}._accept_train_result"), probe=_FEDAVG),
    Internal(_BMC, "_current_min_responses", "attribute", "set_target_count / send_per_site (FCL, FCLOpt)",
             read_in=(f"{_BMC}.broadcast_model", f"{_BMC}._accept_train_result"), probe=_FEDAVG),
    Internal(_BMC, "_current_failed_clients", "attribute", "set_target_count / send_per_site (FCL, FCLOpt)",
             read_in=(f"{_BMC}.broadcast_model", f"{_BMC}._accept_train_result"), probe=_FEDAVG),
    Internal(_BMC, "_accept_train_result", "method", "set_target_count (the error tolerance it sets is read here)",
             params=("self", "client_name", "result", "fl_ctx", "is_unknown_task"),
             read_in=(f"{_BMC}._process_result",)),
    Internal(_BMC, "_process_result", "method", "StagewiseController._process_result (override: a site answered)",
             params=("self", "client_task", "fl_ctx"), read_in=(f"{_BMC}._prepare_task",)),
    Internal(_FEDAVG, "_aggregate_one_result", "method", "FedAvgWithFinalValidation / FCLOptController."
             "_aggregate_one_result (override: every result validated)", params=("self", "result"),
             read_in=(f"{_FEDAVG}.run",)),
    Internal(_FEDAVG, "_get_aggregated_result", "method", "FedAvgWithFinalValidation._get_aggregated_result "
             "(override: rejections reported)", params=("self",), read_in=(f"{_FEDAVG}.run",)),
    Internal(_FEDAVG, "_params_type", "attribute", "note_params_type (FedAvgWithFinalValidation._aggregate_one_result)",
             read_in=(f"{_FEDAVG}.run", f"{_FEDAVG}._get_aggregated_result")),
    Internal(_FEDAVG, "_received_count", "attribute", "count_received / received_count "
             "(FedAvgWithFinalValidation._aggregate_one_result, _get_aggregated_result)",
             read_in=(f"{_FEDAVG}.run", f"{_FEDAVG}._get_aggregated_result")),
    Internal(_FEDAVG, "_expected_count", "attribute", "count_received (FedAvgWithFinalValidation's log line)",
             read_in=(f"{_FEDAVG}.run",)),
    Internal(_JOBCFG, "_always_serialize_args", "hook", "StagewiseController / aggregators.WeightedAverage "
             "(constructor arguments always written to the job config)", read_in=(f"{_JOBCFG}._get_args",)),
    Internal(_WF, "_check_dead_clients", "method", "SiteLiveness (fires CLIENT_DISCONNECTED); tests/flare drive it "
             "by hand", params=("self",), read_in=(f"{_WF}._monitor_tasks",)),
    Internal(_WF, "_do_check_tasks", "method", "tests/flare (one pass of the task monitor)", params=("self",),
             read_in=(f"{_WF}.check_tasks",)),
    Internal(_WF, "_engine", "attribute", "tests/flare/fake_engine.py (what initialize_run sets)",
             read_in=(f"{_WF}._job_policy_violated",)),
    Internal(_WF, "_dead_client_grace", "attribute", "tests/flare/fake_engine.py (dead_client_grace_period 0)",
             read_in=(f"{_WF}._check_dead_clients",)),
)

#: The private nvflare methods our controllers override, or that they or the tests' drivers call or depend on
#: (``(owner, name)``), from :data:`INTERNALS`.
PRIVATE_METHODS: tuple[tuple[str, str], ...] = tuple((i.owner, i.name) for i in INTERNALS if i.kind == "method")


def installed_nvflare() -> str:
    """The installed nvflare's version string (e.g. ``"2.9.0"``)."""
    import nvflare

    return str(getattr(nvflare, "__version__", "unknown"))


# --------------------------------------------------------------------------------------------- task check period


def task_check_period(controller: Any) -> float:
    """The controller's task check period: nvflare 2.9 ``Controller._task_check_period`` (set by
    ``BaseModelController.__init__`` from its ``task_check_period`` argument; ``FedAvg.run`` sleeps it between
    checks for standing tasks). Read by the stage-wise close loop and by :func:`set_task_check_period`'s callers."""
    return float(controller._task_check_period)


def set_task_check_period(communicator: Any, seconds: float) -> bool:
    """Make the server's task monitor check every ``seconds``: nvflare 2.9 ``WFCommServer._task_check_period``.

    ``Controller.set_communicator`` writes ``communicator.task_check_period``, but ``WFCommServer._monitor_tasks``
    (and ``wait_for_task``) sleep ``communicator._task_check_period`` (default 0.2 s), so a job's
    ``task_check_period`` never took effect there (a finished round was noticed 0.08-0.1 s late,
    benchmarks/fl_overhead.py --breakdown). Returns False, changing nothing, for a communicator without that
    attribute (not a ``WFCommServer``).

    Raises:
        ValueError: ``seconds`` is not a number > 0.
    """
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise ValueError(f"task_check_period must be a number of seconds > 0, got {seconds!r}")
    if not hasattr(communicator, "_task_check_period"):
        return False
    communicator._task_check_period = seconds
    return True


# --------------------------------------------------------------------------------------------- per-site sends


def set_target_count(controller: Any, num_targets: int, min_responses: int) -> None:
    """Set the error tolerance of the task(s) just sent to ``num_targets`` sites of which ``min_responses`` must
    answer, with no site failed yet: nvflare 2.9 ``BaseModelController._current_num_targets`` /
    ``_current_min_responses`` / ``_current_failed_clients``.

    ``BaseModelController.broadcast_model`` (under every ``send_model``) sets them for each call and
    ``_accept_train_result`` reads them (with ``ignore_result_error=None``, a site's error is ignored while
    ``min_responses`` can still be reached, else the job panics). After one ``send_model`` per site they describe
    the last one-site task, so the round's first error would end the job; this sets them to the round.

    Raises:
        ValueError: ``num_targets`` or ``min_responses`` is not an int >= 0.
    """
    for name, value in (("num_targets", num_targets), ("min_responses", min_responses)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    controller._current_num_targets = num_targets
    controller._current_min_responses = min_responses
    controller._current_failed_clients = set()


def send_per_site(controller: Any, task_name: str, models: Mapping[str, FLModel], *, min_responses: int,
                  timeout: int = 0, callback: Callable[[FLModel], Any] | None = None) -> None:
    """Send each site of ``models`` its own ``task_name`` task (non-blocking ``ModelController.send_model`` with
    ``targets=[site]``, in the order of ``models``), then give the round's error tolerance back to the controller:
    ``len(models)`` targets, ``min_responses`` needed (:func:`set_target_count`).

    ``ModelController.send_model`` is called directly so that the controller's own ``send_model`` override (the
    one that called this) does not run again for every site.
    """
    for site, model in models.items():
        ModelController.send_model(controller, task_name, model, targets=[site], timeout=timeout, callback=callback)
    set_target_count(controller, len(models), min_responses)


# --------------------------------------------------------------------------------------------- FedAvg's counters


def note_params_type(controller: Any, params_type: Any) -> None:
    """Keep the round's first result's ``params_type`` for the aggregate, as nvflare 2.9
    ``FedAvg._aggregate_one_result`` does: ``FedAvg._params_type`` (reset by ``FedAvg.run`` every round, read by
    ``FedAvg._get_aggregated_result``)."""
    if controller._params_type is None:
        controller._params_type = params_type


def count_received(controller: Any) -> tuple[int, int]:
    """One more result of the round processed; returns ``(received, expected)``: nvflare 2.9
    ``FedAvg._received_count`` (reset by ``FedAvg.run``, the aggregate's ``nr_aggregated`` in
    ``_get_aggregated_result``) and ``FedAvg._expected_count`` (the round's sites, set by ``FedAvg.run``)."""
    controller._received_count += 1
    return int(controller._received_count), int(controller._expected_count)


def received_count(controller: Any) -> int:
    """Results of the round processed so far: nvflare 2.9 ``FedAvg._received_count``."""
    return int(controller._received_count)


# --------------------------------------------------------------------------------------------- the check


def _resolve(ref: str) -> Any:
    """The object of ``"module:Class[.attr...]"``; raises LookupError naming what is missing."""
    module, _, path = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as e:
        raise LookupError(f"module {module} cannot be imported ({e})") from e
    done = module
    for part in path.split("."):
        if not hasattr(obj, part):
            raise LookupError(f"{done} has no {part!r}")
        obj = getattr(obj, part)
        done = f"{done}.{part}"
    return obj


def _names_in(source: str) -> set[str]:
    """The names a function's source uses in code (attributes, names, string constants such as ``getattr``'s),
    not in comments or docstrings."""
    tree = ast.parse(textwrap.dedent(source))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)
    for node in ast.walk(tree):  # docstrings are string constants too: take them out again
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (doc := ast.get_docstring(node, clean=False)):
            names.discard(doc)
    return names


def _problems(internal: Internal) -> list[str]:
    out: list[str] = []
    try:
        owner = _resolve(internal.owner)
    except LookupError as e:
        return [f"{internal.qualname}: {e}"]
    if internal.kind == "method":
        fn = getattr(owner, internal.name, None)
        if not callable(fn):
            out.append(f"{internal.qualname}: no such method")
        elif internal.params is not None:
            try:
                got = tuple(inspect.signature(fn).parameters)
            except (TypeError, ValueError) as e:
                got = (f"<no signature: {e}>",)
            if got != internal.params:
                out.append(f"{internal.qualname}: parameters {got}, expected {internal.params}")
    elif internal.kind == "attribute":
        probe_ref = internal.probe or internal.owner
        try:
            probe = _resolve(probe_ref)()
        except Exception as e:  # a constructor that changed its required arguments is a change too
            out.append(f"{internal.qualname}: cannot build a {probe_ref} to look for it ({type(e).__name__}: {e})")
        else:
            if not hasattr(probe, internal.name):
                out.append(f"{internal.qualname}: a fresh {probe_ref.split(':')[-1]} has no attribute "
                           f"{internal.name!r}")
    elif internal.kind != "hook":
        out.append(f"{internal.qualname}: unknown kind {internal.kind!r} (attribute, method or hook)")
    for ref in internal.read_in:
        try:
            source = inspect.getsource(_resolve(ref))
        except LookupError as e:
            out.append(f"{internal.qualname}: its user {ref} is gone ({e})")
            continue
        except (OSError, TypeError) as e:
            out.append(f"{internal.qualname}: the source of its user {ref} cannot be read ({e})")
            continue
        if internal.name not in _names_in(source):
            out.append(f"{internal.qualname}: {ref.replace(':', '.')} no longer uses it")
    return out


def check_internals(internals: tuple[Internal, ...] = INTERNALS) -> tuple[Internal, ...]:
    """Verify every private nvflare name we rely on against the installed nvflare; returns the entries checked.

    Raises:
        RuntimeError: one or more entries changed; the message names each (``module.Class.name`` and what is
            wrong), the installed nvflare version, :data:`PINNED_NVFLARE` and the code that relies on it.
    """
    problems = [(i, p) for i in internals for p in _problems(i)]
    if problems:
        lines = "\n".join(f"  - {p} (used by {i.used_by})" for i, p in problems)
        raise RuntimeError(f"nvflare {installed_nvflare()} (internals checked against {PINNED_NVFLARE}) changed "
                           f"{len(problems)} internal(s) fl_plugins relies on (fl_plugins/flare/nvflare_internals.py):"
                           f"\n{lines}")
    return internals
