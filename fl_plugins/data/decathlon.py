"""Torch datasets over Decathlon-layout NIfTI volumes: 2D slices (segmentation / SSL) and whole 3D volumes.

Item formats are those of ``docs/contracts.md``. Slices are taken along the LAST array axis (ACDC's short-axis
slice index), each volume is normalised as a whole by its modality preset first, then every slice is zero-padded
to a square (centred) and resized to ``image_size x image_size``.
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

__all__ = ["SliceDataset", "VolumeDataset", "slices_by_volume", "pad_to_square", "resize_slices", "volume_id_of"]


def volume_id_of(entry: dict[str, Any]) -> str:
    """A volume's id: its image file name without ``.nii.gz`` (e.g. ``patient003_frame01``)."""
    return nifti_stem(entry["image"])


def _unique_ids(ids: list[str]) -> list[str]:
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
        self.volume_ids = _unique_ids([volume_id_of(e) for e in self.entries])
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


class VolumeDataset(Dataset):
    """Whole 3D volumes at their native size.

    Item: ``image`` float32 ``[1, H, W, D]``, ``label`` int64 ``[H, W, D]`` (only with ``with_labels``),
    ``volume_id`` str.

    Args:
        entries: datalist entries with absolute ``image`` (and ``label``) paths.
        preset: modality preset name, applied per volume.
        with_labels: return labels; then every entry must have a ``label``.
        cache: keep loaded volumes in memory.
        preset_kwargs: parameters of the preset.
    """

    def __init__(
        self,
        entries: Sequence[dict[str, Any]],
        preset: str = "unit",
        with_labels: bool = True,
        cache: bool = False,
        preset_kwargs: dict[str, float] | None = None,
    ) -> None:
        self.entries = _check_entries(entries, with_labels, "VolumeDataset")
        self.normalise = get_preset(preset, **(preset_kwargs or {}))
        self.with_labels = with_labels
        self.cache = cache
        self._cache: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i in self._cache:
            return dict(self._cache[i])
        e = self.entries[i]
        image = self.normalise(read_image(e["image"]))
        item: dict[str, Any] = {"image": torch.from_numpy(np.ascontiguousarray(image))[None],
                                "volume_id": volume_id_of(e)}
        if self.with_labels:
            label = read_label(e["label"])
            if label.shape != image.shape:
                raise DataError(f"image {e['image']!r} has shape {image.shape} but label {e['label']!r} has shape "
                                f"{label.shape}")
            item["label"] = torch.from_numpy(label)
        if self.cache:
            self._cache[i] = item
        return dict(item)


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
