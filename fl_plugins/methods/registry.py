"""The method registry: ``register_method(name, ...)`` once, then ``build(name, config)`` anywhere.

A registered method names a builder (config dict -> :class:`~fl_plugins.engine.method.Method`) and, optionally,
how its training batches are made from the site's images (``views``: ``(config, view_settings) -> (transform,
collate)``; default: the image itself, batched as ``{"image": [B, C, H, W]}``). Methods defined outside the package
register the same way (see ``tests/plugins/rotation_method.py``); the site must import their module first, which
the FLARE executor and the ``custom/`` client script do for every module the job lists under ``imports``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from fl_plugins.engine.method import Method

__all__ = ["MethodSpec", "register_method", "build", "get_spec", "method_names", "import_plugins"]

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
        raise ValueError(f"method {name!r} is already registered by {old.builder.__module__}; pass replace=True")
    _REGISTRY[name] = spec
    return spec


def _same_code(a: Any, b: Any) -> bool:
    """The same function, also when its module was imported twice under two names (a plugin file shipped in a
    job's custom folder and imported from a package path too)."""
    if a is b:
        return True
    ca, cb = getattr(a, "__code__", None), getattr(b, "__code__", None)
    return (ca is not None and cb is not None and ca.co_filename == cb.co_filename
            and a.__qualname__ == b.__qualname__)


def _ensure_builtin() -> None:
    import fl_plugins.methods.builtin  # noqa: F401  (registers the package's own methods)


def method_names() -> list[str]:
    _ensure_builtin()
    return sorted(_REGISTRY)


def get_spec(name: str) -> MethodSpec:
    _ensure_builtin()
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
