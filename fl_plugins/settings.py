"""Job settings from the command line: ``--set a.b=v`` parsing and the checked merge of overrides into defaults.

Base layer: standard library only. :func:`parse_set` turns ``["trainer.lr=1e-3", "views.blur_sigma=[0.1,0.5]"]``
into a nested dict (values decoded as JSON, else kept as strings); :func:`merge_settings` merges such a dict into a
job's defaults, rejecting an unknown key (with the known ones) and a value whose type does not fit the default's,
e.g. ``job setting 'trainer.lr' expects a number, got '1e-3x' (str)``.

Type rule (the default's type decides; a setting whose default is ``None`` accepts anything):

========================  =============================================================================
default                   accepted override
========================  =============================================================================
``bool``                  ``bool`` only (not ``0``/``1``)
``int``                   ``int`` (not ``bool``, not ``2.0``)
``float``                 ``int`` or ``float`` (not ``bool``)
``str``                   ``str`` (quote a number: ``--set 'name="1"'``)
``list`` / ``tuple``      ``list`` or ``tuple``
``dict``                  ``dict`` (merged key by key, recursively)
``None``                  anything
========================  =============================================================================

``None`` is also accepted for an *open* key (``open_keys``: settable keys beyond the defaults, validated later by
the method's own config class); an open key that is not in the defaults accepts any value.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["parse_set", "merge_settings"]


def parse_set(values: Iterable[str] | None) -> dict[str, Any]:
    """``["a.b=1", "a.c=null", "d=x"]`` -> ``{"a": {"b": 1, "c": None}, "d": "x"}``.

    Each value is decoded as JSON (``1``, ``1e-3``, ``true``, ``null``, ``[1, 2]``, ``{"k": 1}``, ``"quoted"``);
    what is not valid JSON is kept as the string. A later item for the same key wins.

    Raises:
        ValueError: an item without ``=``, an empty key or key part (``a..b``), or a key that is both a value and
            a parent (``a=1`` and ``a.b=2``).
    """
    out: dict[str, Any] = {}
    for item in values or []:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ValueError(f"--set expects key=value with a dotted key (e.g. trainer.lr=1e-3), got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        cur = out
        for i, p in enumerate(parts[:-1]):
            nxt = cur.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ValueError(f"--set {item!r}: {'.'.join(parts[: i + 1])!r} is also set to a value")
            cur = nxt
        if isinstance(cur.get(parts[-1]), dict) and not isinstance(value, dict):
            raise ValueError(f"--set {item!r}: {key!r} also has sub-settings")
        cur[parts[-1]] = value
    return out


def _expected(default: Any) -> tuple[str, tuple[type, ...]] | None:
    """(description, accepted types) of a default value; ``None`` when any value fits."""
    if default is None:
        return None
    if isinstance(default, bool):
        return "a boolean (true/false)", (bool,)
    if isinstance(default, int):
        return "an integer", (int,)
    if isinstance(default, float):
        return "a number", (int, float)
    if isinstance(default, str):
        return "a string", (str,)
    if isinstance(default, (list, tuple)):
        return "a list", (list, tuple)
    if isinstance(default, Mapping):
        return "a mapping of settings", (Mapping,)
    return None  # another type (not from JSON): not checked here


def merge_settings(
    base: dict[str, Any],
    overrides: Mapping[str, Any],
    open_keys: Mapping[str, frozenset[str] | Mapping[str, Any]] | None = None,
    where: str = "",
) -> dict[str, Any]:
    """A deep copy of ``base`` updated with ``overrides``, each override checked against its default.

    Args:
        base: the defaults (a nested dict); not modified.
        overrides: nested dict of new values (e.g. from :func:`parse_set`).
        open_keys: per dotted path of a sub-dict (``""`` for the top level), keys that may be set although they
            are not in ``base`` (e.g. every ``DINOConfig`` field under ``"dino"``): a set of names, or a mapping
            name -> default, whose type then checks a value as for ``base``.
        where: dotted path of ``base`` inside the whole settings (used in messages and to look up
            ``open_keys``; a trailing dot is ignored).

    Raises:
        ValueError: a key neither in ``base`` nor open (``unknown job setting 'dino.lrr'; known: [...]``), or a
            value whose type does not fit the default (``job setting 'trainer.lr' expects a number, got '1e-3x'
            (str)``; the type rule is in the module docstring).
    """
    prefix = where.rstrip(".")
    out = copy.deepcopy(base)
    allowed = (open_keys or {}).get(prefix, frozenset())
    for k, v in overrides.items():
        path = f"{prefix}.{k}" if prefix else str(k)
        if k not in out:
            if k not in allowed:
                raise ValueError(f"unknown job setting {path!r}; known: {sorted(set(out) | set(allowed))}")
            # an open key given with its default (open_keys as a mapping key -> default) is type-checked too
            expected = _expected(allowed[k]) if isinstance(allowed, Mapping) else None
            if expected is not None and v is not None:
                what, types = expected
                if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
                    raise ValueError(f"job setting {path!r} expects {what}, got {v!r} ({type(v).__name__})")
            out[k] = copy.deepcopy(v)
            continue
        default = out[k]
        expected = _expected(default)
        if expected is not None and not (v is None and k in allowed):
            what, types = expected
            if v is None or not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
                raise ValueError(f"job setting {path!r} expects {what}, got {v!r} ({type(v).__name__})")
        if isinstance(default, Mapping) and isinstance(v, Mapping):
            out[k] = merge_settings(default, v, open_keys, path)
        else:
            out[k] = copy.deepcopy(v)
    return out
