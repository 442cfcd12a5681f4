"""Settings of the multi-crop training views of DINO / DINOv2 (no torch import: job building reads them).

The transforms that use them are in :mod:`fl_plugins.data.views` (its docstring has the table of every augmentation,
DINO's value [V] and the medical adaptation [R]).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["MultiCropConfig", "METHOD_OWNED_FIELDS", "VIEW_SETTING_FIELDS", "views_for_method"]

_SCALES = {
    "dino": ((0.4, 1.0), (0.05, 0.4)),  # DataAugmentationDINO [V]
    "dinov2": ((0.32, 1.0), (0.05, 0.32)),  # dinov2/data/augmentations.py [V]
}


@dataclass(frozen=True)
class MultiCropConfig:
    """Multi-crop settings; defaults are the CPU scale of methods-spec 9.3 with DINO's crop scales."""

    global_crop_size: int = 64  # 224 [V]; 64 [R]
    local_crop_size: int = 32  # 96 [V]; 32 [R]
    n_local_crops: int = 4  # 8 [V]; 4 [R]
    patch_size: int = 8  # crop sizes must be multiples of it
    global_crop_scale: tuple[float, float] = (0.4, 1.0)  # [V] DINO
    local_crop_scale: tuple[float, float] = (0.05, 0.4)  # [V] DINO
    hflip_prob: float = 0.5  # [V]
    intensity_prob: float = 0.8  # replaces ColorJitter's p = 0.8 [V]
    brightness: float = 0.2  # [R] shift in units of the image std
    contrast: float = 0.2  # [R] scale factor range about the mean
    gamma: tuple[float, float] = (0.7, 1.5)  # [R]
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # [V] pixels
    blur_probs: tuple[float, float, float] = (1.0, 0.1, 0.5)  # global-1, global-2, locals [V]
    noise_prob: float = 0.2  # [R]
    noise_std: float = 0.05  # [R] upper bound of the sampled std, image units
    solarize_prob: float = 0.0  # global-2 only; DINO 0.2 [V], off for MR [R]

    def __post_init__(self) -> None:
        for name in ("global_crop_size", "local_crop_size"):
            size = getattr(self, name)
            if self.patch_size <= 0 or size <= 0 or size % self.patch_size != 0:
                raise ValueError(f"{name}={size} must be a positive multiple of patch_size={self.patch_size}")
        if self.n_local_crops < 0:
            raise ValueError(f"n_local_crops must be >= 0, got {self.n_local_crops}")
        for name in ("global_crop_scale", "local_crop_scale", "gamma", "blur_sigma"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name}={getattr(self, name)} must satisfy 0 < min <= max")
        for name in ("global_crop_scale", "local_crop_scale"):
            if getattr(self, name)[1] > 1:
                raise ValueError(f"{name}={getattr(self, name)} must be within (0, 1]")
        probs = {
            "hflip_prob": self.hflip_prob,
            "intensity_prob": self.intensity_prob,
            "noise_prob": self.noise_prob,
            "solarize_prob": self.solarize_prob,
            **{f"blur_probs[{i}]": p for i, p in enumerate(self.blur_probs)},
        }
        for name, p in probs.items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name}={p} must be in [0, 1]")
        if min(self.brightness, self.contrast, self.noise_std) < 0:
            raise ValueError("brightness, contrast and noise_std must be >= 0")

    @classmethod
    def for_variant(cls, variant: str, **kwargs: Any) -> MultiCropConfig:
        """Config with the crop scales of ``variant`` ("dino" or "dinov2") and ``kwargs`` overrides."""
        if variant not in _SCALES:
            raise ValueError(f"variant={variant!r} is not one of {sorted(_SCALES)}")
        g, loc = _SCALES[variant]
        return cls(**{"global_crop_scale": g, "local_crop_scale": loc, **kwargs})


#: MultiCropConfig fields that follow the method's own settings (DINOConfig crop sizes, local crop count, ViT patch)
METHOD_OWNED_FIELDS = frozenset({"global_crop_size", "local_crop_size", "n_local_crops", "patch_size"})
#: the MultiCropConfig fields a job may set as ``views.<field>`` (augmentation strengths, probabilities, scales)
VIEW_SETTING_FIELDS = frozenset(f.name for f in fields(MultiCropConfig)) - METHOD_OWNED_FIELDS


def views_for_method(
    variant: str,
    global_crop_size: int,
    local_crop_size: int,
    n_local_crops: int,
    patch_size: int,
    settings: Mapping[str, Any] | None = None,
) -> MultiCropConfig:
    """The training views of a DINO/DINOv2 run: the variant's crop scales, the method's crop sizes, and ``settings``
    (job setting ``views``: any of :data:`VIEW_SETTING_FIELDS`; JSON lists become tuples).

    Raises ``ValueError`` naming ``views.<field>`` for a field that is unknown or owned by the method's settings,
    and ``ValueError("views settings: ...")`` for a value ``MultiCropConfig`` rejects.
    """
    settings = dict(settings or {})
    for k in settings:
        if k in METHOD_OWNED_FIELDS:
            raise ValueError(f"views.{k} is not a view setting: set dino.{k if k != 'patch_size' else 'backbone'} "
                             "instead")
        if k not in VIEW_SETTING_FIELDS:
            raise ValueError(f"unknown view setting views.{k}; known: {sorted(VIEW_SETTING_FIELDS)}")
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}
    try:
        return MultiCropConfig.for_variant(
            variant,
            global_crop_size=global_crop_size,
            local_crop_size=local_crop_size,
            n_local_crops=n_local_crops,
            patch_size=patch_size,
            **settings,
        )
    except (TypeError, ValueError) as e:  # e.g. a probability > 1, or a string where a number belongs
        raise ValueError(f"views settings: {e}") from e
