"""Configuration of the DINO / DINOv2 method (validated eagerly; every default cites its source).

Tags as in methods-spec 0.1: [V] from the official code, [R] project default for the 2-core CPU scale
(methods-spec 9.3). Variant-dependent settings default to ``None`` and are resolved in ``__post_init__``
(so a stored config always holds concrete values and ``from_dict(to_dict())`` round-trips).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from fl_plugins.core.schedules import cosine_schedule, cosine_with_warmup, linear_warmup_then_constant
from fl_plugins.data.view_config import MultiCropConfig, views_for_method
from fl_plugins.models.backbone import BackboneSpec

__all__ = ["DINOConfig", "MIN_OUT_DIM"]

Variant = Literal["dino", "dinov2"]
Centering = Literal["centering", "sinkhorn_knopp"]
FederationMode = Literal["A", "B", "C"]
TeacherInit = Literal["copy_global", "keep_local"]

# [R] Fewer prototypes than this make the DINO targets nearly one-hot over a handful of classes and the head
# collapses easily; the CPU setting of methods-spec 9.3 uses K = 1024. Sinkhorn-Knopp additionally needs
# out_dim >= the number of rows it equipartitions (2 * batch_size global crops): with fewer prototypes than
# samples the "each prototype gets 1/K of the mass" constraint forces many samples onto identical targets.
MIN_OUT_DIM = 16

_VARIANT_DEFAULTS: dict[str, dict[str, Any]] = {
    # DINO main_dino.py defaults [V]; teacher_temp 0.04 (code default; README "boost" uses 0.07 w/ warm-up)
    "dino": {
        "teacher_temp": 0.04,
        "momentum_teacher": 0.996,
        "norm_last_layer": True,
        "koleo_weight": 0.0,
        "ibot_weight": 0.0,
        "warmup_teacher_temp_frac": 0.0,
    },
    # DINOv2 ssl_default_config.yaml [V]: tau_t 0.04 -> 0.07 over 30 of 100 epochs, momentum 0.992 -> 1,
    # last layer not weight-norm-frozen, koleo 0.1, ibot 1.0
    "dinov2": {
        "teacher_temp": 0.07,
        "momentum_teacher": 0.992,
        "norm_last_layer": False,
        "koleo_weight": 0.1,
        "ibot_weight": 1.0,
        "warmup_teacher_temp_frac": 0.3,
    },
}


def _one_of(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {list(allowed)}")


@dataclass(frozen=True)
class DINOConfig:
    """DINO (``variant="dino"``) or DINOv2 (``variant="dinov2"``) pretraining settings.

    Step counts are GLOBAL optimiser steps (``round * local_steps + t``), owned by the server.
    """

    variant: Variant = "dino"
    backbone: BackboneSpec = field(default_factory=BackboneSpec)  # [R] ViT-tiny/8 at 64 px (spec 9.3)
    # views: the method validates them and sizes the iBOT masks with them
    global_crop_size: int | None = None  # None -> backbone.img_size (224 [V]; 64 [R])
    local_crop_size: int = 32  # 96 [V]; 32 [R] (spec 9.3)
    n_local_crops: int = 4  # 8 [V]; 4 [R] (spec 9.3)
    batch_size: int = 16  # local batch per step; LR scaling rule and KoLeo/SK checks (64/GPU [V])
    # head
    out_dim: int = 1024  # K = 65536 [V]; 1024 on CPU [R] (spec 2.7, 9.3)
    hidden_dim: int = 2048  # [V]
    bottleneck_dim: int = 256  # [V]
    norm_last_layer: bool | None = None  # None -> True (dino) / False (dinov2) [V]
    # temperatures
    student_temp: float = 0.1  # [V]
    teacher_temp: float | None = None  # None -> 0.04 (dino) / 0.07 (dinov2) [V]; > 0.07 unstable (DINO help)
    warmup_teacher_temp: float = 0.04  # [V]
    warmup_teacher_temp_steps: int | None = None  # None -> 0 (dino) / 30 % of total_steps (dinov2, 30/100 ep) [V]
    # teacher and targets
    momentum_teacher: float | None = None  # None -> 0.996 (dino) / 0.992 (dinov2) [V], cosine to the end value
    momentum_teacher_end: float = 1.0  # [V]
    centering: Centering = "centering"  # [V] default; "sinkhorn_knopp" as in DINOv2 vitl14 [V]
    center_momentum: float = 0.9  # [V]
    sinkhorn_iterations: int = 3  # [V]
    # DINOv2 terms
    koleo_weight: float | None = None  # None -> 0 (dino) / 0.1 (dinov2) [V]
    ibot_weight: float | None = None  # None -> 0 (dino) / 1.0 (dinov2) [V]; iBOT shares the DINO head [V]
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)  # [V]
    mask_sample_probability: float = 0.5  # [V]
    # optimisation (AdamW)
    total_steps: int = 1000  # schedule horizon = rounds * local steps [R]
    lr: float | None = None  # None -> 5e-4 * batch/256 (dino) / 4e-3 * sqrt(batch/1024) (dinov2) [V]
    min_lr: float = 1e-6  # [V]
    warmup_steps: int | None = None  # None -> 10 % of total_steps (10 of 100 epochs) [V]
    weight_decay: float = 0.04  # cosine 0.04 -> 0.4 [V]
    weight_decay_end: float = 0.4  # [V]
    clip_grad: float = 3.0  # [V]; 0 disables
    freeze_last_layer_steps: int | None = None  # None -> 1 % of total_steps (1 of 100 epochs) [V]
    # federation (methods-spec 2.7 / 3.6)
    federation_mode: FederationMode = "A"  # [R] default A
    teacher_init: TeacherInit = "copy_global"  # mode B only [R]
    seed: int = 0  # iBOT masks are a pure function of (seed, global_step); give sites different seeds

    def __post_init__(self) -> None:
        _one_of("variant", self.variant, ("dino", "dinov2"))
        if isinstance(self.backbone, dict):
            object.__setattr__(self, "backbone", BackboneSpec.from_dict(self.backbone))
        if not isinstance(self.backbone, BackboneSpec):
            raise ValueError(f"backbone must be a BackboneSpec or dict, got {type(self.backbone).__name__}")
        defaults = _VARIANT_DEFAULTS[self.variant]
        resolved: dict[str, Any] = {}
        for name in ("teacher_temp", "momentum_teacher", "norm_last_layer", "koleo_weight", "ibot_weight"):
            if getattr(self, name) is None:
                resolved[name] = defaults[name]
        if self.global_crop_size is None:
            resolved["global_crop_size"] = self.backbone.img_size
        if self.warmup_teacher_temp_steps is None:
            resolved["warmup_teacher_temp_steps"] = int(defaults["warmup_teacher_temp_frac"] * self.total_steps)
        if self.warmup_steps is None:
            resolved["warmup_steps"] = self.total_steps // 10
        if self.freeze_last_layer_steps is None:
            resolved["freeze_last_layer_steps"] = self.total_steps // 100
        if self.lr is None and self.batch_size >= 1:
            resolved["lr"] = (
                5e-4 * self.batch_size / 256 if self.variant == "dino" else 4e-3 * math.sqrt(self.batch_size / 1024)
            )
        object.__setattr__(self, "mask_ratio_min_max", tuple(self.mask_ratio_min_max))
        for name, value in resolved.items():
            object.__setattr__(self, name, value)
        self._validate()

    def _validate(self) -> None:
        patch = self.backbone.patch_size
        for name in ("global_crop_size", "local_crop_size"):
            size = getattr(self, name)
            if size <= 0 or size % patch != 0:
                raise ValueError(f"{name}={size} must be a positive multiple of the backbone patch_size={patch}")
        for name in ("n_local_crops", "warmup_teacher_temp_steps", "warmup_steps", "freeze_last_layer_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "total_steps", "hidden_dim", "bottleneck_dim", "sinkhorn_iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps > self.total_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be <= total_steps={self.total_steps}")
        if self.out_dim < MIN_OUT_DIM:
            raise ValueError(
                f"out_dim={self.out_dim} is too small: use at least {MIN_OUT_DIM} prototypes (1024 on CPU)"
            )
        _one_of("centering", self.centering, ("centering", "sinkhorn_knopp"))
        if self.centering == "sinkhorn_knopp" and self.out_dim < 2 * self.batch_size:
            raise ValueError(
                f"out_dim={self.out_dim} is smaller than the {2 * self.batch_size} global crops per batch "
                f"(2 * batch_size={self.batch_size}) that Sinkhorn-Knopp equipartitions; raise out_dim"
            )
        for name in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("momentum_teacher", "momentum_teacher_end", "center_momentum", "mask_sample_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        r_min, r_max = self.mask_ratio_min_max
        if not 0.0 <= r_min <= r_max <= 1.0:
            raise ValueError(f"mask_ratio_min_max={self.mask_ratio_min_max} must satisfy 0 <= min <= max <= 1")
        for name in ("koleo_weight", "ibot_weight", "lr", "min_lr", "weight_decay", "weight_decay_end", "clip_grad"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.variant == "dino":
            for name in ("koleo_weight", "ibot_weight"):
                if getattr(self, name) > 0:
                    raise ValueError(f"{name}={getattr(self, name)} needs variant='dinov2' (DINO has no such term)")
        if self.koleo_weight > 0 and self.batch_size < 2:
            raise ValueError(
                f"batch_size={self.batch_size} with koleo_weight={self.koleo_weight}: KoLeo needs >= 2 samples per "
                "global crop (nearest neighbour); use batch_size >= 2 or koleo_weight=0"
            )
        _one_of("federation_mode", self.federation_mode, ("A", "B", "C"))
        _one_of("teacher_init", self.teacher_init, ("copy_global", "keep_local"))

    # ---- schedules: pure functions of the global step ---------------------------------------------------------
    def lr_at(self, step: int) -> float:
        """Linear warm-up 0 -> ``lr`` over ``warmup_steps``, cosine to ``min_lr`` at ``total_steps`` [V]."""
        return cosine_with_warmup(step, self.total_steps, self.warmup_steps, self.lr, self.min_lr)

    def weight_decay_at(self, step: int) -> float:
        """Cosine ``weight_decay -> weight_decay_end`` over ``total_steps`` [V]."""
        return cosine_schedule(step, self.total_steps, self.weight_decay, self.weight_decay_end)

    def training_views(self, settings: dict[str, Any] | None = None) -> MultiCropConfig:
        """The multi-crop views of this run: the variant's crop scales, these crop sizes and the backbone's patch,
        plus the job's ``views`` augmentation ``settings`` (:func:`fl_plugins.data.view_config.views_for_method`)."""
        return views_for_method(self.variant, self.global_crop_size, self.local_crop_size, self.n_local_crops,
                                self.backbone.patch_size, settings)

    def teacher_temp_at(self, step: int) -> float:
        """Linear ``warmup_teacher_temp -> teacher_temp`` over ``warmup_teacher_temp_steps``, then constant [V]."""
        return linear_warmup_then_constant(
            step, self.warmup_teacher_temp_steps, self.warmup_teacher_temp, self.teacher_temp
        )

    def teacher_momentum_at(self, step: int) -> float:
        """Cosine ``momentum_teacher -> momentum_teacher_end`` over ``total_steps`` [V]."""
        return cosine_schedule(step, self.total_steps, self.momentum_teacher, self.momentum_teacher_end)

    # ---- (de)serialisation -------------------------------------------------------------------------------------
    @property
    def uses_ibot(self) -> bool:
        return self.variant == "dinov2" and self.ibot_weight > 0

    @property
    def patch_grid(self) -> tuple[int, int]:
        """``(h, w)`` patches of a global crop (the iBOT mask shape)."""
        n = self.global_crop_size // self.backbone.patch_size
        return (n, n)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["backbone"] = self.backbone.to_dict()
        d["mask_ratio_min_max"] = list(self.mask_ratio_min_max)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DINOConfig:
        """Build from a plain dict (job config); unknown keys raise ``ValueError`` listing the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown DINO setting(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)
