"""Configuration of masked image modelling with a ViT: MAE (2D timm ViT or 3D MONAI ViT) and SimMIM (2D).

Tags as in methods-spec 0.1: [V] from the official code (``facebookresearch/mae`` @ ``efb2a80``,
``microsoft/SimMIM`` @ ``d3e29bc``; methods-spec 4.1 / 4.2), [R] project default for the 2-core CPU scale
(methods-spec 9.3). Variant-dependent settings default to ``None`` and are resolved in ``__post_init__``, so a
stored config always holds concrete values and ``MAEConfig.from_dict(cfg.to_dict()) == cfg``. Every error names the
setting and its value (``mae setting 'mask_ratio' ...``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from fl_plugins.core.mim import check_mask_ratio, grid_shape
from fl_plugins.core.schedules import cosine_with_warmup, linear_warmup_then_constant
from fl_plugins.models.backbone import BackboneSpec
from fl_plugins.strict_config import StrictConfig

__all__ = ["MAEConfig", "VARIANTS"]

Variant = Literal["mae", "simmim"]

#: The two masked-image-modelling variants.
VARIANTS = ("mae", "simmim")

_VARIANT_DEFAULTS: dict[str, dict[str, Any]] = {
    # MAE main_pretrain.py / PRETRAIN.md [V]: mask 0.75, RandomResizedCrop scale (0.2, 1), AdamW betas (0.9, 0.95),
    # blr 1.5e-4 x batch / 256, 40 of 800 warm-up epochs (5 %), no gradient clipping
    "mae": {"mask_ratio": 0.75, "crop_scale": (0.2, 1.0), "betas": (0.9, 0.95), "base_lr": 1.5e-4, "lr_batch": 256,
            "warmup_frac": 40 / 800, "clip_grad": 0.0},
    # SimMIM data_simmim.py / config.py / vit_base__800ep pretrain yaml [V]: mask 0.6 of 32 px mask patches,
    # RandomResizedCrop scale (0.67, 1), AdamW betas (0.9, 0.999), base LR 1e-4 x batch / 512, 10 of 800 warm-up
    # epochs, CLIP_GRAD 5.0
    "simmim": {"mask_ratio": 0.6, "crop_scale": (0.67, 1.0), "betas": (0.9, 0.999), "base_lr": 1e-4, "lr_batch": 512,
               "warmup_frac": 10 / 800, "clip_grad": 5.0},
}


def _bad(name: str, value: Any, why: str) -> ValueError:
    return ValueError(f"mae setting {name!r}={value!r}: {why}")


def _pair(name: str, value: Any) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise _bad(name, value, "must be a pair of numbers")
    try:
        return float(value[0]), float(value[1])
    except (TypeError, ValueError):
        raise _bad(name, value, "must be a pair of numbers") from None


@dataclass(frozen=True)
class MAEConfig(StrictConfig):
    """Settings of MAE (``variant="mae"``, 2D or 3D) and SimMIM (``variant="simmim"``, 2D); strict ``from_dict`` /
    ``to_dict`` from :class:`~fl_plugins.strict_config.StrictConfig` (section ``"mae"``; ``to_dict`` writes pairs
    as lists and the backbone as its dict).

    Attributes:
        variant: "mae" [V He et al. 2022] (project default, methods-spec 4.2 "Project default: MAE") or "simmim"
            [V Xie et al. 2022].
        backbone: the timm ViT (:class:`BackboneSpec`; dict accepted). Default = the ``dino_pretrain`` job's CPU
            ViT [R spec 9.3]: ``vit_tiny_patch16_224`` width (192-d, 3 heads), 6 blocks, patch 8, 64 px, 1 channel.
            2D: this exact timm ViT is the encoder and the export. 3D (``spatial_dims=3``): its width, heads,
            MLP width, depth, patch and ``img_size`` (the cube side) build MONAI's ``MaskedAutoEncoderViT``.
        spatial_dims: 2 (images ``[B, C, H, W]``) or 3 (volumes ``[B, C, D, H, W]``; MAE only).
        image_size: side of the training images / volumes; None -> ``backbone.img_size`` (it must equal it: the
            position embeddings are sized for ``backbone.img_size``).
        mask_ratio: None -> 0.75 (MAE) / 0.6 (SimMIM) [V]; in (0, 1). MAE 2D and SimMIM mask exactly
            ``round(ratio * N)`` patches (:func:`fl_plugins.core.mim.random_patch_mask`); MAE 3D keeps MONAI's
            count, ``int((1 - ratio) * N)`` visible patches.
        norm_pix_loss: MAE target = per-patch normalised pixels. Default False [R]: the MAE code default is False
            and PRETRAIN.md turns it on for the best ImageNet fine-tuning, but on z-scored 1-channel MR/CT with
            8 px patches many patches are near-constant background, whose normalised target is amplified noise
            (variance ~ 0 divided by sqrt(var + 1e-6)); raw pixels also keep the reconstructions readable. MAE only.
        decoder_dim, decoder_depth, decoder_heads: MAE decoder width / blocks / heads, 192 / 2 / 4 [R CPU scale:
            the encoder's width, a quarter of its depth] (official 512 / 8 / 16 [V]); MLP ratio 4 [V]. 3D: MONAI's
            3D sin-cos pos-emb needs ``decoder_dim`` (and the backbone width) divisible by 6. Unused by SimMIM (its
            head is linear [V]).
        simmim_mask_patch: SimMIM mask patch side in model patches, 2 [V: 32 px mask patches over 16 px model
            patches]; the patch grid must be a multiple of it.
        augment: RandomResizedCrop + horizontal flip in the step (False: the images as they come).
        crop_scale: RandomResizedCrop area range; None -> (0.2, 1.0) (MAE) / (0.67, 1.0) (SimMIM) [V].
        crop_ratio: RandomResizedCrop aspect range (3/4, 4/3) [V torchvision default, both variants].
        aug_flip: random horizontal flip [V both].
        lr: peak AdamW LR; None -> base LR x ``batch_size`` / 256 (MAE blr 1.5e-4) or / 512 (SimMIM 1e-4) [V
            scaling rules]. Short CPU pilots may want more.
        min_lr_ratio: final LR = ``lr * min_lr_ratio`` at ``total_steps``, 0.0 [V MAE ``min_lr=0``].
        warmup_steps: None -> 5 % (MAE, 40/800 epochs) / 1.25 % (SimMIM, 10/800) of ``total_steps`` [V], 0 when
            ``total_steps`` is None.
        total_steps: cosine horizon in global steps; None = the job's horizon (linear warm-up, then constant).
            SimMIM's multistep decay is replaced by the same cosine [R].
        weight_decay: 0.05 [V both]; not on biases and 1-D tensors (timm ``param_groups_weight_decay`` [V]).
        betas: AdamW betas; None -> (0.9, 0.95) (MAE) / (0.9, 0.999) (SimMIM) [V].
        clip_grad: gradient-norm clip; None -> 0 = off (MAE) / 5.0 (SimMIM) [V].
        batch_size: local batch per step, 32 [R] (4096 MAE / 2048 SimMIM effective [V]).
        seed: model init and (mixed with the site name by the handler) masks and augmentations.
    """

    SECTION = "mae"

    variant: Variant = "mae"
    backbone: BackboneSpec = field(default_factory=BackboneSpec)
    spatial_dims: int = 2
    image_size: int | None = None
    mask_ratio: float | None = None
    norm_pix_loss: bool = False
    decoder_dim: int = 192
    decoder_depth: int = 2
    decoder_heads: int = 4
    simmim_mask_patch: int = 2
    augment: bool = True
    crop_scale: tuple[float, float] | None = None
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    aug_flip: bool = True
    lr: float | None = None
    min_lr_ratio: float = 0.0
    warmup_steps: int | None = None
    total_steps: int | None = None
    weight_decay: float = 0.05
    betas: tuple[float, float] | None = None
    clip_grad: float | None = None
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise _bad("variant", self.variant, f"must be one of {list(VARIANTS)}")
        if isinstance(self.backbone, Mapping):
            try:
                object.__setattr__(self, "backbone", BackboneSpec.from_dict(dict(self.backbone)))
            except (TypeError, ValueError) as e:
                raise ValueError(f"mae setting 'backbone': {e}") from e
        if not isinstance(self.backbone, BackboneSpec):
            raise _bad("backbone", self.backbone, "must be a BackboneSpec or a dict of its fields")
        d = _VARIANT_DEFAULTS[self.variant]
        for name in ("batch_size", "decoder_dim", "decoder_depth", "decoder_heads", "simmim_mask_patch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise _bad(name, v, "must be an int >= 1")
        resolved: dict[str, Any] = {
            "mask_ratio": d["mask_ratio"] if self.mask_ratio is None else self.mask_ratio,
            "crop_scale": _pair("crop_scale", d["crop_scale"] if self.crop_scale is None else self.crop_scale),
            "crop_ratio": _pair("crop_ratio", self.crop_ratio),
            "betas": _pair("betas", d["betas"] if self.betas is None else self.betas),
            "clip_grad": d["clip_grad"] if self.clip_grad is None else self.clip_grad,
            "image_size": self.backbone.img_size if self.image_size is None else self.image_size,
            "lr": d["base_lr"] * self.batch_size / d["lr_batch"] if self.lr is None else self.lr,
        }
        if self.warmup_steps is None:
            resolved["warmup_steps"] = int(round(d["warmup_frac"] * self.total_steps)) if self.total_steps else 0
        for name, value in resolved.items():
            object.__setattr__(self, name, value)
        self._validate()

    def _validate(self) -> None:
        check_mask_ratio(self.mask_ratio, "mae setting 'mask_ratio'")
        if self.spatial_dims not in (2, 3) or isinstance(self.spatial_dims, bool):
            raise _bad("spatial_dims", self.spatial_dims, "must be 2 or 3")
        if self.spatial_dims == 3 and self.variant != "mae":
            raise _bad("spatial_dims", self.spatial_dims, f"3D volumes need variant 'mae' (got {self.variant!r})")
        if self.image_size != self.backbone.img_size:
            raise _bad("image_size", self.image_size, f"differs from the backbone's img_size={self.backbone.img_size}"
                       " (the position embeddings are sized for it): set backbone.img_size instead")
        grid = grid_shape((self.image_size,) * self.spatial_dims, self.backbone.patch_size,
                          "mae setting 'backbone.patch_size'")
        n = math.prod(grid)
        if n < 2:
            raise _bad("backbone.patch_size", self.backbone.patch_size,
                       f"leaves fewer than 2 patches in a {self.image_size}-pixel image")
        if self.variant == "simmim":
            mask_grid = grid_shape(grid, self.simmim_mask_patch, "mae setting 'simmim_mask_patch'")
            if math.prod(mask_grid) < 2:
                raise _bad("simmim_mask_patch", self.simmim_mask_patch,
                           f"leaves fewer than 2 mask patches on the {grid} patch grid")
            if self.norm_pix_loss:
                raise _bad("norm_pix_loss", self.norm_pix_loss, "needs variant 'mae' (SimMIM's loss is L1 on pixels)")
        if self.spatial_dims == 3:
            if self.decoder_dim % 6:
                raise _bad("decoder_dim", self.decoder_dim, "must be a multiple of 6 in 3D (MONAI's 3D sin-cos "
                           "position embedding)")
            keep = int((1 - self.mask_ratio) * n)  # MONAI MaskedAutoEncoderViT._masking
            if not 1 <= keep < n:
                raise _bad("mask_ratio", self.mask_ratio, f"keeps {keep} of the {n} patches of a volume (MONAI "
                           "keeps int((1 - ratio) * N)); need at least 1 visible and 1 masked patch")
        if self.decoder_dim % self.decoder_heads:
            raise _bad("decoder_dim", self.decoder_dim, f"must be a multiple of decoder_heads={self.decoder_heads}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise _bad("crop_scale", self.crop_scale, "must satisfy 0 < min <= max <= 1")
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi:
            raise _bad("crop_ratio", self.crop_ratio, "must satisfy 0 < min <= max")
        if not all(0 <= b < 1 for b in self.betas):
            raise _bad("betas", self.betas, "each must be in [0, 1)")
        for name in ("lr", "min_lr_ratio", "weight_decay", "clip_grad"):
            if not getattr(self, name) >= 0:
                raise _bad(name, getattr(self, name), "must be >= 0")
        if not self.lr > 0:
            raise _bad("lr", self.lr, "must be > 0")
        if self.total_steps is not None and (isinstance(self.total_steps, bool) or self.total_steps < 1):
            raise _bad("total_steps", self.total_steps, "must be >= 1 or None")
        if self.warmup_steps < 0 or (self.total_steps is not None and self.warmup_steps > self.total_steps):
            raise _bad("warmup_steps", self.warmup_steps, f"must be in [0, total_steps={self.total_steps}]")

    # ---- schedules: pure functions of the global step ---------------------------------------------------------
    def lr_at(self, step: int) -> float:
        """Linear warm-up 0 -> ``lr`` over ``warmup_steps``, then cosine to ``lr * min_lr_ratio`` at
        ``total_steps`` [V MAE ``lr_sched.adjust_learning_rate``]; constant after the warm-up without a horizon."""
        if self.total_steps is None:
            return linear_warmup_then_constant(step, self.warmup_steps, 0.0, self.lr)
        return cosine_with_warmup(step, self.total_steps, self.warmup_steps, self.lr, self.lr * self.min_lr_ratio)
