"""The method registry: ``register_method(name, ...)`` once, then ``build(name, config)`` anywhere.

A registered method names a builder (config dict -> :class:`~fl_plugins.engine.method.Method`) and, optionally,
how its training batches are made from the site's images (``views``: ``(config, view_settings) -> (transform,
collate)``; default: the image itself, batched as ``{"image": [B, C, H, W]}``). Methods defined outside the package
register the same way (see ``tests/plugins/rotation_method.py``); the site must import their module first, which
the FLARE executor and the ``custom/`` client script do for every module the job lists under ``imports``.

The package's own methods are the rows of :data:`fl_plugins.methods.builtin.BUILTIN_METHODS`, registered when this
module is imported; their classes are imported on first use (a ``"module:attribute"`` string of the row). The
import goes one way only: ``builtin`` imports nothing from here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fl_plugins.engine.method import Method
from fl_plugins.methods.builtin import BUILTIN_METHODS, BuiltinMethod

__all__ = ["MethodSpec", "register_method", "register_table", "build", "get_spec", "method_names", "import_plugins"]

ViewsFactory = Callable[[Any, dict[str, Any]], tuple[Callable[[Any], Any], Callable[[list[Any]], Any] | None]]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    Attributes:
        name: registry name (``--set method=...``, job settings).
        builder: config dict -> method (validates the config; errors name the setting and value).
        views: optional ``(method.config, view_settings) -> (per-image transform, collate_fn)``.
        description: one line for listings.
    """

    name: str
    builder: Callable[[dict[str, Any]], Method]
    views: ViewsFactory | None = None
    description: str = ""


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    builder: Callable[[dict[str, Any]], Method],
    *,
    views: ViewsFactory | None = None,
    description: str = "",
    replace: bool = False,
) -> MethodSpec:
    """Register ``builder`` under ``name``; re-registering the same builder is a no-op, another one needs
    ``replace=True`` (so two plugins cannot silently shadow each other)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"method name must be an identifier, got {name!r}")
    spec = MethodSpec(name=name, builder=builder, views=views, description=description)
    old = _REGISTRY.get(name)
    if old is not None and not replace and not (_same_code(old.builder, builder) and _same_code(old.views, views)):
        raise ValueError(f"method {name!r} is already registered by {_origin(old.builder)}; pass replace=True")
    _REGISTRY[name] = spec
    return spec


def _same_code(a: Any, b: Any) -> bool:
    """The same function, also when its module was imported twice under two names (a plugin file shipped in a
    job's custom folder and imported from a package path too); equal lazy builders (the same table row) too."""
    if a is b or (isinstance(a, (_LazyBuilder, _LazyViews)) and a == b):
        return True
    ca, cb = getattr(a, "__code__", None), getattr(b, "__code__", None)
    return (ca is not None and cb is not None and ca.co_filename == cb.co_filename
            and a.__qualname__ == b.__qualname__)


def _origin(builder: Any) -> str:
    """Where a builder comes from, for messages: its module (a table builder: its ``"module:attribute"``)."""
    if isinstance(builder, _LazyBuilder):
        return builder.method
    return str(getattr(builder, "__module__", type(builder).__module__))


def _resolve(path: str, what: str) -> Any:
    """The attribute named by ``"package.module:attribute"`` (imported now); ``ValueError`` naming ``what`` and
    ``path`` when the module or the attribute is missing."""
    module, sep, attr = path.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"{what} {path!r} must be 'package.module:attribute'")
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"{what} {path!r}: module {module!r} cannot be imported: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {path!r}: {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class _LazyBuilder:
    """Builder of a table row: ``Method(Config.from_dict(d))`` with ``method`` / ``config`` imported on the first call
    (``config`` None: ``method`` names a function config dict -> method)."""

    name: str
    method: str
    config: str | None = None

    def __call__(self, d: dict[str, Any]) -> Method:
        method_cls = _resolve(self.method, f"method {self.name!r}: builder")
        if self.config is None:
            return method_cls(d)
        config_cls = _resolve(self.config, f"method {self.name!r}: config")
        try:
            config = config_cls.from_dict(dict(d))
        except TypeError as e:  # a config without StrictConfig's own conversion: name the section
            raise ValueError(f"{self.name} settings: {e}") from e
        return method_cls(config)


@dataclass(frozen=True)
class _LazyViews:
    """Views factory named by ``"module:function"``, imported on the first call."""

    name: str
    path: str

    def __call__(self, config: Any, settings: dict[str, Any]) -> Any:
        return _resolve(self.path, f"method {self.name!r}: views")(config, settings)


def register_table(table: Mapping[str, BuiltinMethod]) -> list[MethodSpec]:
    """Register every row of ``table`` (name -> :class:`~fl_plugins.methods.builtin.BuiltinMethod`) with
    :func:`register_method`; strings are imported on first use, callables used as they are."""
    specs = []
    for name, row in table.items():
        if not isinstance(row, BuiltinMethod):
            raise ValueError(f"method table row {name!r} must be a BuiltinMethod, got {row!r}")
        if isinstance(row.builder, str):
            builder: Callable[[dict[str, Any]], Method] = _LazyBuilder(name, row.builder, row.config)
        elif row.config is None:
            builder = row.builder
        else:
            raise ValueError(f"method table row {name!r}: config={row.config!r} needs a 'module:MethodClass' "
                             f"builder string, got {row.builder!r}")
        views = _LazyViews(name, row.views) if isinstance(row.views, str) else row.views
        specs.append(register_method(name, builder, views=views, description=row.description))
    return specs


def method_names() -> list[str]:
    """The registered names, sorted (the package's own and every imported plugin's)."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> MethodSpec:
    """The :class:`MethodSpec` registered under ``name``; ``ValueError`` naming the registered ones otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; registered: {sorted(_REGISTRY)} (a plugin's module must be "
                         "imported first: list it in the job's 'imports')")
    return _REGISTRY[name]


def build(name: str, config: dict[str, Any] | None = None) -> Method:
    """Build the registered method ``name`` from its config dict."""
    return get_spec(name).builder(dict(config or {}))


def import_plugins(modules: Iterable[str]) -> None:
    """Import each plugin module (it registers its methods); a missing module is named with the site's hint."""
    for mod in modules:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise ValueError(f"plugin module {mod!r} (job setting 'imports') cannot be imported on this site: {e}. "
                             "Ship it in the job's custom code or install it on the site.") from e


register_table(BUILTIN_METHODS)  # the package's own methods (classes imported on first use)
