"""Modality intensity presets (per-volume normalisation) used instead of ImageNet mean/std.

Medical intensities have no fixed scale (MR: arbitrary scanner units; CT: Hounsfield units), so each volume is
normalised on its own before slicing. The three presets mirror MONAI's ``NormalizeIntensity(nonzero=True)``,
``ScaleIntensityRange(clip=True)`` and ``ScaleIntensity(minv=0, maxv=1)``; they are written with numpy here
because importing MONAI costs ~10 s per process on the project's 2-core CI machine and every FLARE site process
would pay it for three one-line formulas.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np

from fl_plugins.data.errors import DataError

__all__ = ["PRESETS", "CT_WINDOW_LEVEL", "CT_WINDOW_WIDTH", "get_preset", "mr_zscore", "ct_window", "unit_minmax"]

# Soft-tissue (abdomen) CT window, level 40 HU / width 400 HU, i.e. [-160, 240] HU: the standard radiology
# soft-tissue window (Radiopaedia, "Windowing (CT)": soft tissues W 350-400, L 20-60; the same range as the
# [-175, 250] HU clip used by MONAI's spleen/BTCV tutorials up to rounding).
CT_WINDOW_LEVEL: float = 40.0
CT_WINDOW_WIDTH: float = 400.0

# Standard deviations at or below this are treated as zero (a constant volume): then the std is replaced by 1,
# as MONAI's NormalizeIntensity does, so a blank volume maps to zeros instead of NaN/inf.
_STD_EPS = 1e-8


def mr_zscore(volume: np.ndarray) -> np.ndarray:
    """Z-score over the nonzero voxels of one volume ("mr" preset).

    Mean and std are computed over voxels ``!= 0`` (background air / skull-stripped outside is excluded, as in
    nnU-Net and MONAI ``NormalizeIntensity(nonzero=True)``); nonzero voxels become ``(v - mean) / std`` and zero
    voxels stay 0. A constant volume uses std = 1; an all-zero volume stays all zeros.

    Args:
        volume: any-shape array, e.g. ``[H, W, D]``.

    Returns:
        float32 array of the same shape.
    """
    v = np.asarray(volume, dtype=np.float32)
    out = np.zeros_like(v)
    mask = v != 0
    if not mask.any():
        return out
    vals = v[mask].astype(np.float64)
    mean = float(vals.mean())
    std = float(vals.std())
    if std <= _STD_EPS:
        std = 1.0
    out[mask] = ((vals - mean) / std).astype(np.float32)
    return out


def ct_window(volume: np.ndarray, level: float = CT_WINDOW_LEVEL, width: float = CT_WINDOW_WIDTH) -> np.ndarray:
    """Clip to the window ``[level - width/2, level + width/2]`` (HU) and scale it linearly to [0, 1] ("ct").

    Args:
        volume: any-shape array in Hounsfield units.
        level: window centre in HU (default 40, soft tissue; see module constants).
        width: window width in HU (default 400); must be > 0.

    Returns:
        float32 array of the same shape with values in [0, 1].
    """
    if not width > 0:
        raise DataError(f"modality preset 'ct': window width must be > 0, got width={width!r}")
    lo = float(level) - float(width) / 2.0
    v = np.asarray(volume, dtype=np.float32)
    return np.clip((v - lo) / float(width), 0.0, 1.0).astype(np.float32)


def unit_minmax(volume: np.ndarray) -> np.ndarray:
    """Min-max scale one volume to [0, 1] ("unit" preset); a constant volume maps to zeros.

    Args:
        volume: any-shape array.

    Returns:
        float32 array of the same shape with values in [0, 1].
    """
    v = np.asarray(volume, dtype=np.float32)
    if v.size == 0:
        return v.copy()
    lo, hi = float(v.min()), float(v.max())
    if hi - lo <= _STD_EPS:
        return np.zeros_like(v)
    return ((v - lo) / (hi - lo)).astype(np.float32)


PRESETS: dict[str, Callable[..., np.ndarray]] = {"mr": mr_zscore, "ct": ct_window, "unit": unit_minmax}


def get_preset(name: str, **kwargs: float) -> Callable[[np.ndarray], np.ndarray]:
    """Return the per-volume normalisation function of a modality preset.

    Args:
        name: ``"mr"`` (z-score over nonzero voxels), ``"ct"`` (window, kwargs ``level``/``width`` in HU) or
            ``"unit"`` (min-max to [0, 1]).
        **kwargs: preset parameters (only ``"ct"`` takes any).

    Returns:
        ``fn(volume: np.ndarray) -> np.ndarray`` (float32, same shape).

    Raises:
        DataError: unknown preset name or parameters.
    """
    fn = PRESETS.get(name) if isinstance(name, str) else None
    if fn is None:
        raise DataError(f"unknown modality_preset {name!r}; valid presets: {sorted(PRESETS)}")
    if kwargs:
        if name != "ct" or set(kwargs) - {"level", "width"}:
            raise DataError(
                f"modality_preset {name!r} does not take parameters {sorted(kwargs)} (only 'ct' takes level, width)"
            )
        if "width" in kwargs and not float(kwargs["width"]) > 0:
            raise DataError(f"modality preset 'ct': window width must be > 0, got width={kwargs['width']!r}")
        return partial(fn, **kwargs)
    return fn
