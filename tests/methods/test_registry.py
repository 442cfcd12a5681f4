"""The method registry (fl_plugins.methods.registry) and its table of built-in methods (fl_plugins.methods.builtin):
every row resolves, table rows are imported on first use only, bad rows and paths are named, re-registration rules."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import pytest

from fl_plugins.methods import build, get_spec, method_names, register_method, registry
from fl_plugins.methods.builtin import BUILTIN_METHODS, BuiltinMethod
from fl_plugins.methods.registry import register_table

MOD = "fake_table_plugin_for_registry_test"


@pytest.fixture
def fake_module():
    """A plugin module that is only importable (not yet imported): ``Toy`` built from ``ToyConfig``, ``make_toy``,
    ``toy_views``; the registry entries made by a test are removed afterwards."""

    @dataclass(frozen=True)
    class ToyConfig:
        width: int = 1

        @classmethod
        def from_dict(cls, d):
            return cls(**d)  # a TypeError for an unknown key: the registry names the section

    class Toy:
        def __init__(self, config):
            self.config = config

    mod = types.ModuleType(MOD)
    mod.ToyConfig, mod.Toy = ToyConfig, Toy
    mod.make_toy = lambda d: Toy(ToyConfig(width=10 * d.get("width", 1)))
    mod.toy_views = lambda config, settings: ("transform", config.width, settings)
    before = dict(registry._REGISTRY)

    class Finder:  # makes MOD importable and counts its imports
        imports = 0

        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name != MOD:
                return None
            import importlib.machinery

            cls.imports += 1
            return importlib.machinery.ModuleSpec(name, Loader())

    class Loader:
        def create_module(self, spec):
            return mod

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, Finder)
    try:
        yield Finder
    finally:
        sys.meta_path.remove(Finder)
        sys.modules.pop(MOD, None)
        registry._REGISTRY.clear()
        registry._REGISTRY.update(before)


def test_every_builtin_row_is_registered_and_resolves():
    assert set(BUILTIN_METHODS) <= set(method_names())
    for name, row in BUILTIN_METHODS.items():
        spec = get_spec(name)
        assert spec.description == row.description and spec.name == name
        method_cls = registry._resolve(row.builder, "builder") if isinstance(row.builder, str) else row.builder
        assert callable(method_cls)
        if row.config is not None:
            assert callable(registry._resolve(row.config, "config").from_dict)
        assert (spec.views is None) == (row.views is None)


def test_table_rows_are_imported_on_first_use_and_build(fake_module):
    register_table({
        "toy": BuiltinMethod(f"{MOD}:Toy", f"{MOD}:ToyConfig", "a toy", views=f"{MOD}:toy_views"),
        "toy_fn": BuiltinMethod(f"{MOD}:make_toy", None, "a toy from a function"),
    })
    assert fake_module.imports == 0 and MOD not in sys.modules  # registered, not imported
    toy = build("toy", {"width": 3})
    assert fake_module.imports == 1 and toy.config.width == 3
    assert get_spec("toy").views(toy.config, {"a": 1}) == ("transform", 3, {"a": 1})
    assert build("toy_fn", {"width": 2}).config.width == 20
    with pytest.raises(ValueError, match=r"^toy settings: .*'depth'"):  # the config's TypeError, named
        build("toy", {"depth": 1})


def test_reregistration_of_the_same_row_is_a_no_op_another_builder_is_refused(fake_module):
    row = {"toy": BuiltinMethod(f"{MOD}:Toy", f"{MOD}:ToyConfig", "a toy")}
    register_table(row)
    register_table(row)  # the same row again (a plugin module imported twice): no error
    with pytest.raises(ValueError, match=rf"method 'toy' is already registered by {MOD}:Toy; pass replace=True"):
        register_method("toy", lambda d: None)
    with pytest.raises(ValueError, match=r"method 'mae' is already registered by fl_plugins.methods.mae:MAEMethod"):
        register_table({"mae": BuiltinMethod(f"{MOD}:Toy", f"{MOD}:ToyConfig", "not mae")})


@pytest.mark.parametrize(("row", "match"), [
    (BuiltinMethod(f"{MOD}.Toy", None, "x"), r"method 'bad': builder 'fake_table_plugin_for_registry_test.Toy' must "
                                           r"be 'package.module:attribute'"),
    (BuiltinMethod("no_such_module_xyz:Toy", None, "x"), r"method 'bad': builder 'no_such_module_xyz:Toy': module "
                                                         r"'no_such_module_xyz' cannot be imported"),
    (BuiltinMethod(f"{MOD}:Toy", f"{MOD}:Missing", "x"), r"method 'bad': config '.*:Missing': '.*' has no "
                                                        r"attribute 'Missing'"),
])
def test_bad_paths_are_named_on_first_build(fake_module, row, match):
    register_table({"bad": row})
    with pytest.raises(ValueError, match=match):
        build("bad", {})


def test_bad_rows_are_refused_when_registered():
    with pytest.raises(ValueError, match=r"method table row 'bad' must be a BuiltinMethod, got \('a', 'b'\)"):
        register_table({"bad": ("a", "b")})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=r"method table row 'bad': config='m:C' needs a 'module:MethodClass' "
                                         r"builder string"):
        register_table({"bad": BuiltinMethod(lambda d: None, "m:C", "x")})
    assert "bad" not in method_names()
