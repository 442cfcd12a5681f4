"""``StrictConfig`` (fl_plugins/strict_config.py): unknown keys and missing required fields named, ``_coerce`` runs
before ``__init__``, a ``TypeError`` of the dataclass becomes a ``ValueError`` naming the section, ``to_dict``
round-trips (tuples as lists, nested configs as dicts)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from fl_plugins.strict_config import StrictConfig, config_fields, required_fields


@dataclass(frozen=True)
class Inner(StrictConfig):
    SECTION = "inner"

    width: int = 4


@dataclass(frozen=True)
class Outer(StrictConfig):
    SECTION = "outer"

    model: dict = field(metadata={"what": "a model dict"})
    arch: str = field(default="x")
    pair: tuple = (1, 2)
    inner: Inner = field(default_factory=Inner)
    calls: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.pair[0] > self.pair[1]:
            raise ValueError(f"outer setting 'pair'={self.pair!r}: must be increasing")

    @classmethod
    def _coerce(cls, d: dict[str, Any]) -> dict[str, Any]:
        if "pair" in d:
            d["pair"] = tuple(d["pair"])
        if isinstance(d.get("inner"), dict):
            d["inner"] = Inner.from_dict(d["inner"])
        return d


@dataclass(frozen=True)
class TwoRequired(StrictConfig):
    SECTION = "two"

    a: int
    b: int


def test_fields_and_required_fields_in_declaration_order():
    assert config_fields(Outer) == ["model", "arch", "pair", "inner", "calls"]
    assert required_fields(Outer) == ["model"]
    assert required_fields(TwoRequired) == ["a", "b"]
    assert required_fields(Inner) == []


def test_unknown_keys_are_named_with_the_sorted_known_ones():
    with pytest.raises(ValueError, match=r"^unknown outer setting\(s\) \['bar', 'foo'\]; known: "
                                         r"\['arch', 'calls', 'inner', 'model', 'pair'\]$"):
        Outer.from_dict({"model": {}, "foo": 1, "bar": 2})


def test_missing_required_fields_are_named_with_their_description():
    with pytest.raises(ValueError, match=r"^outer settings need 'model' \(a model dict\)$"):
        Outer.from_dict({"arch": "y"})
    with pytest.raises(ValueError, match=r"^two settings need 'a', 'b'$"):
        TwoRequired.from_dict(None)
    with pytest.raises(ValueError, match=r"^two settings need 'b'$"):
        TwoRequired.from_dict({"a": 1})


def test_coerce_runs_before_init_and_on_a_copy():
    d = {"model": {"k": 1}, "pair": [3, 4], "inner": {"width": 8}}
    c = Outer.from_dict(d)
    assert c.pair == (3, 4) and c.inner == Inner(width=8)
    assert d == {"model": {"k": 1}, "pair": [3, 4], "inner": {"width": 8}}  # the caller's dict untouched
    with pytest.raises(ValueError, match=r"unknown inner setting\(s\) \['depth'\]"):
        Outer.from_dict({"model": {}, "inner": {"depth": 2}})
    with pytest.raises(ValueError, match=r"outer setting 'pair'=\(5, 4\): must be increasing"):
        Outer.from_dict({"model": {}, "pair": [5, 4]})


def test_type_errors_become_value_errors_naming_the_section_and_non_mappings_are_refused():
    with pytest.raises(ValueError, match=r"^outer settings: .*not supported"):
        Outer.from_dict({"model": {}, "pair": ["a", 1]})  # "a" > 1: TypeError in __post_init__
    with pytest.raises(ValueError, match=r"^outer settings must be a mapping, got list: \[1\]$"):
        Outer.from_dict([1])  # type: ignore[arg-type]


def test_to_dict_is_plain_and_round_trips():
    c = Outer(model={"k": (1, 2)}, pair=(1, 3), inner=Inner(width=2), calls=[(0, 1)])
    d = c.to_dict()
    assert d == {"model": {"k": [1, 2]}, "arch": "x", "pair": [1, 3], "inner": {"width": 2}, "calls": [[0, 1]]}
    assert isinstance(d["pair"], list) and isinstance(d["inner"], dict)
    d["model"]["k"].append(9)  # a copy: the config is not aliased
    assert c.model == {"k": (1, 2)}
    again = Outer.from_dict(Outer(model={}, pair=(2, 5)).to_dict())
    assert again == Outer(model={}, pair=(2, 5))
