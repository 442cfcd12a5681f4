"""Atomic file writes, the one implementation of the package: a killed process never leaves a half-written file.

Every writer writes a temp file in the destination's folder (``.<name>.<random>.tmp``), flushes and fsyncs it,
then ``os.replace``-s it onto the destination (atomic on POSIX: readers see the old or the new file, never a
partial one). On any error the temp file is removed and the destination is left as it was. The destination keeps
its permission bits when it exists; a new file gets ``0o644`` (``mkstemp`` alone would give ``0o600``).

Base layer: standard library only (``fl_plugins.engine.checkpoint.atomic_torch_save`` builds on :func:`atomic_write`).
Arguments follow ``torch.save(obj, path)``: what to write first, then where.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json"]

#: Permission bits of a file that did not exist before the write.
NEW_FILE_MODE = 0o644


def atomic_write(write: Callable[[IO[bytes]], object], path: str | os.PathLike) -> None:
    """Call ``write(f)`` on a binary temp file next to ``path``, fsync it, then ``os.replace`` it onto ``path``.

    The parent folder is created if missing. If ``write`` (or anything after it) raises, the temp file is
    removed, ``path`` is untouched and the exception propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        try:
            mode = path.stat().st_mode & 0o777
        except FileNotFoundError:
            mode = NEW_FILE_MODE
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(data: bytes, path: str | os.PathLike, *, if_changed: bool = False) -> bool:
    """Write ``data`` atomically to ``path``; returns whether it wrote.

    With ``if_changed=True`` nothing is written (and ``False`` returned) when ``path`` already holds exactly
    ``data``.
    """
    path = Path(path)
    if if_changed and path.is_file() and path.read_bytes() == data:
        return False
    atomic_write(lambda f: f.write(data), path)
    return True


def atomic_write_text(text: str, path: str | os.PathLike, *, if_changed: bool = False) -> bool:
    """Write ``text`` (UTF-8) atomically to ``path``; ``if_changed`` as in :func:`atomic_write_bytes`."""
    return atomic_write_bytes(text.encode("utf-8"), path, if_changed=if_changed)


def atomic_write_json(
    obj: Any, path: str | os.PathLike, *, indent: int | None = 2, sort_keys: bool = False, if_changed: bool = False
) -> bool:
    """Write ``json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\\n"`` atomically to ``path``.

    ``if_changed`` as in :func:`atomic_write_bytes` (the comparison is on the serialised text).
    """
    return atomic_write_text(json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n", path, if_changed=if_changed)
