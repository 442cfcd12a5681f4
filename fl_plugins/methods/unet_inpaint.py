"""Masked inpainting of the whole U-Net (encoder and decoder): the segmentation network learns to fill masked patches.

Recipe (de Mooij et al. 2024, arXiv 2409.18100, q-cardIA/ssp-cmr-cine-segmentation ``configs/``,
``code/pretraining/mim/`` [V via small-scale-ssl.md]): a random ``mask_ratio`` of the ``patch_size`` patches of each
image set to ``mask_value``, the U-Net predicts the image, MSE on the masked pixels only
(:func:`fl_plugins.core.mim.masked_pixel_loss`). Augmentations = the fine-tuning job's (flips, 90-degree rotations),
drawn from the step's generator like the masks.

The network is exactly ``finetune_seg_unet``'s MONAI U-Net (same ``build_unet`` settings, same ``state_dict`` keys)
with ``in_channels`` output channels instead of ``num_classes``; its export (``method.backbone()`` = the whole
U-Net) starts the segmentation fine-tuning with ``model.pretrained``: every tensor loads except the output block,
whose shape depends on the number of classes (:func:`fl_plugins.models.unet.load_unet_pretrained`).

State taxonomy: federated = every trainable parameter and the BatchNorm running mean/var (as in fine-tuning, so the
pretrained statistics reach the fine-tuning); site = ``num_batches_tracked`` counters; rebuilt = nothing. The
optimiser's moments stay on the site (the handler owns them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from monai.networks.nets import UNet
from torch import Tensor, nn

from fl_plugins.core.mim import (
    check_mask_ratio,
    grid_shape,
    masked_pixel_loss,
    patch_mask_to_pixels,
    random_patch_mask,
)
from fl_plugins.core.schedules import warmup_cosine_or_constant
from fl_plugins.engine.finetune import augment_flip_rot90
from fl_plugins.engine.method import MethodBase
from fl_plugins.models.unet import UNET_DEFAULTS, build_unet
from fl_plugins.strict_config import StrictConfig

__all__ = ["InpaintConfig", "UNetInpaintMethod", "build_inpainting_unet"]

_UNET_KEYS = tuple(UNET_DEFAULTS)


def build_inpainting_unet(unet: Mapping[str, Any]) -> UNet:
    """The fine-tuning U-Net (``build_unet(**unet)``) with ``in_channels`` outputs: an image-to-image network."""
    unknown = sorted(set(unet) - set(_UNET_KEYS))
    if unknown:
        raise ValueError(f"unet_inpaint setting 'unet' has unknown key(s) {unknown}; valid: {list(_UNET_KEYS)}")
    kw = {**UNET_DEFAULTS, **dict(unet)}
    in_ch = int(kw["in_channels"])
    net = build_unet(num_classes=max(2, in_ch), **kw)  # validates the settings exactly as fine-tuning does
    if in_ch == net.out_channels:
        return net
    kw.pop("in_channels")
    return UNet(spatial_dims=int(kw["spatial_dims"]), in_channels=in_ch, out_channels=in_ch,
                channels=tuple(int(c) for c in kw["channels"]), strides=tuple(int(s) for s in kw["strides"]),
                num_res_units=int(kw["num_res_units"]), norm=kw["norm"], dropout=float(kw["dropout"]))


@dataclass(frozen=True)
class InpaintConfig(StrictConfig):
    """Settings of U-Net masked inpainting ([V] de Mooij et al. 2024; [R] project choice for 64 px CPU runs); strict
    ``from_dict`` / ``to_dict`` from :class:`~fl_plugins.strict_config.StrictConfig` (section ``"unet_inpaint"``).

    Attributes:
        unet: ``build_unet`` settings other than ``num_classes`` (must equal the fine-tuning job's ``model``
            settings for the checkpoint to load; default the same defaults).
        image_size: side of the (square / cubic) training images, 64 [R] (the fine-tuning job's default).
        patch_size: masked patch side in pixels, 8 [R]: de Mooij mask 32 px patches of 256 px images (1/8 of the
            side); 8 px keeps that fraction at 64 px.
        mask_ratio: fraction of patches masked per image, 0.75 [V de Mooij]; exactly ``round(ratio * N)`` each.
        mask_value: value written into masked pixels, 0.0 [V] (= the mean of z-scored images).
        loss: "mse" on masked pixels [V] or "l1" (SimMIM's choice).
        lr, min_lr_ratio, warmup_steps, total_steps: AdamW peak LR 1e-3 with cosine decay to ``lr * min_lr_ratio``
            over ``total_steps`` global steps [R: the 2-core pilot of small-scale-ssl.md; de Mooij used SGD 0.01,
            momentum 0.99 for 100 epochs at batch 128]; ``total_steps`` None = the job's horizon.
        weight_decay: 1e-5 (the fine-tuning default [V positional_cl]).
        batch_size: 32 [R pilot].
        aug_flip, aug_rot90: the fine-tuning job's augmentations.
        seed: model init and (mixed with the site name by the handler) masks and augmentations.
    """

    SECTION = "unet_inpaint"

    unet: dict = field(default_factory=dict)
    image_size: int = 64
    patch_size: int = 8
    mask_ratio: float = 0.75
    mask_value: float = 0.0
    loss: str = "mse"
    lr: float = 1e-3
    min_lr_ratio: float = 0.01
    warmup_steps: int = 0
    total_steps: int | None = None
    weight_decay: float = 1e-5
    batch_size: int = 32
    aug_flip: bool = True
    aug_rot90: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"unet_inpaint setting {name!r}={getattr(self, name)!r}: {why}")

        check_mask_ratio(self.mask_ratio, "unet_inpaint setting 'mask_ratio'")
        dims = int({**UNET_DEFAULTS, **self.unet}.get("spatial_dims", 2))
        grid_shape((self.image_size,) * dims, self.patch_size, "unet_inpaint setting 'patch_size'")
        if (self.image_size // self.patch_size) ** dims < 2:
            raise bad("patch_size", f"leaves fewer than 2 patches in a {self.image_size}-pixel image")
        if self.loss not in ("mse", "l1"):
            raise bad("loss", "must be 'mse' or 'l1'")
        for name in ("lr", "batch_size"):
            if not getattr(self, name) > 0:
                raise bad(name, "must be > 0")
        if self.total_steps is not None and self.total_steps < 1:
            raise bad("total_steps", "must be >= 1 or None")

    @classmethod
    def _coerce(cls, d: dict[str, Any]) -> dict[str, Any]:
        """``unet``: a copy of the given settings (absent or null -> ``{}``, the fine-tuning defaults)."""
        return {**d, "unet": dict(d.get("unet") or {})}


class UNetInpaintMethod(MethodBase):
    """Federated U-Net masked inpainting as a :class:`~fl_plugins.engine.method.Method` (keys = the U-Net's own)."""

    site_regex = r"(^|\.)num_batches_tracked$"

    def __init__(self, config: InpaintConfig) -> None:
        super().__init__(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.net = build_inpainting_unet(config.unet)
        self.spatial_dims = int(self.net.dimensions)
        self.grid = grid_shape((config.image_size,) * self.spatial_dims, config.patch_size)

    def state_module(self) -> nn.Module:
        return self.net

    def parameter_groups(self) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.net.parameters() if p.requires_grad],
                 "weight_decay": self.config.weight_decay}]

    def lr_at(self, global_step: int) -> float:
        c = self.config
        return warmup_cosine_or_constant(global_step, c.lr, c.warmup_steps, c.total_steps, c.min_lr_ratio)

    def _check_images(self, x: Tensor) -> None:
        want = (self.config.image_size,) * self.spatial_dims
        if x.dim() != self.spatial_dims + 2 or tuple(x.shape[2:]) != want:
            raise ValueError(f"unet_inpaint ({self.spatial_dims}D, image_size={self.config.image_size}) takes images "
                             f"[B, C, {', '.join(map(str, want))}], got {tuple(x.shape)}")

    def mask_images(self, x: Tensor, rng: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(masked input, pixel mask [B, 1, *spatial] float, 1 = masked)`` of images ``x [B, C, *spatial]``."""
        mask, _ = random_patch_mask(x.shape[0], math.prod(self.grid), self.config.mask_ratio, rng, device=x.device)
        pix = patch_mask_to_pixels(mask, self.grid, self.config.patch_size).to(x.dtype)
        return x * (1 - pix) + self.config.mask_value * pix, pix

    def training_step(self, batch: Any, global_step: int, rng: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """Loss of ``{"image": [B, C, *spatial]}``: augment, mask, reconstruct, loss on masked pixels. Stats:
        ``loss``, ``masked_fraction`` (of pixels), ``zero_fill_loss`` (the loss of predicting ``mask_value``: the
        level a model that learned nothing reaches)."""
        x = batch["image"] if isinstance(batch, Mapping) else batch
        self._check_images(x)
        x, _ = augment_flip_rot90(x, None, self.config.aug_flip, self.config.aug_rot90, rng)
        xin, pix = self.mask_images(x, rng)
        pred = self.net(xin)
        loss = masked_pixel_loss(pred, x, pix, self.config.loss)
        with torch.no_grad():
            base = masked_pixel_loss(xin, x, pix, self.config.loss)
        return loss, {"loss": float(loss.detach()), "masked_fraction": float(pix.mean()),
                      "zero_fill_loss": float(base)}

    @torch.no_grad()
    def preview(self, images: Tensor, rng: torch.Generator) -> dict[str, Tensor]:
        """What TensorBoard shows: ``{"input", "masked", "reconstruction"}`` each ``[N, C, *spatial]`` (the
        reconstruction keeps the visible pixels, as a user reads an inpainting)."""
        self._check_images(images)
        was = self.net.training
        self.net.eval()
        xin, pix = self.mask_images(images, rng)
        pred = self.net(xin)
        self.net.train(was)
        return {"input": images, "masked": xin, "reconstruction": images * (1 - pix) + pred * pix}

    def backbone(self) -> nn.Module:
        """The whole U-Net (its export starts ``finetune_seg_unet`` through ``model.pretrained``)."""
        return self.net
