"""The contract between thin FLARE executors and pure, testable task handlers.

A task handler knows nothing about FLARE's engine, contexts or Shareables: it takes an ``FLModel`` and returns
an ``FLModel``. Tests drive handlers directly with ``FLModel`` objects (no FLARE runtime, no monkeypatching).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from nvflare.app_common.abstract.fl_model import FLModel

__all__ = ["TaskHandler", "ScalarLog", "SiteContext"]


@dataclass
class SiteContext:
    """What a handler may know about where it runs (filled in by the executor)."""

    site_name: str
    datalist_path: str
    workspace_dir: str  # a folder the site may write into (checkpoints, caches)
    log_scalar: Callable[[str, float, int], None] = field(default=lambda tag, value, step: None)


@dataclass
class ScalarLog:
    tag: str
    value: float
    step: int


class TaskHandler(Protocol):
    """Pure task logic of one method on one site; state that persists between rounds lives on the handler."""

    def tasks(self) -> dict[str, Callable[[FLModel], FLModel]]:
        """Task name -> handler function (FLModel in, FLModel out)."""
        ...
