"""Torch datasets over Decathlon-layout NIfTI volumes: 2D slices (segmentation / SSL) and whole 3D volumes.

Item formats are those of ``docs/contracts.md``. Slices are taken along the LAST array axis (ACDC's short-axis
slice index), each volume is normalised as a whole by its modality preset first, then every slice is zero-padded
to a square (centred) and resized to ``image_size x image_size``. Whole volumes (a datalist with ``"volumes":
true``, for 3D methods) are normalised the same way and fitted into an ``image_size^3`` cube by MONAI's ``Resize``
and ``SpatialPad`` (:func:`resize_volume`). Both read the files with the same nibabel reader
(:mod:`fl_plugins.data.nifti`), so a slice of a volume item is the matching slice item's voxels before resizing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from fl_plugins.data.errors import DataError
from fl_plugins.data.nifti import nifti_stem, read_image, read_label, read_shape
from fl_plugins.data.presets import get_preset

__all__ = ["SliceDataset", "VolumeDataset", "unique_ids", "slices_by_volume", "pad_to_square", "resize_slices", "resize_volume",
           "volume_id_of"]


def volume_id_of(entry: dict[str, Any]) -> str:
    """A volume's id: its image file name without ``.nii.gz`` (e.g. ``patient003_frame01``)."""
    return nifti_stem(entry["image"])


def unique_ids(ids: list[str]) -> list[str]:
    """Make ids unique (two folders may hold files with the same name): repeats get ``#2``, ``#3``, ..."""
    seen: dict[str, int] = {}
    out = []
    for i in ids:
        seen[i] = seen.get(i, 0) + 1
        out.append(i if seen[i] == 1 else f"{i}#{seen[i]}")
    return out


def _check_entries(entries: Sequence[dict[str, Any]], with_labels: bool, who: str) -> list[dict[str, Any]]:
    entries = list(entries)
    if not entries:
        raise DataError(f"{who}: no entries (the datalist section is empty)")
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "image" not in e:
            raise DataError(f"{who}: entry {i} has no 'image' field: {e!r}")
        if with_labels and e.get("label") is None:
            raise DataError(f"{who}: entry {i} ({e['image']!r}) has no 'label' but with_labels=True; "
                            f"select labelled entries first (fl_plugins.data.labelled_entries)")
    return entries


def pad_to_square(x: torch.Tensor) -> torch.Tensor:
    """Zero-pad the last two dims of ``[..., H, W]`` to ``[..., M, M]``, ``M = max(H, W)``, content centred."""
    h, w = x.shape[-2:]
    m = max(h, w)
    top, left = (m - h) // 2, (m - w) // 2
    return F.pad(x, (left, m - w - left, top, m - h - top))


def resize_slices(image: np.ndarray, label: np.ndarray | None, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pad to square and resize every slice of a volume.

    Images use bilinear interpolation with antialiasing (ACDC slices of up to 512 px shrink to 64 px without
    aliasing); labels use ``nearest-exact`` (no half-pixel shift, class ids preserved).

    Args:
        image: float32 ``[H, W, D]`` (already normalised).
        label: int ``[H, W, D]`` or None.
        size: output side ``S``.

    Returns:
        image float32 ``[D, S, S]``; label int64 ``[D, S, S]`` or None.
    """
    img = pad_to_square(torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float())  # [D, M, M]
    if img.shape[-1] != size:
        img = F.interpolate(img[:, None], size=(size, size), mode="bilinear", align_corners=False,
                            antialias=True)[:, 0]
    lab = None
    if label is not None:
        lab = pad_to_square(torch.from_numpy(np.ascontiguousarray(label.transpose(2, 0, 1))).float())
        if lab.shape[-1] != size:
            lab = F.interpolate(lab[:, None], size=(size, size), mode="nearest-exact")[:, 0]
        lab = lab.round().long()
    return img.contiguous(), lab


class SliceDataset(Dataset):
    """2D slices of NIfTI volumes along the last axis.

    Item: ``image`` float32 ``[1, S, S]``, ``label`` int64 ``[S, S]`` (only with ``with_labels``), ``volume_id``
    str, ``slice_index`` int, ``num_slices`` int. Items are ordered volume by volume, slice 0 first.

    Args:
        entries: datalist entries with absolute ``image`` (and ``label``) paths.
        preset: modality preset name (``"mr"``, ``"ct"``, ``"unit"``), applied per whole volume.
        image_size: output side ``S`` in pixels (64: the CPU-scale size of methods-spec 9.3 / 5.2).
        with_labels: return labels; then every entry must have a ``label``.
        cache: keep each volume's resized slices in memory after its first load (a 64x64 slice is 16 KiB);
            otherwise every item re-reads its volume.
        preset_kwargs: parameters of the preset (``level``/``width`` for ``"ct"``).
    """

    def __init__(
        self,
        entries: Sequence[dict[str, Any]],
        preset: str = "unit",
        image_size: int = 64,
        with_labels: bool = True,
        cache: bool = True,
        preset_kwargs: dict[str, float] | None = None,
    ) -> None:
        if not isinstance(image_size, int) or image_size < 1:
            raise DataError(f"SliceDataset: image_size must be a positive integer, got {image_size!r}")
        self.entries = _check_entries(entries, with_labels, "SliceDataset")
        self.normalise = get_preset(preset, **(preset_kwargs or {}))
        self.preset = preset
        self.image_size = image_size
        self.with_labels = with_labels
        self.cache = cache
        self.volume_ids = unique_ids([volume_id_of(e) for e in self.entries])
        self.num_slices = [read_shape(e["image"])[2] for e in self.entries]  # header only
        self.index: list[tuple[int, int]] = [(v, s) for v, n in enumerate(self.num_slices) for s in range(n)]
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def __len__(self) -> int:
        return len(self.index)

    def load_volume(self, v: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised, resized slices of volume ``v``: image ``[D, S, S]``, label ``[D, S, S]`` or None."""
        if v in self._cache:
            return self._cache[v]
        e = self.entries[v]
        image = read_image(e["image"])
        label = None
        if self.with_labels:
            label = read_label(e["label"])
            if label.shape != image.shape:
                raise DataError(f"image {e['image']!r} has shape {image.shape} but label {e['label']!r} has shape "
                                f"{label.shape}")
        if image.shape[2] != self.num_slices[v]:
            raise DataError(f"image {e['image']!r} changed on disk: {image.shape[2]} slices, header said "
                            f"{self.num_slices[v]}")
        out = resize_slices(self.normalise(image), label, self.image_size)
        if self.cache:
            self._cache[v] = out
        return out

    def __getitem__(self, i: int) -> dict[str, Any]:
        v, s = self.index[i]
        img, lab = self.load_volume(v)
        item: dict[str, Any] = {
            "image": img[s][None].clone(),
            "volume_id": self.volume_ids[v],
            "slice_index": s,
            "num_slices": self.num_slices[v],
        }
        if lab is not None:
            item["label"] = lab[s].clone()
        return item


def resize_volume(image: np.ndarray, label: np.ndarray | None, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fit a volume into an ``S x S x S`` cube, aspect kept, with MONAI transforms.

    ``Resize(size_mode="longest")`` scales the longest side to ``S`` and the others by the same factor (images
    trilinear with MONAI's Gaussian anti-aliasing when shrinking; labels ``nearest-exact``: class ids kept, no
    half-voxel shift), then ``SpatialPad(method="symmetric")`` zero-pads the short sides to ``S``, content centred
    (the 3D version of the slice reader's pad-to-square + resize). Axes keep the file's order ``(H, W, D)``; voxel
    spacing is not used (as for slices).

    Args:
        image: float32 ``[H, W, D]`` (already normalised: the zero padding is background, as for slices).
        label: int ``[H, W, D]`` or None.
        size: output side ``S``.

    Returns:
        image float32 ``[1, S, S, S]``; label int64 ``[S, S, S]`` or None.
    """
    from monai.transforms import Resize, SpatialPad  # lazily: importing MONAI takes seconds (see presets)

    pad = SpatialPad(spatial_size=(size,) * 3, method="symmetric", mode="constant")

    def fit(x: np.ndarray, mode: str) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]  # [1, H, W, D]
        if max(t.shape[1:]) != size:
            t = Resize(spatial_size=size, size_mode="longest", mode=mode, anti_aliasing=mode == "trilinear",
                       align_corners=False if mode == "trilinear" else None)(t)
        t = pad(t)
        return (t.as_tensor() if hasattr(t, "as_tensor") else t).contiguous()  # MetaTensor -> plain tensor

    img = fit(image, "trilinear").float()
    lab = fit(label, "nearest-exact")[0].round().long() if label is not None else None
    return img, lab


class VolumeDataset(Dataset):
    """Whole 3D volumes, at their native size or fitted into an ``S^3`` cube (the datalist's ``"volumes": true``).

    Item: ``image`` float32 ``[1, H, W, D]`` (native) or ``[1, S, S, S]`` (``image_size=S``, see
    :func:`resize_volume`: aspect kept, zero-padded), ``label`` int64 ``[H, W, D]`` / ``[S, S, S]`` (only with
    ``with_labels``), ``volume_id`` str. Each volume is normalised as a whole by its modality preset first, as
    for slices.

    Args:
        entries: datalist entries with absolute ``image`` (and ``label``) paths.
        preset: modality preset name, applied per volume.
        image_size: output side ``S`` (None: native size; volumes of different sizes then do not batch).
        with_labels: return labels; then every entry must have a ``label``.
        cache: keep loaded (resized) volumes in memory (a 32^3 volume is 128 KiB).
        preset_kwargs: parameters of the preset.
    """

    def __init__(
        self,
        entries: Sequence[dict[str, Any]],
        preset: str = "unit",
        with_labels: bool = True,
        cache: bool = False,
        preset_kwargs: dict[str, float] | None = None,
        image_size: int | None = None,
    ) -> None:
        if image_size is not None and (not isinstance(image_size, int) or isinstance(image_size, bool)
                                       or image_size < 1):
            raise DataError(f"VolumeDataset: image_size must be a positive integer or None, got {image_size!r}")
        self.entries = _check_entries(entries, with_labels, "VolumeDataset")
        self.normalise = get_preset(preset, **(preset_kwargs or {}))
        self.preset = preset
        self.image_size = image_size
        self.with_labels = with_labels
        self.cache = cache
        self.volume_ids = unique_ids([volume_id_of(e) for e in self.entries])
        self._cache: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def _load(self, i: int) -> dict[str, Any]:
        e = self.entries[i]
        image = self.normalise(read_image(e["image"]))
        label = None
        if self.with_labels:
            label = read_label(e["label"])
            if label.shape != image.shape:
                raise DataError(f"image {e['image']!r} has shape {image.shape} but label {e['label']!r} has shape "
                                f"{label.shape}")
        if self.image_size is None:
            img = torch.from_numpy(np.ascontiguousarray(image))[None]
            lab = torch.from_numpy(label) if label is not None else None
        else:
            img, lab = resize_volume(image, label, self.image_size)
        item: dict[str, Any] = {"image": img, "volume_id": self.volume_ids[i]}
        if lab is not None:
            item["label"] = lab
        return item

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i in self._cache:  # copies: a consumer may change its item in place
            return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in self._cache[i].items()}
        item = self._load(i)
        if self.cache:
            self._cache[i] = item
            return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in item.items()}
        return item


def slices_by_volume(dataset: SliceDataset | Sequence[dict[str, Any]]) -> dict[str, list[int]]:
    """Group a slice dataset's item indices per volume, in slice order (for per-volume Dice).

    Args:
        dataset: a :class:`SliceDataset` (uses its index, no volume is read) or any sequence of slice items.

    Returns:
        ``{volume_id: [item index of slice 0, slice 1, ...]}`` in order of first appearance.
    """
    groups: dict[str, list[tuple[int, int]]] = {}
    if isinstance(dataset, SliceDataset):
        pairs = ((dataset.volume_ids[v], s, i) for i, (v, s) in enumerate(dataset.index))
    else:
        pairs = ((item["volume_id"], int(item["slice_index"]), i) for i, item in enumerate(dataset))
    for vid, s, i in pairs:
        groups.setdefault(vid, []).append((s, i))
    return {vid: [i for _, i in sorted(v)] for vid, v in groups.items()}
