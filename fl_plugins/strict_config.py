"""The strict config base of every method and trainer config: :class:`StrictConfig`.

Base layer: standard library only. A config is a ``@dataclass`` (frozen or not) that also derives from
:class:`StrictConfig`; it then has

* :meth:`StrictConfig.from_dict`: a plain dict (a job's JSON, ``--set`` values) -> the config. An unknown key is a
  ``ValueError`` naming it and the known ones (``unknown mae setting(s) ['foo']; known: [...]``); a value of the
  wrong kind that the dataclass itself rejects (a ``TypeError`` from ``__init__``) becomes a ``ValueError`` naming
  the section. Sub-classes adapt values first in :meth:`StrictConfig._coerce` (a nested dict -> its config, a list
  -> a tuple): one hook instead of a hand-written ``from_dict`` per config.
* a required field (no default) that ``d`` lacks is a ``ValueError`` naming it before ``__init__`` runs
  (``fine-tuning settings need 'model' (a build_model config dict)``); the text in brackets is the field's
  ``metadata["what"]`` (``model: dict = field(metadata={"what": "a build_model config dict"})``), if any.
* :meth:`StrictConfig.to_dict`: the plain-dict form that round-trips through ``from_dict`` (tuples become lists,
  nested configs their own ``to_dict``).

``SECTION`` names the config in messages (the settings section of its jobs, e.g. ``"mae"``); value checks stay in
each config's ``__post_init__``, naming the field and the value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

__all__ = ["StrictConfig", "config_fields", "required_fields"]

C = TypeVar("C", bound="StrictConfig")


def config_fields(cls: type) -> list[str]:
    """The init fields of the dataclass ``cls``, in declaration order."""
    return [f.name for f in dataclasses.fields(cls) if f.init]


def required_fields(cls: type) -> list[str]:
    """The init fields of the dataclass ``cls`` without a default (nor a default factory), in declaration order."""
    return [f.name for f in dataclasses.fields(cls)
            if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


class StrictConfig:
    """Mixin of a dataclass config: strict ``from_dict`` / ``to_dict`` (see the module doc)."""

    #: the settings section this config is read from, named in errors ("unknown <SECTION> setting(s) ...")
    SECTION: ClassVar[str] = "config"

    @classmethod
    def _coerce(cls, d: dict[str, Any]) -> dict[str, Any]:
        """Adapt plain values before ``__init__`` (override: nested dicts, lists that are tuples). ``d`` is a copy."""
        return d

    @classmethod
    def from_dict(cls: type[C], d: Mapping[str, Any] | None) -> C:
        """Build from a plain dict; unknown keys raise ``ValueError`` naming them and the known ones."""
        if d is None:
            d = {}
        if not isinstance(d, Mapping):
            raise ValueError(f"{cls.SECTION} settings must be a mapping, got {type(d).__name__}: {d!r}")
        known = config_fields(cls)
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown {cls.SECTION} setting(s) {unknown}; known: {sorted(known)}")
        missing = [name for name in required_fields(cls) if name not in d]
        if missing:
            what = {f.name: f.metadata.get("what") for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
            named = ", ".join(f"{name!r}" + (f" ({what[name]})" if what[name] else "") for name in missing)
            raise ValueError(f"{cls.SECTION} settings need {named}")
        values = cls._coerce(dict(d))
        try:
            return cls(**values)
        except TypeError as e:  # e.g. a value the dataclass cannot take
            raise ValueError(f"{cls.SECTION} settings: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form: nested configs as their ``to_dict``, tuples as lists (round-trips via ``from_dict``)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.init}  # type: ignore[arg-type]


def _plain(value: Any) -> Any:
    if isinstance(value, StrictConfig):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
