"""Atomic checkpoint writes: a killed process never leaves a half-written file behind.

The implementation is :mod:`fl_plugins.atomic_io` (temp file in the same folder, fsync, ``os.replace``);
``atomic_write_text`` is re-exported from there for existing callers.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from fl_plugins.atomic_io import atomic_write, atomic_write_text

__all__ = ["atomic_torch_save", "atomic_write_text"]


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then ``os.replace`` onto ``path``."""
    atomic_write(lambda f: torch.save(obj, f), path)
