"""Atomic checkpoint writes: a killed process never leaves a half-written file behind.

The implementation is :mod:`fl_plugins.atomic_io` (temp file in the same folder, fsync, ``os.replace``);
``atomic_write_text`` is re-exported from there for existing callers.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from fl_plugins.atomic_io import atomic_write, atomic_write_text

__all__ = ["BackgroundSaver", "atomic_torch_save", "atomic_write_text"]

log = logging.getLogger(__name__)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then ``os.replace`` onto ``path``."""
    atomic_write(lambda f: torch.save(obj, f), path)


class BackgroundSaver:
    """Atomic writes on one background thread, in the order asked: :meth:`save` returns at once.

    For writes on a critical path (a server's files between two rounds, a site's state between two tasks): the caller
    hands over a snapshot it will not change again. At most ``max_pending`` writes wait; one more waits for the
    oldest. A failed write is raised (``on_error="raise"``, naming the file) by the next :meth:`save` or by
    :meth:`flush`, or logged and dropped (``on_error="log"``, for files that only serve a resume). Call
    :meth:`flush` before a process ends or reads a file it wrote.
    """

    def __init__(self, name: str, on_error: str = "raise", max_pending: int = 4) -> None:
        if on_error not in ("raise", "log"):
            raise ValueError(f"on_error must be 'raise' or 'log', got {on_error!r}")
        if not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be an int >= 1, got {max_pending!r}")
        self.name, self.on_error, self.max_pending = name, on_error, max_pending
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[tuple[str, Future]] = deque()

    def save(self, obj: Any, path: str | os.PathLike) -> None:
        """``atomic_torch_save(obj, path)``, later."""
        self.submit(str(path), atomic_torch_save, obj, path)

    def write_text(self, text: str, path: str | os.PathLike) -> None:
        """``atomic_write_text(text, path)``, later."""
        self.submit(str(path), atomic_write_text, text, path)

    def submit(self, what: str, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` after the writes already asked; ``what`` names it in an error."""
        while self._pending and (self._pending[0][1].done() or len(self._pending) >= self.max_pending):
            self._finish(*self._pending.popleft())
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.name)
        self._pending.append((what, self._pool.submit(fn, *args)))

    def flush(self) -> None:
        """Wait until every write asked is on disk (or failed: see the class docstring)."""
        while self._pending:
            self._finish(*self._pending.popleft())

    def _finish(self, what: str, future: Future) -> None:
        try:
            future.result()
        except Exception as e:
            if self.on_error == "raise":
                raise OSError(f"{self.name}: could not write {what}: {e}") from e
            log.warning("%s: could not write %s: %s", self.name, what, e)
