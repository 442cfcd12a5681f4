"""SSL methods: assemble backbone + head + losses from ``fl_plugins.core`` and declare the state taxonomy.

- :class:`~fl_plugins.methods.dino.DINOMethod` / :class:`~fl_plugins.methods.dino_config.DINOConfig`:
  DINO and DINOv2 (federation modes A/B/C).
"""

from fl_plugins.methods.dino import DINOMethod
from fl_plugins.methods.dino_config import DINOConfig

__all__ = ["DINOConfig", "DINOMethod"]
