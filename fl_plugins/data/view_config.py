"""Settings of multi-crop training views (no torch import: job building reads them); method-neutral.

A method that trains on multi-crop views (DINO / DINOv2) owns the crop sizes, the local crop count and the ViT
patch (:data:`METHOD_OWNED_FIELDS`) and may give defaults for view settings (its crop scales); the job's view
settings (:data:`VIEW_SETTING_FIELDS`, ``views.<field>`` in a job) override those defaults. :func:`multicrop_views`
combines the two. Messages name the field only; the caller says where the settings came from.

The transforms that use them are in :mod:`fl_plugins.data.views` (its docstring has the table of every augmentation,
DINO's value [V] and the medical adaptation [R]).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["MultiCropConfig", "METHOD_OWNED_FIELDS", "VIEW_SETTING_FIELDS", "multicrop_views"]


@dataclass(frozen=True)
class MultiCropConfig:
    """Multi-crop settings; defaults are the CPU scale of methods-spec 9.3 with DINO's crop scales [V]
    (DINOv2's are global (0.32, 1), local (0.05, 0.32) [V]: a method passes its own, see
    :func:`multicrop_views`)."""

    global_crop_size: int = 64  # 224 [V]; 64 [R]
    local_crop_size: int = 32  # 96 [V]; 32 [R]
    n_local_crops: int = 4  # 8 [V]; 4 [R]
    patch_size: int = 8  # crop sizes must be multiples of it
    global_crop_scale: tuple[float, float] = (0.4, 1.0)  # [V] DINO DataAugmentationDINO
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


#: MultiCropConfig fields that follow the method's own settings (its crop sizes, local crop count and ViT patch)
METHOD_OWNED_FIELDS = frozenset({"global_crop_size", "local_crop_size", "n_local_crops", "patch_size"})
#: the MultiCropConfig fields a job may set as ``views.<field>`` (augmentation strengths, probabilities, crop scales)
#: -> the MultiCropConfig default (its type checks ``--set`` values; a method may default a field otherwise)
VIEW_SETTING_FIELDS: dict[str, Any] = {f.name: f.default for f in fields(MultiCropConfig)
                                       if f.name not in METHOD_OWNED_FIELDS}


def _plain_to_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value  # JSON lists are the config's tuples


def multicrop_views(method_views: Mapping[str, Any], settings: Mapping[str, Any] | None = None) -> MultiCropConfig:
    """The training views of a run: the method's own view values, then the job's view ``settings`` over them.

    Args:
        method_views: every field of :data:`METHOD_OWNED_FIELDS` (``global_crop_size``, ``local_crop_size``,
            ``n_local_crops``, ``patch_size``) and optionally defaults for view settings (e.g. the method's
            ``global_crop_scale`` / ``local_crop_scale``).
        settings: view settings (any of :data:`VIEW_SETTING_FIELDS`; JSON lists become tuples); they override
            the method's defaults of the same name.

    Raises:
        ValueError: naming the field: a method-owned field missing from ``method_views`` or given in ``settings``
            (with the method's value), an unknown field, or a value :class:`MultiCropConfig` rejects
            (``"view settings: noise_prob=2.0 must be in [0, 1]"``).
    """
    method_views = dict(method_views)
    missing = sorted(METHOD_OWNED_FIELDS - set(method_views))
    unknown = sorted(set(method_views) - METHOD_OWNED_FIELDS - set(VIEW_SETTING_FIELDS))
    if missing or unknown:
        raise ValueError(f"the method's view values must give every one of {sorted(METHOD_OWNED_FIELDS)} and only "
                         f"view settings besides; missing {missing}, unknown {unknown}")
    settings = dict(settings or {})
    for k in settings:
        if k in METHOD_OWNED_FIELDS:
            raise ValueError(f"{k!r} is not a view setting: the method sets it ({k}={method_views[k]!r}, from its "
                             "own settings)")
        if k not in VIEW_SETTING_FIELDS:
            raise ValueError(f"unknown view setting {k!r}; known: {sorted(VIEW_SETTING_FIELDS)}")
    values = {k: _plain_to_tuple(v) for k, v in {**method_views, **settings}.items()}
    try:
        return MultiCropConfig(**values)
    except (TypeError, ValueError) as e:  # e.g. a probability > 1, or a string where a number belongs
        raise ValueError(f"view settings: {e}") from e
