"""What a server-side controller and nvflare's ``WFCommServer`` use of the server engine, for tests that drive
controllers with ``FLModel`` results through nvflare's real task machinery."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nvflare.apis.client import Client
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext, FLContextManager
from nvflare.apis.impl.wf_comm_server import WFCommServer
from nvflare.apis.shareable import make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

#: a site's behaviour: (site, task name, received model) -> its answer, a string (an execution error) or None (holds
#: the task and never answers: the site stays busy with it until the server drops it, see ControllerHarness.go)
Behaviour = Callable[[str, str, FLModel], Any]


class FakeEngine:
    """Job participants, contexts (optionally with an app root) and events (delivered to ``handlers``, recorded in
    ``events`` as ``(event type, event data)``)."""

    def __init__(self, sites: list[str], app_root: Path | None = None) -> None:
        self.clients = [Client(s, f"token-{s}") for s in sites]
        self.handlers: list = []
        self.events: list[tuple[str, object]] = []
        stickers = {FLContextKey.APP_ROOT: str(app_root)} if app_root is not None else None
        self._ctx = FLContextManager(engine=self, identity_name="server", job_id="job", public_stickers=stickers)

    def get_clients(self) -> list[Client]:
        return list(self.clients)

    def client(self, name: str) -> Client:
        return next(c for c in self.clients if c.name == name)

    def new_context(self) -> FLContext:
        return self._ctx.new_context()

    def fire_event(self, event_type: str, fl_ctx: FLContext) -> None:
        self.events.append((event_type, fl_ctx.get_prop(FLContextKey.EVENT_DATA)))
        for h in self.handlers:
            h.handle_event(event_type, fl_ctx)


class ControllerHarness:
    """A ``ModelController`` on nvflare's real ``WFCommServer`` (task scheduling, task requests, submissions,
    cancellation, the result callbacks) with a :class:`FakeEngine`, driven by hand instead of by FLARE's monitor
    thread; :meth:`go` runs it with the sites' behaviour. ``saved`` collects the models the controller saves,
    ``received`` what each site received ``(site, task name, FLModel)``."""

    def __init__(self, ctrl: Any, sites: list[str], app_root: Path, load_model: Callable[[], FLModel]) -> None:
        self.engine = FakeEngine(sites, app_root)
        self.app = app_root
        self.ctrl = ctrl
        self.comm = WFCommServer()
        self.ctrl.set_communicator(self.comm)
        self.comm._engine = self.engine
        self.comm._dead_client_grace = 0.0
        self.ctrl.engine = self.engine
        self.ctrl.fl_ctx = self.engine.new_context()
        self.ctrl.abort_signal = Signal()
        self.ctrl.load_model = load_model
        self.saved: list[FLModel] = []
        # the persistor's part of saving (controllers with round checkpoints keep the rest of save_model)
        setattr(self.ctrl, "persist_model" if hasattr(ctrl, "persist_model") else "save_model", self.saved.append)
        self.engine.handlers.append(self.ctrl)
        self.received: list[tuple[str, str, FLModel]] = []
        self.dead: set[str] = set()

    def disconnect(self, site: str) -> None:
        """What FLARE does once the site's heartbeats stop (grace 0); the site stops asking for tasks."""
        with self.engine.new_context() as ctx:
            self.comm.process_dead_client_report(site, ctx)
        self.comm._check_dead_clients()
        self.dead.add(site)

    def go(self, act: Behaviour, timeout: float = 30.0) -> None:
        errors: list[BaseException] = []

        def target() -> None:
            try:
                self.ctrl.run()
            except BaseException as e:  # pragma: no cover - shown by the assertion below
                errors.append(e)

        t = threading.Thread(target=target, daemon=True)
        t.start()
        # site -> id of the task it holds. As FLARE's ClientRunner, a site runs one task at a time and asks for the
        # next one only when done with it; a held task is given up once the server no longer knows it (the task check
        # answers TASK_UNKNOWN: cancelled or timed out). A site never asks again for a task it holds: nvflare 2.9.0
        # then re-adds the resent ClientTask to task.client_tasks when another standing task follows it, and its task
        # monitor fails with a KeyError when the task exits (WFCommServer._do_process_task_request / _do_check_tasks).
        held: dict[str, str] = {}
        deadline = time.monotonic() + timeout
        while t.is_alive() and time.monotonic() < deadline:
            for c in self.engine.clients:
                if c.name in self.dead:
                    continue
                if c.name in held:
                    with self.engine.new_context() as ctx:
                        if self.comm.process_task_check(held[c.name], ctx) is not None:
                            continue  # still busy with it
                    del held[c.name]
                with self.engine.new_context() as ctx:
                    name, task_id, data = self.comm.process_task_request(c, ctx)
                if not name:
                    continue
                model = FLModelUtils.from_shareable(data)
                self.received.append((c.name, name, model))
                reply = act(c.name, name, model)
                if reply is None:
                    held[c.name] = task_id
                    continue
                shareable = make_reply(ReturnCode.EXECUTION_EXCEPTION) if isinstance(reply, str) else \
                    FLModelUtils.to_shareable(reply)
                with self.engine.new_context() as ctx:
                    self.comm.process_submission(c, name, task_id, shareable, ctx)
            self.comm.check_tasks()  # what FLARE's task monitor thread does (under the controller lock)
            time.sleep(0.002)
        t.join(1.0)
        assert not t.is_alive(), "the controller did not finish"
        assert not errors, errors

