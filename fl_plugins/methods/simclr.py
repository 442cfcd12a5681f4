"""SimCLR (Chen et al., ICML 2020): the FedSimCLR baseline of the FCL paper, FedAvg of a SimCLR model.

Network: encoder = the ``finetune_seg_unet`` U-Net encoder (:class:`~fl_plugins.models.unet.UNetEncoder`, the
MONAI U-Net's contracting path, global-average pooled; its ``state_dict`` keys are the U-Net's, so the export loads
into the segmentation U-Net through ``model.pretrained``) or a 2D timm ViT (``backbone.kind = "vit"``, CLS token);
projection head = lightly's ``SimCLRProjectionHead`` (SimCLR v1: ``Linear -> BN -> ReLU -> Linear -> BN`` [V
lightly]). Batches are two independently augmented views of each image
(:func:`simclr_views` -> :class:`~fl_plugins.data.pair_views.PairViewTransform`, ``{"view1", "view2"}``); both
views go through the network as one batch of ``2B`` (BatchNorm statistics over both views, as SimCLR's code [V]),
and the loss is lightly's ``NTXentLoss`` (the paper's NT-Xent: for each of the ``2B`` views, cross-entropy of its
other view among the ``2B - 1`` others, at temperature ``tau``) of the two views' projections. No momentum network,
no memory bank, no feature exchange: the FL layer averages the weights (FedAvg).

State taxonomy: federated = ``encoder.*`` and ``projector.*`` (parameters and BatchNorm running statistics, as in
fine-tuning and FCL); site = the BatchNorm ``num_batches_tracked`` counters (site step counts, never averaged);
rebuilt = nothing. Optimiser moments stay on the site outside ``state_dict``; the LR is a pure function of the
global step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fl_plugins.core.schedules import cosine_with_warmup, linear_warmup_then_constant
from fl_plugins.data.pair_views import PAIR_VIEW_KEYS, PairViewTransform, pair_collate, pair_view_config
from fl_plugins.data.view_config import MultiCropConfig
from fl_plugins.engine.method import MethodBase
from fl_plugins.engine.train_loop import adamw_param_groups
from fl_plugins.models.backbone import BackboneSpec
from fl_plugins.models.backbones import build_backbone, feature_dim
from fl_plugins.models.unet import UNET_DEFAULTS
from fl_plugins.strict_config import StrictConfig

__all__ = ["BACKBONE_KINDS", "SimCLRConfig", "SimCLRMethod", "simclr_views"]

#: the backbone kinds SimCLR trains (a pooled vector per image); the whole U-Net (kind "unet") has no vector output
BACKBONE_KINDS = ("unet_encoder", "vit")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class SimCLRConfig(StrictConfig):
    """Settings of SimCLR (section ``"simclr"``); [V] = the SimCLR paper / official code (``google-research/simclr``
    ``tf2/run.py`` flags, ``data_util.py``) or lightly, [R] = project choice for 64 px CPU runs.

    Attributes:
        backbone: :func:`~fl_plugins.models.backbones.build_backbone` settings; default ``kind = "unet_encoder"``
            with ``finetune_seg_unet``'s U-Net settings (:data:`~fl_plugins.models.unet.UNET_DEFAULTS`; they must
            equal the fine-tuning job's ``model`` for the export to load), 2D only; ``{"kind": "vit", ...}`` for a
            timm ViT (:class:`~fl_plugins.models.backbone.BackboneSpec` fields; ``img_size`` must be ``image_size``).
        image_size: side of the training images and of both views, 64 [R] (the fine-tuning job's default).
        batch_size: images per local step, 16 [R] (``2 * 16`` views, 30 negatives each; SimCLR 4096 [V]).
        proj_hidden_dim: hidden width of the projection head, 512 [R] (SimCLR: 2048 = the ResNet-50 width [V]).
        proj_dim: projection output ``z``, 128 [V run.py ``proj_out_dim``].
        temperature: NT-Xent ``tau``, 0.1 [V run.py ``temperature`` default, the ImageNet setting; also FCL's value,
            so the baseline and FCL share it]. lightly's ``NTXentLoss`` default 0.5 is SimCLR's CIFAR-10 setting.
        lr: peak AdamW LR, 3e-4 [R: FCL / FCLOpt's AdamW LR; SimCLR's LARS 0.3 x B / 256 [V] has no AdamW analogue].
        weight_decay: 1e-6 [V run.py], not on biases and 1-D tensors (BatchNorm) [V: SimCLR's LARS excludes them].
        warmup_steps: linear LR warm-up from 0, 0 steps [R] (SimCLR 10 epochs [V]; a federated job's horizon is short).
        total_steps: cosine horizon in global steps; None = the job's horizon (the handler fills it in), or, used
            directly, a constant LR after the warm-up.
        min_lr: LR at ``total_steps``, 0.0 [V: cosine decay to 0].
        seed: model init; the handler mixes in the site name and draws the views from it.
        crop_scale: area range of each view's random resized crop, (0.2, 1.0) [R: SimCLR's (0.08, 1) [V] leaves an
            18 px patch of a 64 px slice, mostly background in MR/CT].
        hflip_prob: horizontal flip probability, 0.5 [V].
        intensity_prob: probability of the intensity jitter that replaces colour jitter, 0.8 [V: colour jitter
            p = 0.8]; its strengths are the multi-crop defaults (brightness / contrast 0.2, gamma (0.7, 1.5) [R],
            :mod:`fl_plugins.data.views`); SimCLR's grey-scale op (p = 0.2 [V]) has no 1-channel counterpart.
        blur_prob: Gaussian blur probability of each view, 0.5 [V ImageNet], sigma U(0.1, 2.0) px [V].

    The views have no Gaussian noise (``noise_prob`` 0 [V: not a SimCLR augmentation]) and no solarisation; a job's
    ``views`` settings (:data:`~fl_plugins.data.view_config.VIEW_SETTING_FIELDS`) override any of these view
    values (:meth:`training_views`).
    """

    SECTION = "simclr"

    backbone: dict = field(default_factory=lambda: {"kind": "unet_encoder"})
    image_size: int = 64
    batch_size: int = 16
    proj_hidden_dim: int = 512
    proj_dim: int = 128
    temperature: float = 0.1
    lr: float = 3e-4
    weight_decay: float = 1e-6
    warmup_steps: int = 0
    total_steps: int | None = None
    min_lr: float = 0.0
    seed: int = 0
    crop_scale: tuple = (0.2, 1.0)
    hflip_prob: float = 0.5
    intensity_prob: float = 0.8
    blur_prob: float = 0.5

    def _bad(self, name: str, why: str) -> ValueError:
        return ValueError(f"{self.SECTION} setting {name!r}={getattr(self, name)!r}: {why}")

    def __post_init__(self) -> None:
        for name in ("image_size", "proj_hidden_dim", "proj_dim"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise self._bad(name, "must be an int >= 1")
        if not _is_int(self.batch_size) or self.batch_size < 2:
            raise self._bad("batch_size", "must be an int >= 2 (the other images of the batch are the negatives)")
        if not _is_int(self.seed):
            raise self._bad("seed", "must be an int")
        for name in ("temperature", "lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
                raise self._bad(name, "must be a finite number > 0")
        if isinstance(self.weight_decay, bool) or not isinstance(self.weight_decay, (int, float)) \
                or not 0 <= self.weight_decay < math.inf:
            raise self._bad("weight_decay", "must be a number >= 0")
        if isinstance(self.min_lr, bool) or not isinstance(self.min_lr, (int, float)) \
                or not 0 <= self.min_lr <= self.lr:
            raise self._bad("min_lr", f"must be in [0, lr={self.lr!r}]")
        if not _is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise self._bad("warmup_steps", "must be an int >= 0")
        total = self.total_steps
        if total is not None and (not _is_int(total) or total < 1):
            raise self._bad("total_steps", "must be an int >= 1 or None (the job's horizon)")
        if total is not None and self.warmup_steps > total:
            raise self._bad("warmup_steps", f"must be <= total_steps={total}")
        cs = self.crop_scale
        if not isinstance(cs, tuple) or len(cs) != 2 or not all(isinstance(v, (int, float)) for v in cs) \
                or not 0 < cs[0] <= cs[1] <= 1:
            raise self._bad("crop_scale", "must be [lo, hi] with 0 < lo <= hi <= 1")
        for name in ("hflip_prob", "intensity_prob", "blur_prob"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise self._bad(name, "must be a probability in [0, 1]")
        self._check_backbone()

    def _check_backbone(self) -> None:
        """``backbone``: a dict of a kind in :data:`BACKBONE_KINDS`, 2D, known settings; a ViT sized ``image_size``."""
        if not isinstance(self.backbone, Mapping):
            raise self._bad("backbone", "must be a dict of build_backbone settings")
        b = dict(self.backbone)
        kind = b.pop("kind", "unet_encoder")
        if kind not in BACKBONE_KINDS:
            raise ValueError(f"{self.SECTION} setting 'backbone.kind'={kind!r}: must be one of {list(BACKBONE_KINDS)}")
        if b.get("spatial_dims", 2) != 2:
            raise ValueError(f"{self.SECTION} setting 'backbone.spatial_dims'={b['spatial_dims']!r}: must be 2 "
                             "(SimCLR trains on 2D views)")
        if kind == "unet_encoder":
            unknown = sorted(set(b) - set(UNET_DEFAULTS))
            if unknown:
                raise ValueError(f"{self.SECTION} setting 'backbone' has unknown unet_encoder setting(s) {unknown}; "
                                 f"valid: {sorted(UNET_DEFAULTS)}")
            return
        b.pop("spatial_dims", None)
        try:
            spec = BackboneSpec.from_dict(b)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{self.SECTION} setting 'backbone' (kind 'vit'): {e}") from e
        if spec.img_size != self.image_size:
            raise ValueError(f"{self.SECTION} setting 'backbone.img_size'={spec.img_size!r}: must equal "
                             f"image_size={self.image_size!r} (the ViT's position embeddings are sized for it)")

    @classmethod
    def _coerce(cls, d: dict[str, Any]) -> dict[str, Any]:
        """``backbone``: ``kind`` defaults to ``"unet_encoder"`` (null -> the default backbone); ``crop_scale``: a
        tuple."""
        if "backbone" in d:
            b = d["backbone"]
            d["backbone"] = {"kind": "unet_encoder", **dict(b or {})} if b is None or isinstance(b, Mapping) else b
        if isinstance(d.get("crop_scale"), list):
            d["crop_scale"] = tuple(d["crop_scale"])
        return d

    def backbone_settings(self) -> dict[str, Any]:
        """The ``build_backbone`` settings with the U-Net defaults filled in (``unet_encoder``)."""
        b = dict(self.backbone)
        if b.get("kind", "unet_encoder") == "unet_encoder":
            return {"kind": "unet_encoder", **UNET_DEFAULTS, **{k: v for k, v in b.items() if k != "kind"}}
        return {k: v for k, v in b.items() if k != "spatial_dims"}

    def training_views(self, settings: Mapping[str, Any] | None = None) -> MultiCropConfig:
        """The two-view settings of this run: ``image_size`` views with this config's view values, the job's view
        ``settings`` over them (:func:`~fl_plugins.data.pair_views.pair_view_config`; its errors name the field)."""
        return pair_view_config(
            self.image_size,
            {"global_crop_scale": tuple(self.crop_scale), "hflip_prob": self.hflip_prob,
             "intensity_prob": self.intensity_prob, "blur_probs": (self.blur_prob, self.blur_prob, 0.0),
             "noise_prob": 0.0, "solarize_prob": 0.0},
            settings,
        )


def simclr_views(config: SimCLRConfig, settings: dict[str, Any]) -> tuple[PairViewTransform, Any]:
    """The registry's views factory: ``(PairViewTransform(config.training_views(settings)), pair_collate)``; a batch
    is ``{"view1": [B, 1, S, S], "view2": [B, 1, S, S]}``."""
    return PairViewTransform(config.training_views(settings)), pair_collate


class SimCLRMethod(MethodBase):
    """SimCLR as a :class:`~fl_plugins.engine.method.Method` (see the module docstring)."""

    #: the BatchNorm step counters stay on the site; every other tensor is federated
    site_regex = r"(^|\.)num_batches_tracked$"

    def __init__(self, config: SimCLRConfig) -> None:
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        super().__init__(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.encoder = build_backbone(config.backbone_settings())
            dim = feature_dim(self.encoder)
            self.projector = SimCLRProjectionHead(dim, config.proj_hidden_dim, config.proj_dim)
        self.criterion = NTXentLoss(temperature=config.temperature, gather_distributed=False)
        self.embed_dim = dim

    # -- optimisation --------------------------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: ``weight_decay`` on weight matrices, none on biases and 1-D tensors."""
        decay, no_decay = adamw_param_groups(self)
        return [{**decay, "weight_decay": self.config.weight_decay}, no_decay]

    def weight_decay_at(self, global_step: int) -> float | None:
        return float(self.config.weight_decay)

    def lr_at(self, global_step: int) -> float:
        """Linear warm-up from 0 over ``warmup_steps``, then cosine to ``min_lr`` at ``total_steps`` (constant
        ``lr`` when ``total_steps`` is None)."""
        c = self.config
        if c.total_steps is None:
            return linear_warmup_then_constant(global_step, c.warmup_steps, 0.0, c.lr)
        return cosine_with_warmup(global_step, c.total_steps, c.warmup_steps, c.lr, c.min_lr)

    # -- the objective -------------------------------------------------------------------------------------------
    def _views(self, batch: Any) -> tuple[Tensor, Tensor]:
        if not isinstance(batch, Mapping) or any(k not in batch for k in PAIR_VIEW_KEYS):
            got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise ValueError(f"simclr takes batches {{'view1', 'view2'}} (simclr_views / pair_collate), got {got}")
        v1, v2 = batch["view1"], batch["view2"]
        s = self.config.image_size
        for name, v in (("view1", v1), ("view2", v2)):
            if v.dim() != 4 or tuple(v.shape[2:]) != (s, s):
                raise ValueError(f"simclr (image_size={s}) takes {name} [B, C, {s}, {s}], got {tuple(v.shape)}")
        if v1.shape != v2.shape:
            raise ValueError(f"simclr: view1 {tuple(v1.shape)} and view2 {tuple(v2.shape)} must have one shape")
        if v1.shape[0] < 2:
            raise ValueError(f"simclr needs >= 2 images per batch (the negatives), got {v1.shape[0]}")
        return v1, v2

    def projections(self, view1: Tensor, view2: Tensor) -> tuple[Tensor, Tensor]:
        """Projections ``z1, z2 [B, proj_dim]`` of views ``[B, C, S, S]`` (graph attached; not normalised), the two
        views through the network as one batch of ``2B``."""
        z = self.projector(self.encoder(torch.cat([view1, view2])))
        return z[: view1.shape[0]], z[view1.shape[0]:]

    def training_step(self, batch: Any, global_step: int, rng: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """NT-Xent of ``{"view1": [B, C, S, S], "view2": [B, C, S, S]}`` (the augmentation is the data pipeline's:
        ``rng`` is unused). Stats: ``loss``, ``positive_cosine`` (mean cosine of the pairs) and ``output_std`` (std
        of the normalised projections, ~ 1/sqrt(proj_dim) healthy, 0 collapsed)."""
        z1, z2 = self.projections(*self._views(batch))
        loss = self.criterion(z1, z2)
        with torch.no_grad():
            n1, n2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
            pos = (n1 * n2).sum(1).mean()
            spread = torch.cat([n1, n2]).std(0).mean()
        return loss, {"loss": float(loss.detach()), "positive_cosine": float(pos), "output_std": float(spread)}

    def backbone(self) -> nn.Module:
        """The encoder (U-Net encoder: its export starts ``finetune_seg_unet`` through ``model.pretrained``)."""
        return self.encoder
