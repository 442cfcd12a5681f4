"""Reading NIfTI volumes with nibabel, turning every failure into a :class:`DataError` that names the file."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from fl_plugins.data.errors import DataError

__all__ = ["read_shape", "read_image", "read_label", "nifti_stem"]


def nifti_stem(path: str | Path) -> str:
    """File name without ``.nii.gz`` / ``.nii`` (e.g. ``patient003_frame01``): the volume / case id."""
    name = Path(path).name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def _load(path: str | Path, what: str) -> nib.spatialimages.SpatialImage:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what} file {str(p)!r} does not exist")
    try:
        return nib.load(str(p))
    except Exception as e:  # nibabel raises ImageFileError, OSError, EOFError, gzip/zlib errors ...
        raise DataError(f"{what} file {str(p)!r} is not a readable NIfTI volume: {type(e).__name__}: {e}") from e


def _as_3d(arr: np.ndarray, path: str | Path, what: str) -> np.ndarray:
    """``[H, W]`` -> ``[H, W, 1]``; ``[H, W, D, 1]`` -> ``[H, W, D]``; anything else non-3D is an error."""
    if arr.ndim == 2:
        return arr[..., None]
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise DataError(f"{what} file {str(path)!r} has shape {tuple(arr.shape)}; expected a 2D or 3D volume")
    return arr


def read_shape(path: str | Path, what: str = "image") -> tuple[int, int, int]:
    """Spatial shape ``(H, W, D)`` from the header only (no voxel data read)."""
    img = _load(path, what)
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 2:
        shape = (*shape, 1)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise DataError(f"{what} file {str(path)!r} has shape {shape}; expected a 2D or 3D volume")
    return shape  # type: ignore[return-value]


def read_image(path: str | Path) -> np.ndarray:
    """Voxel intensities as float32 ``[H, W, D]`` (scaling slope/intercept applied)."""
    img = _load(path, "image")
    try:
        arr = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as e:  # truncated / corrupt compressed data surfaces only when the voxels are read
        raise DataError(f"image file {str(path)!r} is corrupt (cannot read voxels): {type(e).__name__}: {e}") from e
    if not np.isfinite(arr).all():
        raise DataError(f"image file {str(path)!r} contains NaN or infinite voxel values")
    return _as_3d(arr, path, "image")


def read_label(path: str | Path) -> np.ndarray:
    """Label map as int64 ``[H, W, D]``; non-integer values are an error (a label file must hold class ids)."""
    img = _load(path, "label")
    try:
        arr = np.asanyarray(img.dataobj)
    except Exception as e:
        raise DataError(f"label file {str(path)!r} is corrupt (cannot read voxels): {type(e).__name__}: {e}") from e
    if not np.issubdtype(arr.dtype, np.integer):
        rounded = np.rint(arr)
        if not np.array_equal(rounded, arr):
            bad = arr[rounded != arr].ravel()[:3].tolist()
            raise DataError(f"label file {str(path)!r} has non-integer values, e.g. {bad}")
        arr = rounded
    return _as_3d(arr.astype(np.int64), path, "label")
