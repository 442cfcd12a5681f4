"""Federated methods: each assembles ``fl_plugins.core`` parts, a network and a loss into one
:class:`~fl_plugins.engine.method.Method` with a declared state taxonomy, registered by name.

- :func:`build` / :func:`register_method` / :func:`method_names`: the registry (``fl_plugins.methods.registry``);
  the package's own methods are the rows of ``fl_plugins.methods.builtin.BUILTIN_METHODS`` (one row per method,
  imported on first use; ``builtin`` imports nothing from the registry).
- :class:`~fl_plugins.methods.dino.DINOMethod` / :class:`~fl_plugins.methods.dino_config.DINOConfig`:
  DINO and DINOv2 (federation modes A/B/C), registered as ``"dino"``.
- ``"finetune"``: :class:`~fl_plugins.engine.finetune.FinetuneMethod`.
"""

from fl_plugins.methods.dino import DINOMethod
from fl_plugins.methods.dino_config import DINOConfig
from fl_plugins.methods.registry import MethodSpec, build, get_spec, import_plugins, method_names, register_method

__all__ = ["DINOConfig", "DINOMethod", "MethodSpec", "build", "get_spec", "import_plugins", "method_names",
           "register_method"]
