"""Configuration of the DINO / DINOv2 method (validated eagerly; every default cites its source).

Tags as in methods-spec 0.1: [V] from the official code, [R] project default for the 2-core CPU scale
(methods-spec 9.3). Which loss terms exist is a setting, as in DINOv2 [V]: ``dino_weight`` (image-level DINO on
the CLS tokens), ``ibot_weight`` (patch-level iBOT on masked global crops; with it the mask token and the iBOT
centre exist) and ``koleo_weight`` (KoLeo on the student's global CLS). DINO and DINOv2 are two presets of the
same settings, :data:`DINO_PRESET` and :data:`DINOV2_PRESET`; the class defaults are DINO's. iBOT-only is
``dino_weight=0, ibot_weight=1, koleo_weight=0``.

Compatibility path: a ``variant`` key (``"dino"`` / ``"dinov2"``; job folders exported before the presets, and
``--set dino.variant=...``) is accepted by :meth:`DINOConfig.from_dict` only: it fills the preset's values into the
fields not given (a null preset field counts as not given, as the old "resolve from the variant"), with a
deprecation log line (:func:`expand_variant`).

Step-count settings default to ``None`` and are resolved in ``__post_init__`` from ``total_steps`` (so a stored
config always holds concrete values and ``from_dict(to_dict())`` round-trips).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from fl_plugins.core.schedules import cosine_schedule, cosine_with_warmup, linear_warmup_then_constant
from fl_plugins.data.view_config import MultiCropConfig, multicrop_views
from fl_plugins.models.backbone import BackboneSpec
from fl_plugins.strict_config import StrictConfig

__all__ = ["DINOConfig", "DINO_PRESET", "DINOV2_PRESET", "VARIANT_PRESETS", "MIN_OUT_DIM", "LR_SCALING_RULES",
           "expand_variant"]

logger = logging.getLogger(__name__)

Centering = Literal["centering", "sinkhorn_knopp"]
FederationMode = Literal["A", "B", "C"]
TeacherInit = Literal["copy_global", "keep_local"]
LRScaling = Literal["linear_wrt_256", "sqrt_wrt_1024"]

# [R] Fewer prototypes than this make the DINO targets nearly one-hot over a handful of classes and the head
# collapses easily; the CPU setting of methods-spec 9.3 uses K = 1024. Sinkhorn-Knopp additionally needs
# out_dim >= the number of rows it equipartitions (2 * batch_size global crops): with fewer prototypes than
# samples the "each prototype gets 1/K of the mass" constraint forces many samples onto identical targets.
MIN_OUT_DIM = 16

#: ``lr_scaling`` -> the learning rate of a local batch from ``base_lr``: DINO ``lr * batch / 256``
#: (main_dino.py [V]); DINOv2 ``scaling_rule: sqrt_wrt_1024`` (ssl_default_config.yaml, train.py [V])
LR_SCALING_RULES: dict[str, Callable[[float, int], float]] = {
    "linear_wrt_256": lambda base_lr, batch: base_lr * batch / 256,
    "sqrt_wrt_1024": lambda base_lr, batch: base_lr * math.sqrt(batch / 1024),
}

#: DINO (main_dino.py defaults and DataAugmentationDINO [V]): the DINO term only; teacher_temp 0.04 without
#: warm-up (code default; the README "boost" uses 0.07 with warm-up), momentum 0.996 -> 1, weight-normalised last
#: layer with g frozen, lr 5e-4 per 256 images, crop scales global (0.4, 1), local (0.05, 0.4). Plain JSON values
#: (lists for pairs): copy before changing.
DINO_PRESET: dict[str, Any] = {
    "dino_weight": 1.0,
    "ibot_weight": 0.0,
    "koleo_weight": 0.0,
    "teacher_temp": 0.04,
    "warmup_teacher_temp_frac": 0.0,
    "momentum_teacher": 0.996,
    "norm_last_layer": True,
    "base_lr": 5e-4,
    "lr_scaling": "linear_wrt_256",
    "global_crop_scale": [0.4, 1.0],
    "local_crop_scale": [0.05, 0.4],
}
#: DINOv2 (ssl_default_config.yaml, dinov2/data/augmentations.py [V]): dino.loss_weight 1.0, ibot.loss_weight 1.0
#: (iBOT shares the DINO head: ibot.separate_head=false), dino.koleo_loss_weight 0.1; teacher_temp 0.04 -> 0.07
#: over 30 of 100 epochs, momentum 0.992 -> 1, last layer g not frozen, base_lr 4e-3 at batch 1024 with
#: sqrt_wrt_1024, crop scales global (0.32, 1), local (0.05, 0.32).
DINOV2_PRESET: dict[str, Any] = {
    "dino_weight": 1.0,
    "ibot_weight": 1.0,
    "koleo_weight": 0.1,
    "teacher_temp": 0.07,
    "warmup_teacher_temp_frac": 0.3,
    "momentum_teacher": 0.992,
    "norm_last_layer": False,
    "base_lr": 4e-3,
    "lr_scaling": "sqrt_wrt_1024",
    "global_crop_scale": [0.32, 1.0],
    "local_crop_scale": [0.05, 0.32],
}
#: the deprecated ``variant`` setting's values -> their preset
VARIANT_PRESETS: dict[str, dict[str, Any]] = {"dino": DINO_PRESET, "dinov2": DINOV2_PRESET}


def expand_variant(d: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The compatibility path of the old ``variant`` setting: ``{"variant": v, **x}`` -> ``{**preset(v), **x}``.

    A preset field given as None in ``d`` counts as not given (the old config resolved a None from the variant);
    without ``variant`` such a None is dropped too (the class default, DINO's, applies). Logs a deprecation line when
    ``variant`` is present.

    Args:
        d: DINO settings, maybe with ``variant``.
        defaults: settings under both (e.g. a job's defaults of its ``dino`` section, which hold a preset): the
            variant's preset replaces their preset fields, ``d``'s fields replace both:
            ``{**defaults, **preset(v), **x}`` (``--set dino.variant=dino`` on a DINOv2 job gives DINO).

    Raises:
        ValueError: a ``variant`` other than ``"dino"`` / ``"dinov2"``, naming the value.
    """
    d = dict(d)
    has_variant = "variant" in d
    variant = d.pop("variant", None)
    given = {k: v for k, v in d.items() if not (k in DINO_PRESET and v is None)}
    base = {k: v for k, v in dict(defaults or {}).items() if k != "variant"}
    if not has_variant:
        return {**base, **given}
    if variant not in VARIANT_PRESETS:
        raise ValueError(f"DINO setting variant={variant!r} is not one of {sorted(VARIANT_PRESETS)} (a deprecated "
                         "alias of the presets DINO_PRESET / DINOV2_PRESET; set the loss weights instead)")
    logger.warning("DINO setting variant=%r is deprecated: it stands for the preset %s (loss weights dino_weight, "
                   "ibot_weight, koleo_weight and the [V] values that go with them); the fields given override it",
                   variant, "DINOV2_PRESET" if variant == "dinov2" else "DINO_PRESET")
    return {**base, **copy.deepcopy(VARIANT_PRESETS[variant]), **given}


def _one_of(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {list(allowed)}")


@dataclass(frozen=True)
class DINOConfig(StrictConfig):
    """DINO / DINOv2 pretraining settings; the loss weights decide which terms exist (see the module doc).

    Strict ``from_dict`` / ``to_dict`` from :class:`~fl_plugins.strict_config.StrictConfig` (section ``"DINO"``);
    ``from_dict`` also takes the deprecated ``variant`` (:func:`expand_variant`). Step counts are GLOBAL optimiser
    steps (``round * local_steps + t``), owned by the server. Fields marked "preset" differ between
    :data:`DINO_PRESET` (the defaults here) and :data:`DINOV2_PRESET`.
    """

    SECTION = "DINO"

    backbone: BackboneSpec = field(default_factory=BackboneSpec)  # [R] ViT-tiny/8 at 64 px (spec 9.3)
    # views: the method validates them, sizes the iBOT masks with them and gives them to the view transform
    global_crop_size: int | None = None  # None -> backbone.img_size (224 [V]; 64 [R])
    local_crop_size: int = 32  # 96 [V]; 32 [R] (spec 9.3)
    n_local_crops: int = 4  # 8 [V]; 4 [R] (spec 9.3)
    global_crop_scale: tuple[float, float] = (0.4, 1.0)  # preset: DINO (0.4, 1) / DINOv2 (0.32, 1) [V]
    local_crop_scale: tuple[float, float] = (0.05, 0.4)  # preset: DINO (0.05, 0.4) / DINOv2 (0.05, 0.32) [V]
    batch_size: int = 16  # local batch per step; LR scaling rule and KoLeo/SK checks (64/GPU [V])
    # head
    out_dim: int = 1024  # K = 65536 [V]; 1024 on CPU [R] (spec 2.7, 9.3)
    hidden_dim: int = 2048  # [V]
    bottleneck_dim: int = 256  # [V]
    norm_last_layer: bool = True  # preset: True (DINO) / False (DINOv2) [V]
    # temperatures
    student_temp: float = 0.1  # [V]
    teacher_temp: float = 0.04  # preset: 0.04 (DINO) / 0.07 (DINOv2) [V]; > 0.07 unstable (DINO help)
    warmup_teacher_temp: float = 0.04  # [V]
    warmup_teacher_temp_frac: float = 0.0  # preset: 0 (DINO) / 0.3 (DINOv2, 30 of 100 epochs) [V]
    warmup_teacher_temp_steps: int | None = None  # None -> int(warmup_teacher_temp_frac * total_steps)
    # teacher and targets
    momentum_teacher: float = 0.996  # preset: 0.996 (DINO) / 0.992 (DINOv2) [V], cosine to the end value
    momentum_teacher_end: float = 1.0  # [V]
    centering: Centering = "centering"  # [V] default; "sinkhorn_knopp" as in DINOv2 vitl14 [V]
    center_momentum: float = 0.9  # [V]
    sinkhorn_iterations: int = 3  # [V]
    # loss terms: a weight of 0 removes the term (DINOv2 dino.loss_weight, ibot.loss_weight, dino.koleo_loss_weight)
    dino_weight: float = 1.0  # [V] DINOv2 dino.loss_weight (DINO: the only term)
    ibot_weight: float = 0.0  # preset: 0 (DINO) / 1.0 (DINOv2) [V]; iBOT shares the DINO head [V]
    koleo_weight: float = 0.0  # preset: 0 (DINO) / 0.1 (DINOv2) [V]
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)  # [V]
    mask_sample_probability: float = 0.5  # [V]
    # optimisation (AdamW)
    total_steps: int = 1000  # schedule horizon = rounds * local steps [R]
    lr: float | None = None  # None -> LR_SCALING_RULES[lr_scaling](base_lr, batch_size)
    base_lr: float = 5e-4  # preset: 5e-4 per 256 (DINO) / 4e-3 per 1024 (DINOv2) [V]
    lr_scaling: LRScaling = "linear_wrt_256"  # preset: linear_wrt_256 (DINO) / sqrt_wrt_1024 (DINOv2) [V]
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

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> DINOConfig:
        """Strict build from a plain dict (:meth:`StrictConfig.from_dict`), after the ``variant`` alias
        (:func:`expand_variant`)."""
        if isinstance(d, Mapping):
            d = expand_variant(d)
        return super().from_dict(d)

    @classmethod
    def _coerce(cls, d: dict[str, Any]) -> dict[str, Any]:
        """``backbone``: a dict -> :class:`BackboneSpec`; JSON lists of the pair settings -> tuples."""
        if isinstance(d.get("backbone"), Mapping):
            d["backbone"] = BackboneSpec.from_dict(dict(d["backbone"]))
        for name in _PAIRS:
            if isinstance(d.get(name), list):
                d[name] = tuple(d[name])
        return d

    def __post_init__(self) -> None:
        if isinstance(self.backbone, dict):
            object.__setattr__(self, "backbone", BackboneSpec.from_dict(self.backbone))
        if not isinstance(self.backbone, BackboneSpec):
            raise ValueError(f"backbone must be a BackboneSpec or dict, got {type(self.backbone).__name__}")
        for name in DINO_PRESET:
            if getattr(self, name) is None:
                raise ValueError(f"{name}=None: give a value (DINO_PRESET / DINOV2_PRESET hold the [V] ones)")
        _one_of("lr_scaling", self.lr_scaling, tuple(LR_SCALING_RULES))
        for name in _PAIRS:
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)) or len(value) != 2:
                raise ValueError(f"{name}={value!r} must be a pair [min, max]")
            object.__setattr__(self, name, tuple(value))
        resolved: dict[str, Any] = {}
        if self.global_crop_size is None:
            resolved["global_crop_size"] = self.backbone.img_size
        if self.warmup_teacher_temp_steps is None:
            resolved["warmup_teacher_temp_steps"] = int(self.warmup_teacher_temp_frac * self.total_steps)
        if self.warmup_steps is None:
            resolved["warmup_steps"] = self.total_steps // 10
        if self.freeze_last_layer_steps is None:
            resolved["freeze_last_layer_steps"] = self.total_steps // 100
        if self.lr is None and self.batch_size >= 1:
            resolved["lr"] = LR_SCALING_RULES[self.lr_scaling](self.base_lr, self.batch_size)
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
        for name in ("momentum_teacher", "momentum_teacher_end", "center_momentum", "mask_sample_probability",
                     "warmup_teacher_temp_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        r_min, r_max = self.mask_ratio_min_max
        if not 0.0 <= r_min <= r_max <= 1.0:
            raise ValueError(f"mask_ratio_min_max={self.mask_ratio_min_max} must satisfy 0 <= min <= max <= 1")
        for name in ("global_crop_scale", "local_crop_scale"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must satisfy 0 < min <= max <= 1")
        for name in ("dino_weight", "koleo_weight", "ibot_weight", "lr", "base_lr", "min_lr", "weight_decay",
                     "weight_decay_end", "clip_grad"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.dino_weight == 0 and self.ibot_weight == 0:
            raise ValueError(
                f"dino_weight={self.dino_weight} and ibot_weight={self.ibot_weight}: no self-distillation loss left "
                f"(koleo_weight={self.koleo_weight} only spreads the features); set dino_weight or ibot_weight > 0"
            )
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

    def teacher_temp_at(self, step: int) -> float:
        """Linear ``warmup_teacher_temp -> teacher_temp`` over ``warmup_teacher_temp_steps``, then constant [V]."""
        return linear_warmup_then_constant(
            step, self.warmup_teacher_temp_steps, self.warmup_teacher_temp, self.teacher_temp
        )

    def teacher_momentum_at(self, step: int) -> float:
        """Cosine ``momentum_teacher -> momentum_teacher_end`` over ``total_steps`` [V]."""
        return cosine_schedule(step, self.total_steps, self.momentum_teacher, self.momentum_teacher_end)

    # ---- views and derived facts -------------------------------------------------------------------------------
    def training_views(self, settings: Mapping[str, Any] | None = None) -> MultiCropConfig:
        """The multi-crop views of this run: these crop sizes, crop scales and the backbone's patch, with the job's
        view ``settings`` over them (:func:`fl_plugins.data.view_config.multicrop_views`; its errors name the
        field). Without the DINO term no local crop is made (only the DINO term uses them)."""
        return multicrop_views(
            {"global_crop_size": self.global_crop_size, "local_crop_size": self.local_crop_size,
             "n_local_crops": self.n_local_crops if self.uses_dino else 0, "patch_size": self.backbone.patch_size,
             "global_crop_scale": self.global_crop_scale, "local_crop_scale": self.local_crop_scale},
            settings,
        )

    @property
    def uses_dino(self) -> bool:
        """The image-level DINO term exists (``dino_weight > 0``); without it the local crops are not used."""
        return self.dino_weight > 0

    @property
    def uses_ibot(self) -> bool:
        """The iBOT term exists (``ibot_weight > 0``): masks, the mask token and the iBOT centre with it."""
        return self.ibot_weight > 0

    @property
    def patch_grid(self) -> tuple[int, int]:
        """``(h, w)`` patches of a global crop (the iBOT mask shape)."""
        n = self.global_crop_size // self.backbone.patch_size
        return (n, n)


#: the settings that are pairs (JSON lists -> tuples)
_PAIRS = ("global_crop_scale", "local_crop_scale", "mask_ratio_min_max")
