"""Multi-crop views (DINO / DINOv2) on 1-channel medical images (methods-spec 2.2 / 3.2).

Per image ``[C, S, S]`` (C = 1 for MR/CT/X-ray slices): 2 global crops + ``L`` local crops, each
``RandomResizedCrop`` (bicubic, antialiased) + horizontal flip, then photometric augmentation that is valid for
any intensity range (z-scored MR, windowed CT, [0, 1] images; nothing clamps to [0, 1]):

=====================  ==================================================================================
DINO [V]               here [R] (medical adaptation, methods-spec 2.2)
=====================  ==================================================================================
ColorJitter(0.4, 0.4,  p = 0.8: brightness shift U(-b, b) x image std, contrast scale U(1-c, 1+c) about the
0.2, 0.1) p = 0.8      mean, gamma U(0.7, 1.5) on the min-max range (MONAI ``RandStdShiftIntensity``,
                       ``RandScaleIntensityFixedMean``, ``RandAdjustContrast``); no hue/saturation
grayscale p = 0.2      -- (1 channel)
Gaussian blur          same probabilities: global-1 p = 1.0, global-2 p = 0.1, locals p = 0.5, isotropic
sigma U(0.1, 2.0)      sigma U(0.1, 2.0) px (torchvision ``GaussianBlur``)
solarize p = 0.2 (g2)  off by default (``solarize_prob``; threshold 0.5, only meaningful for [0, 1] images)
ImageNet mean/std      none: intensity normalisation is the data layer's modality preset (contracts.md)
--                     Gaussian noise, p = 0.2, std U(0, 0.05) in image units (MONAI ``RandGaussianNoise``)
=====================  ==================================================================================

Crop scales: DINO global (0.4, 1), local (0.05, 0.4); DINOv2 global (0.32, 1), local (0.05, 0.32) [V]: settings
(``global_crop_scale`` / ``local_crop_scale``) whose defaults the method gives
(:func:`fl_plugins.data.view_config.multicrop_views`). Crop sizes must be multiples of the ViT patch size.

Randomness: torchvision draws from torch's global RNG; the MONAI transforms are re-seeded from it on every
call, so ``torch.manual_seed`` (and DataLoader's per-worker seeding) make the views reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandGaussianNoise,
    RandScaleIntensityFixedMean,
    RandStdShiftIntensity,
)
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

from fl_plugins.data.view_config import MultiCropConfig  # the settings of these transforms

__all__ = ["MultiCropConfig", "MultiCropTransform", "MultiCropDataset", "multicrop_collate"]


def _blur_kernel_size(sigma_max: float, crop_size: int) -> int:
    k = 2 * math.ceil(3.0 * sigma_max) + 1  # +-3 sigma
    return max(3, min(k, 2 * crop_size - 1) | 1)  # odd; reflect padding needs k // 2 < size


class MultiCropTransform:
    """``[C, S, S]`` float tensor -> ``[global_1, global_2, local_1, ..., local_L]`` (``[C, G, G]``/``[C, s, s]``)."""

    def __init__(self, config: MultiCropConfig | None = None) -> None:
        self.config = cfg = config or MultiCropConfig()
        bicubic = v2.InterpolationMode.BICUBIC

        def geometric(size: int, scale: tuple[float, float]) -> v2.Compose:
            return v2.Compose(
                [
                    v2.RandomResizedCrop(size, scale=scale, interpolation=bicubic, antialias=True),
                    v2.RandomHorizontalFlip(cfg.hflip_prob),
                ]
            )

        self._global_geo = geometric(cfg.global_crop_size, cfg.global_crop_scale)
        self._local_geo = geometric(cfg.local_crop_size, cfg.local_crop_scale)
        self._global_blur = v2.GaussianBlur(_blur_kernel_size(cfg.blur_sigma[1], cfg.global_crop_size), cfg.blur_sigma)
        self._local_blur = v2.GaussianBlur(_blur_kernel_size(cfg.blur_sigma[1], cfg.local_crop_size), cfg.blur_sigma)
        self._intensity = Compose(
            [
                RandStdShiftIntensity(factors=cfg.brightness, prob=1.0),
                RandScaleIntensityFixedMean(prob=1.0, factors=cfg.contrast),
                RandAdjustContrast(prob=1.0, gamma=cfg.gamma),
            ]
        )
        self._noise = RandGaussianNoise(prob=1.0, std=cfg.noise_std, sample_std=True)
        self._monai = Compose([self._intensity, self._noise])
        self._solarize = v2.RandomSolarize(threshold=0.5, p=1.0)

    @staticmethod
    def _coin(p: float) -> bool:
        return p >= 1.0 or (p > 0.0 and float(torch.rand(())) < p)

    def _photometric(self, x: Tensor, blur: v2.GaussianBlur, blur_p: float, solarize_p: float) -> Tensor:
        cfg = self.config
        if self._coin(cfg.intensity_prob):
            x = self._intensity(x)
        if self._coin(blur_p):
            x = blur(x)
        if self._coin(cfg.noise_prob):
            x = self._noise(x)
        if self._coin(solarize_p):
            x = self._solarize(x)
        return torch.as_tensor(x).as_subclass(Tensor).to(torch.float32).contiguous()

    def __call__(self, image: Tensor) -> list[Tensor]:
        if not isinstance(image, Tensor) or image.dim() != 3:
            raise ValueError(f"expected an image tensor [C, S, S], got {getattr(image, 'shape', type(image))}")
        cfg = self.config
        image = image.as_subclass(Tensor).float()
        self._monai.set_random_state(seed=int(torch.randint(0, 2**31 - 1, ())))  # MONAI follows torch's RNG
        g1_p, g2_p, local_p = cfg.blur_probs
        views = [
            self._photometric(self._global_geo(image), self._global_blur, g1_p, 0.0),
            self._photometric(self._global_geo(image), self._global_blur, g2_p, cfg.solarize_prob),
        ]
        views += [
            self._photometric(self._local_geo(image), self._local_blur, local_p, 0.0) for _ in range(cfg.n_local_crops)
        ]
        return views


class MultiCropDataset(Dataset):
    """Wrap a dataset of items ``{"image": [C, S, S], ...}`` (docs/contracts.md) to yield multi-crop views."""

    def __init__(self, base: Sequence[Any], transform: MultiCropTransform) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> list[Tensor]:
        item = self.base[index]
        return self.transform(item["image"] if isinstance(item, dict) else item)


def multicrop_collate(batch: Sequence[Sequence[Tensor]]) -> list[Tensor]:
    """``B`` samples of ``V`` views -> ``V`` tensors ``[B, C, H_v, W_v]`` (view order kept)."""
    if not batch:
        raise ValueError("empty batch")
    n_views = len(batch[0])
    if any(len(sample) != n_views for sample in batch):
        raise ValueError("all samples must have the same number of views")
    return [torch.stack([sample[v] for sample in batch]) for v in range(n_views)]
