"""A method defined outside the package: predict which of 4 rotations was applied to an image (RotNet-style toy).

It registers itself through the public registry on import; nothing under ``fl_plugins/`` knows it. State taxonomy:
``encoder.*`` federated, ``head.*`` kept on the site (a per-site head, never averaged), nothing rebuilt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fl_plugins.engine.method import MethodBase
from fl_plugins.methods import register_method


@dataclass(frozen=True)
class RotationConfig:
    image_size: int = 32
    batch_size: int = 8
    lr: float = 1e-3
    width: int = 8
    seed: int = 0


class RotationMethod(MethodBase):
    site_regex = r"^head\."

    def __init__(self, config: RotationConfig) -> None:
        super().__init__(config)
        w = config.width
        self.encoder = nn.Sequential(nn.Conv2d(1, w, 3, stride=2, padding=1), nn.ReLU(),
                                     nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * w, 4)

    def training_step(self, batch: dict, global_step: int, rng: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        x = batch["image"]  # [B, 1, H, W]
        k = torch.randint(0, 4, (x.shape[0],), generator=rng)
        rotated = torch.stack([torch.rot90(img, int(r), dims=(-2, -1)) for img, r in zip(x, k)])
        loss = nn.functional.cross_entropy(self.head(self.encoder(rotated)), k)
        return loss, {"loss": float(loss.detach())}

    def backbone(self) -> nn.Module:
        return self.encoder


def _build(config: dict) -> RotationMethod:
    return RotationMethod(RotationConfig(**config))


register_method("rotation", _build, description="toy: predict the rotation (test plugin)")
