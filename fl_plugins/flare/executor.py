"""A thin FLARE ``Executor`` that resolves the site's data and dispatches tasks to a pure task handler.

Why a raw ``Executor`` rather than a Client API script: provisioned hospital sites load it from the installed
``fl_plugins`` package, so jobs carry no code and need no bring-your-own-code permission (the site only
allow-lists the ``fl_plugins.`` prefix). All logic lives in the handler (see :mod:`fl_plugins.flare.handler`).
"""

from __future__ import annotations

import os
import time
import traceback
from typing import Any

from nvflare.apis.analytix import AnalyticsDataType, LogWriterName
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.apis.utils.analytix_utils import create_analytic_dxo, send_analytic_dxo
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from fl_plugins.flare.controllers import DEFAULT_MEMORY_GC_ROUNDS
from fl_plugins.flare.handler import SITE_STATE_DIR, SiteContext, TaskHandler
from fl_plugins.wire import TASK_STAGE_FINETUNE, TASK_TRAIN

__all__ = ["HandlerExecutor"]


class HandlerExecutor(Executor):
    """Routes FLARE tasks to the registered task handler ``handler`` built with ``args``.

    Args:
        handler: registered handler name (:data:`fl_plugins.flare.handlers.HANDLERS`: ``finetune``, ``ssl``,
            ``dino``); the tasks it answers are the handler class's ``TASKS`` (the job builder sends exactly those).
        handler_args: the handler's keyword arguments (everything but the site context), e.g. ``{"method": "dino",
            "config": {...}, "steps_per_round": 5}``; checked against the handler's signature at start-up.
        imports: plugin modules to import before the handler is built (they register methods defined outside the
            package, e.g. shipped in the job's custom code).
    """

    def __init__(
        self, handler: str, handler_args: dict[str, Any] | None = None, imports: list[str] | None = None,
        memory_gc_rounds: int = DEFAULT_MEMORY_GC_ROUNDS, cuda_empty_cache: bool = False,
    ) -> None:
        """``memory_gc_rounds``: nvflare's memory clean-up (``gc.collect`` + ``malloc_trim``; with
        ``cuda_empty_cache`` also ``torch.cuda.empty_cache``) after every N-th training task (0 = off; the job
        setting ``fl.client_memory_gc_rounds``; one clean-up costs 0.1-0.25 s)."""
        super().__init__()
        if isinstance(memory_gc_rounds, bool) or not isinstance(memory_gc_rounds, int) or memory_gc_rounds < 0:
            raise ValueError(f"memory_gc_rounds must be an int >= 0, got {memory_gc_rounds!r}")
        self.memory_gc_rounds = memory_gc_rounds
        self.cuda_empty_cache = bool(cuda_empty_cache)
        self._trained = 0
        self.handler = handler
        self.handler_args = dict(handler_args or {})
        self.imports = list(imports or [])
        self._handler: TaskHandler | None = None
        self._tasks: dict = {}
        self._engine = None
        self._site_ctx: SiteContext | None = None
        self._setup_error: str | None = None

    def build_handler(self, site: SiteContext) -> TaskHandler:
        """Import the plugins, then build the handler for ``site`` (pure: no FLARE context needed)."""
        from fl_plugins.flare.handlers import handler_class
        from fl_plugins.methods import import_plugins

        import_plugins(self.imports)
        return handler_class(self.handler)(site, **self.handler_args)

    # -- FLARE plumbing ---------------------------------------------------------------------------------------------
    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            self._engine = fl_ctx.get_engine()
            try:
                self._setup(fl_ctx)
            except Exception as e:  # bad data / config: no training happens on this site
                # The reason is logged now and the site answers its first task with EXECUTION_EXCEPTION, which makes
                # the server abort the job ("Result from <site> is bad"). A system_panic here would only stop this
                # site's runner and leave the server waiting for its result (observed with nvflare 2.9).
                self._setup_error = f"{type(self).__name__} on site {fl_ctx.get_identity_name()!r} cannot start: {e}"
                self.log_error(fl_ctx, self._setup_error)

    def _setup(self, fl_ctx: FLContext) -> None:
        from fl_plugins.data.site_config import resolve_datalist

        site = fl_ctx.get_identity_name()
        workspace = fl_ctx.get_engine().get_workspace()
        datalist = resolve_datalist(site, workspace.get_site_config_dir())
        run_dir = workspace.get_run_dir(fl_ctx.get_job_id())
        out_dir = os.path.join(run_dir, "fl_plugins")
        os.makedirs(out_dir, exist_ok=True)
        self._site_ctx = SiteContext(
            site_name=site,
            datalist_path=str(datalist),
            workspace_dir=out_dir,
            log_scalar=self._log_scalar,
            log_image=self._log_image,
            state_dir=os.path.join(workspace.get_root_dir(), SITE_STATE_DIR),
        )
        t0 = time.perf_counter()
        self._handler = self.build_handler(self._site_ctx)
        self._tasks = self._handler.tasks()
        self.log_info(
            fl_ctx,
            f"site {site}: datalist {datalist} loaded and validated in {time.perf_counter() - t0:.1f}s; "
            f"tasks {sorted(self._tasks)}",
        )

    def _log_scalar(self, tag: str, value: float, step: int) -> None:
        """Stream one scalar to the server's TensorBoard (needs ConvertToFedEvent on the client)."""
        if self._engine is None:
            return
        dxo = create_analytic_dxo(
            tag=tag, value=float(value), data_type=AnalyticsDataType.SCALAR, writer=LogWriterName.TORCH_TB,
            global_step=int(step),
        )
        with self._engine.new_context() as fl_ctx:
            send_analytic_dxo(self, dxo=dxo, fl_ctx=fl_ctx)

    def _log_image(self, tag: str, image: Any, step: int) -> None:
        """Stream one image ``[C, H, W]`` float in [0, 1] to the server's TensorBoard (nvflare's IMAGE analytics
        record: ``TBAnalyticsReceiver`` writes it with ``add_image``, PNG-encoded, beside the site's scalars)."""
        if self._engine is None:
            return
        import numpy as np

        dxo = create_analytic_dxo(
            tag=tag, value=np.asarray(image, dtype=np.float32), data_type=AnalyticsDataType.IMAGE,
            writer=LogWriterName.TORCH_TB, global_step=int(step),
        )
        with self._engine.new_context() as fl_ctx:
            send_analytic_dxo(self, dxo=dxo, fl_ctx=fl_ctx)

    def _after_training_task(self) -> None:
        """Every ``memory_gc_rounds``-th training task: nvflare's allocator-aware clean-up (what its Client API
        executors do with ``memory_gc_rounds``)."""
        self._trained += 1
        if self.memory_gc_rounds and self._trained % self.memory_gc_rounds == 0:
            from nvflare.fuel.utils.memory_utils import cleanup_memory

            cleanup_memory(cuda_empty_cache=self.cuda_empty_cache)

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if self._handler is None:
            self.log_error(fl_ctx, f"refusing task {task_name!r}: {self._setup_error or 'the site failed to start'}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        fn = self._tasks.get(task_name)
        if fn is None:
            self.log_error(fl_ctx, f"unknown task {task_name!r}; this executor handles {sorted(self._tasks)}")
            return make_reply(ReturnCode.TASK_UNKNOWN)
        try:
            model_in = FLModelUtils.from_shareable(shareable)
            t0 = time.perf_counter()
            model_out = fn(model_in)
            if model_out.current_round is None:  # the round it answers: the server rejects another round's result
                model_out.current_round = model_in.current_round
            self.log_info(fl_ctx, f"task {task_name!r} done in {time.perf_counter() - t0:.2f}s")
            if task_name in (TASK_TRAIN, TASK_STAGE_FINETUNE):
                self._after_training_task()
            if abort_signal.triggered:
                return make_reply(ReturnCode.TASK_ABORTED)
            return FLModelUtils.to_shareable(model_out)
        except Exception as e:
            self.log_error(fl_ctx, f"task {task_name!r} failed: {e}\n{traceback.format_exc()}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
