"""Masked image modelling pieces shared by MAE, SimMIM and U-Net inpainting (pure torch, 2D and 3D).

* :func:`random_patch_mask` -- per sample, exactly ``round(ratio * N)`` of the ``N`` patches masked, chosen by the
  argsort of uniform noise (MAE ``random_masking`` [V], methods-spec 4.1); all randomness from an explicit
  ``torch.Generator``.
* :func:`patchify` / :func:`unpatchify` -- ``[B, C, *spatial]`` <-> ``[B, N, prod(p) * C]`` for 2D (``p x p``) and
  3D (``p x p x p``) patches; patch order is row-major over the grid (D, H, W), pixel order inside a patch is
  ``(*patch, C)``, as MAE's ``patchify`` (``nhwpqc``) [V].
* :func:`patch_mask_to_pixels` -- a patch mask as a pixel mask ``[B, 1, *spatial]`` (SimMIM's upsampled mask [V]).
* Losses: :func:`masked_patch_mse` (MAE: mean over masked patches of the per-patch MSE, optional per-patch
  normalised target :func:`norm_pix_target`), :func:`masked_pixel_loss` (SimMIM L1 / U-Net inpainting MSE on
  masked pixels: ``sum(|x - x^| * M) / (sum(M) + 1e-5) / C`` [V SimMIM]).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "check_mask_ratio",
    "grid_shape",
    "random_patch_mask",
    "patchify",
    "unpatchify",
    "patch_mask_to_pixels",
    "norm_pix_target",
    "masked_patch_mse",
    "masked_pixel_loss",
    "NORM_PIX_EPS",
]

#: MAE's ``norm_pix_loss`` variance epsilon (``(x - mean) / (var + 1e-6) ** 0.5``) [V].
NORM_PIX_EPS = 1e-6


def check_mask_ratio(ratio: float, name: str = "mask_ratio") -> float:
    """``ratio`` as a float in the open interval (0, 1); else ``ValueError`` naming ``name`` and the value."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) < 1.0:
        raise ValueError(f"{name} must be a number in (0, 1), got {ratio!r}")
    return float(ratio)


def grid_shape(spatial: Sequence[int], patch_size: int, name: str = "patch_size") -> tuple[int, ...]:
    """The patch grid of an image of size ``spatial`` (2 or 3 dims); every size must be a multiple of ``patch_size``."""
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"{name} must be a positive int, got {patch_size!r}")
    if len(spatial) not in (2, 3):
        raise ValueError(f"images must be 2D or 3D, got spatial size {tuple(spatial)}")
    bad = [s for s in spatial if s % patch_size]
    if bad:
        raise ValueError(f"image size {tuple(spatial)} is not divisible by {name}={patch_size}")
    return tuple(s // patch_size for s in spatial)


def random_patch_mask(batch: int, num_patches: int, ratio: float, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Per-sample random patch masks with an exact masked count.

    Args:
        batch: B.
        num_patches: N patches per sample.
        ratio: masked fraction in (0, 1); each sample masks exactly ``round(ratio * N)`` patches, at least 1 and at
            most ``N - 1`` (so the encoder always sees a patch and the loss always has one).
        generator: the random stream (same seed -> same masks).

    Returns:
        ``(mask [B, N] bool, True = masked; ids_shuffle [B, N] long)``: ``ids_shuffle[:, :N - n_masked]`` are the
        kept patches in MAE order (ascending noise), the rest the masked ones.
    """
    check_mask_ratio(ratio)
    if num_patches < 2:
        raise ValueError(f"masking needs at least 2 patches per image, got {num_patches}")
    n_mask = min(max(int(round(ratio * num_patches)), 1), num_patches - 1)
    noise = torch.rand(batch, num_patches, generator=generator).to(device)
    ids_shuffle = torch.argsort(noise, dim=1)
    mask = torch.zeros(batch, num_patches, dtype=torch.bool, device=device)
    mask.scatter_(1, ids_shuffle[:, num_patches - n_mask:], True)
    return mask, ids_shuffle


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """``x [B, C, *spatial]`` (2D or 3D) -> patches ``[B, N, prod(p) * C]`` (grid row-major; ``(*p, C)`` inside)."""
    b, c, *spatial = x.shape
    grid = grid_shape(spatial, patch_size)
    p = patch_size
    if len(grid) == 2:
        h, w = grid
        x = x.reshape(b, c, h, p, w, p).permute(0, 2, 4, 3, 5, 1)
    else:
        d, h, w = grid
        x = x.reshape(b, c, d, p, h, p, w, p).permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(b, math.prod(grid), p ** len(grid) * c)


def unpatchify(patches: Tensor, patch_size: int, grid: Sequence[int], channels: int) -> Tensor:
    """Inverse of :func:`patchify`: ``[B, N, prod(p) * C]`` -> ``[B, C, *(g * p for g in grid)]``."""
    b, n, f = patches.shape
    p, nd = patch_size, len(grid)
    if n != math.prod(grid) or f != p ** nd * channels:
        raise ValueError(f"patches of shape {tuple(patches.shape)} do not fit grid {tuple(grid)} x patch {p} x "
                         f"{channels} channels")
    if nd == 2:
        h, w = grid
        x = patches.reshape(b, h, w, p, p, channels).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, channels, h * p, w * p)
    d, h, w = grid
    x = patches.reshape(b, d, h, w, p, p, p, channels).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, channels, d * p, h * p, w * p)


def patch_mask_to_pixels(mask: Tensor, grid: Sequence[int], patch_size: int) -> Tensor:
    """Patch mask ``[B, N]`` -> pixel mask ``[B, 1, *(g * p)]`` of the mask's dtype (every pixel of a patch)."""
    m = mask.reshape(mask.shape[0], 1, *grid)
    for dim in range(2, 2 + len(grid)):
        m = m.repeat_interleave(patch_size, dim=dim)
    return m


def norm_pix_target(patches: Tensor, eps: float = NORM_PIX_EPS) -> Tensor:
    """MAE's normalised-pixel target: each patch ``(x - mean) / sqrt(var + eps)`` over its own values (unbiased=False
    variance, as ``torch.var(unbiased=True)`` in MAE differs only by n/(n-1); we use the population variance and
    say so). Shape ``[B, N, F]`` kept."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, unbiased=False)
    return (patches - mean) / torch.sqrt(var + eps)


def masked_patch_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """MAE loss: ``sum_i mask_i * mean_f (pred_if - target_if)^2 / sum_i mask_i`` over ``[B, N, F]`` / ``[B, N]``.

    Zero when the masked patches are reproduced exactly, whatever the visible ones are."""
    if pred.shape != target.shape or pred.shape[:2] != mask.shape:
        raise ValueError(f"pred {tuple(pred.shape)}, target {tuple(target.shape)} and mask {tuple(mask.shape)} "
                         "do not match")
    per_patch = (pred - target).pow(2).mean(dim=-1)
    m = mask.to(per_patch.dtype)
    return (per_patch * m).sum() / m.sum().clamp_min(1.0)


def masked_pixel_loss(pred: Tensor, target: Tensor, pixel_mask: Tensor, kind: str = "mse") -> Tensor:
    """Loss on masked pixels only: ``sum(err * M) / (sum(M) + 1e-5) / C`` with ``err`` = |d| (``"l1"``, SimMIM [V])
    or d^2 (``"mse"``, U-Net inpainting, de Mooij et al. 2024 [V small-scale-ssl.md]).

    Args:
        pred, target: ``[B, C, *spatial]``.
        pixel_mask: ``[B, 1, *spatial]`` (1 = masked), broadcast over channels.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    if kind == "l1":
        err = (pred - target).abs()
    elif kind == "mse":
        err = (pred - target).pow(2)
    else:
        raise ValueError(f"loss kind must be 'l1' or 'mse', got {kind!r}")
    m = pixel_mask.to(err.dtype)
    return (err * m).sum() / (m.sum() + 1e-5) / pred.shape[1]
