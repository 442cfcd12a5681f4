"""MedMNIST ``.npz`` files (official keys) as a classification dataset.

An official MedMNIST v2 file holds ``{train,val,test}_images`` (uint8, ``[N, 28, 28]`` for 2D gray,
``[N, 28, 28, 3]`` for 2D RGB, ``[N, 28, 28, 28]`` for 3D) and ``{train,val,test}_labels`` (``[N, 1]``).
Datalist entries point at one image: ``{"npz", "split", "index", "label", "labelled"}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from fl_plugins.data.errors import DataError

__all__ = ["MedMNISTDataset", "load_npz", "MEDMNIST_KEYS"]

MEDMNIST_KEYS = tuple(f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels"))

# ITU-R BT.601 luma weights: RGB MedMNIST sets (PathMNIST, DermaMNIST, ...) become one gray channel, so every
# classification item is [1, H, W] as the data contract requires.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Read every array of a MedMNIST ``.npz`` into memory, checking the official keys.

    Raises:
        DataError: missing / unreadable file, or a missing ``{split}_images`` / ``{split}_labels`` key.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"MedMNIST file {str(p)!r} does not exist")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise DataError(f"MedMNIST file {str(p)!r} is not a readable .npz: {type(e).__name__}: {e}") from e
    missing = [k for k in MEDMNIST_KEYS if k not in arrays]
    if missing:
        raise DataError(f"MedMNIST file {str(p)!r} lacks keys {missing}; it has {sorted(arrays)}")
    for s in ("train", "val", "test"):
        if len(arrays[f"{s}_images"]) != len(arrays[f"{s}_labels"]):
            raise DataError(f"MedMNIST file {str(p)!r}: {s}_images has {len(arrays[f'{s}_images'])} items but "
                            f"{s}_labels has {len(arrays[f'{s}_labels'])}")
        lab, img = arrays[f"{s}_labels"], arrays[f"{s}_images"]
        integral = lab.dtype == np.bool_ or np.issubdtype(lab.dtype, np.integer) or (
            np.issubdtype(lab.dtype, np.floating) and bool(np.all(np.isfinite(lab))) and bool(np.all(lab == np.round(lab))))
        if not integral:
            example = lab.reshape(-1)[0].item() if lab.size else None
            raise DataError(f"MedMNIST file {str(p)!r}: {s}_labels are {lab.dtype} (e.g. {example!r}), not class ids: "
                            "store integers 0..C-1 (e.g. np.unique(labels, return_inverse=True)[1]) and save the "
                            ".npz again")
        if lab.size and lab.min() < 0:
            raise DataError(f"MedMNIST file {str(p)!r}: {s}_labels has a negative class id {lab.min().item()}; class "
                            "ids are 0..C-1")
        if not (img.dtype == np.bool_ or np.issubdtype(img.dtype, np.number)):
            raise DataError(f"MedMNIST file {str(p)!r}: {s}_images are {img.dtype}, not pixel values: store numbers "
                            "(uint8 0..255 as MedMNIST does)")
    return arrays


class MedMNISTDataset(Dataset):
    """Images of MedMNIST ``.npz`` files, scaled to [0, 1].

    Item: ``image`` float32 ``[1, H, W]`` (2D; RGB converted to gray unless ``keep_rgb``: then ``[3, H, W]``) or
    ``[1, D, H, W]`` (3D), ``label`` int64 scalar (only with ``with_labels``).

    Each ``.npz`` is read lazily on first use and kept in memory (28x28 MedMNIST files are a few MB).

    Args:
        entries: datalist entries ``{"npz", "split", "index"[, "label"]}``; the entry's ``label`` wins over the
            file's (a split may relabel), else ``{split}_labels[index, 0]`` is used.
        with_labels: return ``label``.
        image_size: resize spatial dims to this side (bilinear 2D / trilinear 3D); None keeps the native size.
        keep_rgb: keep RGB images as 3 channels (the datalist's ``"rgb": true``); grey images are refused then.
    """

    def __init__(
        self,
        entries: Sequence[dict[str, Any]],
        with_labels: bool = True,
        image_size: int | None = None,
        keep_rgb: bool = False,
    ) -> None:
        self.entries = list(entries)
        if not self.entries:
            raise DataError("MedMNISTDataset: no entries (the datalist section is empty)")
        for i, e in enumerate(self.entries):
            if not isinstance(e, dict) or any(k not in e for k in ("npz", "split", "index")):
                raise DataError(f"MedMNISTDataset: entry {i} needs 'npz', 'split' and 'index', got {e!r}")
        if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
            raise DataError(f"MedMNISTDataset: image_size must be a positive integer or None, got {image_size!r}")
        self.with_labels = with_labels
        self.image_size = image_size
        self.keep_rgb = keep_rgb
        self._arrays: dict[str, dict[str, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def _file(self, path: str) -> dict[str, np.ndarray]:
        arrays = self._arrays.get(path)
        if arrays is None:
            arrays = self._arrays[path] = load_npz(path)
        return arrays

    def __getitem__(self, i: int) -> dict[str, Any]:
        e = self.entries[i]
        arrays = self._file(e["npz"])
        images = arrays[f"{e['split']}_images"]
        idx = int(e["index"])
        if not 0 <= idx < len(images):
            raise DataError(f"{e['npz']!r}: index {idx} out of range for {e['split']}_images ({len(images)} images)")
        raw = images[idx]
        scale = 255.0 if raw.dtype == np.uint8 else 1.0  # MedMNIST stores uint8 0..255
        img = raw.astype(np.float32) / scale
        rgb = img.ndim == 3 and img.shape[-1] == 3
        if self.keep_rgb and not rgb:
            raise DataError(f"{e['npz']!r}: the datalist asks for RGB ('rgb': true) but {e['split']}_images are not "
                            f"RGB (image shape {raw.shape})")
        if rgb and self.keep_rgb:  # [H, W, 3] -> [3, H, W]
            x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
        else:
            if rgb:  # 2D RGB [H, W, 3] -> gray [H, W]
                img = img @ _LUMA
            x = torch.from_numpy(np.ascontiguousarray(img))[None]  # [1, H, W] or [1, D, H, W]
        if self.image_size is not None and x.shape[-1] != self.image_size:
            mode = "bilinear" if x.ndim == 3 else "trilinear"  # x is [C, H, W] or [1, D, H, W]
            x = F.interpolate(x[None], size=(self.image_size,) * (x.ndim - 1), mode=mode, align_corners=False)[0]
        item: dict[str, Any] = {"image": x.float()}
        if self.with_labels:
            lab = e.get("label")
            if lab is None:
                lab = int(np.asarray(arrays[f"{e['split']}_labels"][idx]).reshape(-1)[0])
            item["label"] = torch.tensor(int(lab), dtype=torch.int64)
        return item
