"""What a server-side controller and nvflare's ``WFCommServer`` use of the server engine, for tests that drive
controllers with ``FLModel`` results through nvflare's real task machinery."""

from __future__ import annotations

from pathlib import Path

from nvflare.apis.client import Client
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext, FLContextManager


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
