"""Tiny DINO/DINOv2 settings: depth-2 ViT at 32 px (patch 8), 16 px locals, out_dim 64; the presets by name."""

from __future__ import annotations

import pytest
import torch

from fl_plugins.methods import DINOConfig
from fl_plugins.methods.dino_config import DINO_PRESET, DINOV2_PRESET
from fl_plugins.models.backbone import BackboneSpec

TINY_BACKBONE = BackboneSpec(img_size=32, patch_size=8, depth=2)
PRESETS = {"dino": DINO_PRESET, "dinov2": DINOV2_PRESET}


def tiny_config(preset: str | None = None, **overrides) -> DINOConfig:
    """A tiny config: the named preset (``"dino"`` / ``"dinov2"``; None: the class defaults, DINO's), then
    ``overrides``."""
    settings = dict(
        backbone=TINY_BACKBONE,
        local_crop_size=16,
        n_local_crops=2,
        batch_size=4,
        out_dim=64,
        hidden_dim=64,
        bottleneck_dim=32,
        total_steps=50,
    )
    settings.update(PRESETS[preset] if preset else {})
    settings.update(overrides)
    return DINOConfig(**settings)


def tiny_views(batch: int = 4, n_local: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 1, 32, 32, generator=g) for _ in range(2)] + [
        torch.randn(batch, 1, 16, 16, generator=g) for _ in range(n_local)
    ]


@pytest.fixture(autouse=True)
def _single_torch_thread():
    """One intra-op thread: tiny models on a shared 2-core box are much faster without OpenMP spin-waits."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
