"""Atomic checkpoint writes: a killed process never leaves a half-written file behind; and safe reads of a
checkpoint a user or site hands in.

The implementation is :mod:`fl_plugins.atomic_io` (temp file in the same folder, fsync, ``os.replace``);
``atomic_write_text`` is re-exported from there for existing callers.

:func:`load_tensor_checkpoint` checks a file's format before anything is unpickled (``torch.save``'s zip with a
``data.pkl``) and loads it with ``weights_only=True``: a pickle that would run code when loaded is refused by name,
not run. :func:`state_dict_of` takes the ``state_dict`` out (``model`` / ``state_dict`` entry or the dict itself);
:func:`check_state_fits` names the first tensor whose shape differs from a model's.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fl_plugins.atomic_io import atomic_write, atomic_write_text

__all__ = ["BackgroundSaver", "CheckpointError", "atomic_torch_save", "save_arrays", "load_arrays", "atomic_write_text", "check_state_fits",
           "load_tensor_checkpoint", "state_dict_of"]

log = logging.getLogger(__name__)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then ``os.replace`` onto ``path``."""
    atomic_write(lambda f: torch.save(obj, f), path)


class CheckpointError(ValueError):
    """A file handed in as a checkpoint is missing, is not a ``torch.save`` zip of tensors, lacks the expected
    entries or does not fit the model (the message names the setting, the file and what differs)."""


def save_arrays(obj: dict[str, Any], path: str | os.PathLike) -> None:
    """Atomically save ``obj``: plain values and dicts of numpy arrays (name -> array), the arrays as tensors, so
    that :func:`load_arrays` reads it back with ``weights_only=True`` (no pickled objects on disk, nothing that runs
    code when loaded). Used for the state a site keeps between rounds (FCL's round model, FCLOpt's PTNU state)."""
    def conv(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, np.ndarray) or np.isscalar(v) and isinstance(v, np.generic):
            return torch.tensor(np.array(v))
        return v

    atomic_torch_save(conv(obj), path)


def load_arrays(path: str | os.PathLike) -> dict[str, Any]:
    """What :func:`save_arrays` wrote, tensors back as numpy arrays (``weights_only=True``)."""
    def conv(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v.numpy() if isinstance(v, torch.Tensor) else v

    return conv(torch.load(path, map_location="cpu", weights_only=True))


def load_tensor_checkpoint(path: str | os.PathLike, setting: str = "--checkpoint") -> Any:
    """The object in a ``torch.save`` file, loaded with ``weights_only=True`` (tensors, numbers, strings, lists,
    dicts) after checking the format: a zip holding a ``data.pkl``.

    Raises:
        CheckpointError: the file is missing, not a PyTorch zip checkpoint (random bytes, the legacy non-zip
            format, another file type), damaged, or holds Python objects other than tensors (a pickle that could
            run code when loaded: refused before anything of it runs).
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{setting}: checkpoint {str(p)!r} does not exist")
    with open(p, "rb") as f:
        head = f.read(8)
    try:
        with zipfile.ZipFile(p) as z:
            has_pickle = any(n == "data.pkl" or n.endswith("/data.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        has_pickle = None
    if not has_pickle:
        kind = ("a zip without a data.pkl" if has_pickle is False
                else "a bare pickle (torch.save's legacy format or pickle.dump), which could run code when loaded: "
                     "re-save it with a current torch.save" if head[:1] == b"\x80"
                else f"a file starting with {head!r}")
        raise CheckpointError(f"{setting}: {str(p)!r} is not a PyTorch checkpoint (torch.save's zip of tensors); it is "
                              f"{kind}: give the .pt a job wrote (e.g. <workspace>/server/simulate_job/app_server/"
                              "FL_global_model.pt)")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e)) or re.search(r"Unsupported operand \d+", str(e))
        what = m.group(1) if m and m.groups() else (m.group(0) if m else str(e).strip().splitlines()[-1][:200])
        raise CheckpointError(f"{setting}: {str(p)!r} holds Python objects besides tensors ({what}); flssl loads only "
                              "tensors, since unpickling other objects can run code: if you trust the file, re-save "
                              "its state_dict (name -> tensor) with torch.save and give that") from e
    except Exception as e:  # a damaged zip, a truncated tensor record
        raise CheckpointError(f"{setting}: {str(p)!r} is a damaged PyTorch checkpoint ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}): write it again") from e


def state_dict_of(obj: Any, path: str | os.PathLike, setting: str = "--checkpoint") -> dict[str, torch.Tensor]:
    """The ``state_dict`` (name -> tensor) in a loaded checkpoint: its ``model`` or ``state_dict`` entry (a FLARE
    global model file, a training checkpoint) or the dict itself; :class:`CheckpointError` naming the keys found."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        found = sorted(map(str, obj))[:5] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{setting}: {str(path)!r} holds no state_dict (a 'model' or 'state_dict' entry of "
                              f"name -> tensor, or such a dict itself); found {found}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{setting}: {str(path)!r} is not a state_dict of tensors: entry {bad[0]!r} is "
                              f"{type(obj[bad[0]]).__name__}")
    return obj


def check_state_fits(state: dict[str, Any], expected: dict[str, Any], path: str | os.PathLike, model: str,
                     setting: str = "--checkpoint") -> None:
    """Refuse a ``state`` that shares no tensor name with ``expected`` (a model's ``state_dict``) or has a tensor
    of another shape: the message names the first differing tensor and both shapes."""
    common = [k for k in expected if k in state]
    if not common:
        raise CheckpointError(f"{setting}: {str(path)!r} is a checkpoint of another model: none of its {len(state)} "
                              f"tensors (e.g. {next(iter(state), None)!r}) is a tensor of {model} (e.g. "
                              f"{next(iter(expected), None)!r})")
    differ = [k for k in common if tuple(state[k].shape) != tuple(expected[k].shape)]
    if differ:
        k = differ[0]
        raise CheckpointError(f"{setting}: {str(path)!r} does not fit {model}: tensor {k!r} has shape "
                              f"{tuple(state[k].shape)} in the checkpoint, {tuple(expected[k].shape)} in the model "
                              f"({len(differ)} of {len(common)} shared tensors differ; a checkpoint of another "
                              "architecture or size? give --job the job that wrote it)")


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
