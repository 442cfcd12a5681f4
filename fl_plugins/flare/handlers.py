"""The registered task handlers, by the name a job gives its executor (``HandlerExecutor(handler=<name>)``).

A name, not a class path, so that a job cannot make a site instantiate an arbitrary class through executor
arguments (the site's ``class_allow_list`` checks class paths, not strings inside arguments).
"""

from __future__ import annotations

import importlib

__all__ = ["HANDLERS", "handler_class", "handler_names"]

#: handler name -> "module:Class" (imported on use, so listing them stays light)
HANDLERS: dict[str, str] = {
    "finetune": "fl_plugins.flare.finetune_handler:FinetuneHandler",
    "ssl": "fl_plugins.flare.ssl_handler:SSLHandler",
    "dino": "fl_plugins.flare.ssl_handler:DinoHandler",
    "stagewise": "fl_plugins.flare.stage_handler:StagewiseHandler",
    "fcl": "fl_plugins.flare.fcl_handler:FCLHandler",
    "fclopt": "fl_plugins.flare.fclopt_handler:FCLOptHandler",
}


def handler_names() -> list[str]:
    return sorted(HANDLERS)


def handler_class(name: str) -> type:
    """The handler class registered as ``name``."""
    if name not in HANDLERS:
        raise ValueError(f"unknown task handler {name!r}; registered: {handler_names()}")
    module, _, cls = HANDLERS[name].partition(":")
    return getattr(importlib.import_module(module), cls)
