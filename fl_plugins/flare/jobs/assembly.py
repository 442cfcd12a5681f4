"""The one job assembly every workflow uses: :func:`assemble_job` (server controller, persistor and TensorBoard
receiver, latency knobs, the sites' executor, analytics events, quantization over the tasks the job declares,
inline weights) and :func:`build_fedavg_job`, the FedAvg-family job of a registered handler.

Every component is a class of the installed ``fl_plugins`` package or of nvflare, and the job is exported with
``set_app_packages(["fl_plugins"])``, so no ``app/custom`` code is shipped: sites need ``fl_plugins`` installed
and the ``fl_plugins.`` prefix in their ``class_allow_list`` (see docs/deployment.md), not the BYOC right.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nvflare.app_common.widgets.convert_to_fed_event import ConvertToFedEvent
from nvflare.app_opt.tracking.tb.tb_receiver import TBAnalyticsReceiver
from nvflare.job_config.api import FedJob

from fl_plugins.flare.jobs.base import AGGREGATORS, CONTROLLERS, NON_FEDERATED_BUFFERS, FLSettings, load_ref
from fl_plugins.wire import TASK_TRAIN

__all__ = ["assemble_job", "build_fedavg_job", "CLIENT_PATHS", "CLIENT_SCRIPT"]

#: How the sites run the handler: the package's executor, or the Client API script ``custom/fl_client.py``.
CLIENT_PATHS = ("executor", "client_api")
#: The Client API entry script (``custom/`` of this repository, beside the package).
CLIENT_SCRIPT = Path(__file__).resolve().parents[3] / "custom" / "fl_client.py"
#: The tasks whose weights are quantized by default: the model out with ``train``, the update back with it.
TRAIN_QUANTIZED = ((TASK_TRAIN,), (TASK_TRAIN,))


def assemble_job(
    name: str,
    fl: FLSettings,
    controller: Any,
    persistor: Any,
    handler: str,
    handler_args: dict[str, Any],
    *,
    imports: list[str] | None = None,
    client: str = "executor",
    plugin_files: list[str] | None = None,
    quantized: tuple[Sequence[str], Sequence[str]] = TRAIN_QUANTIZED,
) -> FedJob:
    """A FLARE job of the plugin architecture: ``controller`` and ``persistor`` on the server, best/last checkpoints,
    per-site TensorBoard; on the sites one :class:`~fl_plugins.flare.executor.HandlerExecutor` answering exactly
    its handler's ``TASKS`` (or the Client API script).

    Args:
        quantized: ``(tasks whose data is quantized on the way out, tasks whose result is quantized on the way
            back)``, used when ``fl.quantization`` is set (nvflare's ModelQuantizer / ModelDequantizer filters).
        client: ``"executor"`` or ``"client_api"`` (the thin script ``custom/fl_client.py`` under nvflare's
            ``ScriptRunner``: the job then carries custom code).
        plugin_files: files shipped in the job's custom code on the server and every site (e.g. the module of a
            method defined outside the package; name its module in ``imports``).
    """
    if client not in CLIENT_PATHS:
        raise ValueError(f"client must be one of {CLIENT_PATHS}, got {client!r}")
    from fl_plugins.flare.executor import HandlerExecutor
    from fl_plugins.flare.handlers import handler_class

    tasks = list(handler_class(handler).TASKS)
    job = FedJob(name=name, min_clients=fl.min_clients)
    job.set_app_packages(["fl_plugins"])
    job.to_server(controller, id="controller")
    job.to_server(persistor, id="persistor")
    job.to_server(TBAnalyticsReceiver(events=["fed.analytix_log_stats"]), id="tb_receiver")
    job.to_server({"server": {"task_request_interval": fl.task_request_interval}})
    if client == "executor":
        job.to_clients(HandlerExecutor(handler=handler, handler_args=handler_args, imports=imports,
                                       memory_gc_rounds=fl.client_memory_gc_rounds), tasks=tasks)
    else:
        _add_client_api(job, {"handler": handler, "handler_args": handler_args, "imports": list(imports or [])})
    for f in plugin_files or []:
        if not Path(f).is_file():
            raise ValueError(f"plugin_files: {f!r} is not a file")
        job.add_file_to_server(str(f))
        job.add_file_to_clients(str(f))
    job.to_clients(ConvertToFedEvent(events_to_convert=["analytix_log_stats"], fed_event_prefix="fed."), id="event_to_fed")
    if fl.quantization:
        out, back = quantized
        unknown = sorted((set(out) | set(back)) - set(tasks))
        if unknown:
            raise ValueError(f"job {name!r}: quantized task(s) {unknown} are not tasks of handler {handler!r} {tasks}")
        _add_quantization(job, fl.quantization, list(out), list(back))
    if fl.inline_weights:
        job.to_server({"np_download_chunk_size": 0})
        job.to_clients({"np_download_chunk_size": 0})
    return job


def build_fedavg_job(
    name: str,
    handler: str,
    handler_args: dict[str, Any],
    fl: FLSettings,
    model_config: dict[str, Any] | None = None,
    method: str | None = None,
    method_config: dict[str, Any] | None = None,
    exclude_vars: str | None = NON_FEDERATED_BUFFERS,
    imports: list[str] | None = None,
    client: str = "executor",
    plugin_files: list[str] | None = None,
    controller_args: dict[str, Any] | None = None,
) -> Any:
    """A job of the FedAvg family: the controller named by ``fl.controller`` (with its aggregator), the server
    persistor of the global model (``model_config`` or the registered ``method``), assembled by
    :func:`assemble_job`.

    Args:
        handler: registered task handler (``fl_plugins.flare.handlers.HANDLERS``) with ``handler_args``.
        model_config / method / method_config: what the server's initial global model is built from (one of them).
        exclude_vars: regex of state keys the persistor never stores/sends (site-local state).
        controller_args: family-specific controller arguments (e.g. FCL's feature exchange).
    """
    from fl_plugins.flare.persistor import ConfigModelPersistor

    if client not in CLIENT_PATHS:
        raise ValueError(f"client must be one of {CLIENT_PATHS}, got {client!r}")
    aggregator = load_ref(AGGREGATORS[fl.aggregator or "weighted_average"])(norm_bound=fl.update_norm_bound)
    controller = load_ref(CONTROLLERS[fl.controller])(
        num_clients=fl.min_clients,  # the minimum number of connected sites a round needs
        num_rounds=fl.num_rounds,
        persistor_id="persistor",
        task_check_period=fl.task_check_period,
        aggregator=aggregator,
        key_metric=fl.key_metric,
        **fl.controller_args(),
        **dict(controller_args or {}),
    )
    persistor = ConfigModelPersistor(model_config=model_config, exclude_regex=exclude_vars, method=method,
                                     method_config=method_config, imports=imports, seed=fl.seed)
    return assemble_job(name, fl, controller, persistor, handler, handler_args, imports=imports, client=client,
                        plugin_files=plugin_files)


def _add_client_api(job: FedJob, config: dict[str, Any]) -> None:
    """Sites run ``custom/fl_client.py`` (ScriptRunner, in-process) with ``config`` shipped beside it."""
    import hashlib
    import json
    import tempfile

    from nvflare.job_config.script_runner import FrameworkType, ScriptRunner

    from fl_plugins.atomic_io import atomic_write_json
    from fl_plugins.flare.client_api import CONFIG_FILE

    if not CLIENT_SCRIPT.is_file():
        raise ValueError(f"client='client_api' needs the script {CLIENT_SCRIPT} (custom/ of the fl_plugins repository; "
                         "install fl_plugins from a checkout with 'pip install -e .')")
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / "fl_plugins_client_api" / digest
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(config, folder / CONFIG_FILE, sort_keys=True)
    # the handlers exchange numpy arrays (as the executor path); the script is found by name in the job's custom
    # folder on the sites, where it is shipped explicitly (ScriptRunner would resolve it against the current folder)
    runner = ScriptRunner(script=CLIENT_SCRIPT.name, script_args=f"--config {CONFIG_FILE}",  # a str: nvflare 2.9 in-process splits it
                          framework=FrameworkType.NUMPY)
    cwd = os.getcwd()
    os.chdir(CLIENT_SCRIPT.parent)  # ScriptRunner checks the (relative) script exists when it is added
    try:
        job.to_clients(runner)
    finally:
        os.chdir(cwd)
    job.add_file_to_clients(str(CLIENT_SCRIPT))
    job.add_file_to_clients(str(folder / CONFIG_FILE))


def _add_quantization(job: FedJob, kind: str, out: list[str], back: list[str]) -> None:
    """Quantize weights on the way out (``out`` tasks' data) and back (``back`` tasks' results) and dequantize on
    arrival, both directions (nvflare's own filters)."""
    from nvflare.app_opt.pt.quantization.dequantizer import ModelDequantizer
    from nvflare.app_opt.pt.quantization.quantizer import ModelQuantizer
    from nvflare.job_config.defs import FilterType

    job.to_server(ModelQuantizer(quantization_type=kind), filter_type=FilterType.TASK_DATA, tasks=out)
    job.to_server(ModelDequantizer(), filter_type=FilterType.TASK_RESULT, tasks=back)
    job.to_clients(ModelDequantizer(), filter_type=FilterType.TASK_DATA, tasks=out)
    job.to_clients(ModelQuantizer(quantization_type=kind), filter_type=FilterType.TASK_RESULT, tasks=back)
