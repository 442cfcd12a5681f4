"""The registered task handlers, by the name a job gives its executor (``HandlerExecutor(handler=<name>)``).

A name, not a class path, so that a job cannot make a site instantiate an arbitrary class through executor
arguments (the site's ``class_allow_list`` checks class paths, not strings inside arguments).

Compatibility path (:data:`HANDLER_ALIASES`): a name that an older job folder may still give, with the function
that rewrites its old ``handler_args`` for the handler that replaced it. ``"dino"`` (the DINO-only handler, removed)
is the generic ``ssl`` handler of the registered method ``"dino"``: the old arguments ``{"dino": {...},
"steps_per_round", "total_rounds", "knn_every", "knn_max_items", "num_workers", "views"}`` become
``SSLHandler(method="dino", config={"total_steps": None, **dino}, spatial_dims=2, ...)`` (a ``total_steps`` left
unset is the job's step horizon, as before). :func:`handler_class` resolves an alias to a class whose
construction builds the target handler from the rewritten arguments.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["HANDLERS", "HANDLER_ALIASES", "handler_class", "handler_names", "translate_handler_args"]

#: handler name -> "module:Class" (imported on use, so listing them stays light)
HANDLERS: dict[str, str] = {
    "finetune": "fl_plugins.flare.finetune_handler:FinetuneHandler",
    "ssl": "fl_plugins.flare.ssl_handler:SSLHandler",
    "stagewise": "fl_plugins.flare.stage_handler:StagewiseHandler",
    "fcl": "fl_plugins.flare.fcl_handler:FCLHandler",
    "fclopt": "fl_plugins.flare.fclopt_handler:FCLOptHandler",
}

#: the arguments the removed DINO-only handler took besides the site (its signature)
_OLD_DINO_ARGS = ("dino", "steps_per_round", "total_rounds", "knn_every", "knn_max_items", "num_workers", "views")


def _old_dino_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """Old ``handler="dino"`` arguments -> the ``ssl`` handler's (method ``"dino"``, 2D images)."""
    unknown = sorted(set(args) - set(_OLD_DINO_ARGS))
    if unknown:
        raise ValueError(f"task handler 'dino' (alias of 'ssl' with method 'dino'): unknown argument(s) {unknown}; "
                         f"known: {sorted(_OLD_DINO_ARGS)}")
    if "dino" not in args:
        raise ValueError("task handler 'dino' (alias of 'ssl' with method 'dino'): needs the argument 'dino' (the "
                         "DINO settings)")
    out = {k: v for k, v in args.items() if k != "dino"}
    return {"method": "dino", "config": {"total_steps": None, **dict(args["dino"])}, "spatial_dims": 2, **out}


#: old handler name -> (the handler that replaced it, old handler_args -> its handler_args); see the module doc
HANDLER_ALIASES: dict[str, tuple[str, Callable[[Mapping[str, Any]], dict[str, Any]]]] = {
    "dino": ("ssl", _old_dino_args),
}


def handler_names() -> list[str]:
    """Every name a job may give: the registered handlers and the aliases of the compatibility path."""
    return sorted({*HANDLERS, *HANDLER_ALIASES})


def translate_handler_args(name: str, args: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(handler name, handler_args)`` of a job -> the registered handler that runs and its arguments (an alias
    rewritten, any other name unchanged)."""
    if name in HANDLER_ALIASES:
        target, translate = HANDLER_ALIASES[name]
        return target, translate(args)
    return name, dict(args)


def handler_class(name: str) -> type:
    """The handler class registered as ``name``; for an alias (:data:`HANDLER_ALIASES`) a class with the target's
    ``TASKS`` whose construction ``cls(site, **old_args)`` returns the target handler built from the rewritten
    arguments."""
    if name in HANDLER_ALIASES:
        target_name, _ = HANDLER_ALIASES[name]
        target = handler_class(target_name)

        def build(cls: type, site: Any, **args: Any) -> Any:
            _, new_args = translate_handler_args(name, args)
            return target(site, **new_args)

        return type(f"{target.__name__}Alias_{name}", (), {
            "__new__": build, "TASKS": target.TASKS,
            "__doc__": f"Compatibility alias {name!r}: builds {target.__name__} ({target_name!r}) from the old "
                       f"arguments (fl_plugins.flare.handlers.HANDLER_ALIASES).",
        })
    if name not in HANDLERS:
        raise ValueError(f"unknown task handler {name!r}; registered: {handler_names()}")
    module, _, cls = HANDLERS[name].partition(":")
    return getattr(importlib.import_module(module), cls)
