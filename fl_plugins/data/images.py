"""PNG/JPEG image folders described by a CSV of labels: reading the CSV, reading the images, the torch dataset.

A hospital export is often a folder of PNG/JPEG files plus a CSV: one row per image, the image path relative to
the CSV, and either a class label (classification) or the path of a mask image whose pixel values are class indices
(segmentation); optionally a patient id, so that one patient's images stay on one site. ``flssl split --dataset
labels.csv`` turns it into per-site datalists of format ``"images"`` (:func:`fl_plugins.data.split.split_images_csv`);
:class:`ImageDataset` reads them.

Images are read with Pillow: grey by default (RGB by ITU-R BT.601 luma, as for MedMNIST), 3 channels when the
datalist says ``"rgb": true`` (grey files are then repeated to 3 channels); normalised per image by the datalist's
modality preset (``unit``: min-max to [0, 1], the default) and resized to ``S x S`` (bilinear with antialiasing;
masks nearest-exact, so only class values occur).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from fl_plugins.data.decathlon import unique_ids
from fl_plugins.data.errors import DataError
from fl_plugins.data.presets import get_preset

__all__ = ["ImageDataset", "CSVRow", "read_labels_csv", "read_image_array", "read_mask_array", "image_file_channels",
           "DEFAULT_COLUMNS", "IMAGE_SUFFIXES"]

#: CSV column names used when the user names none (``flssl split --image-column ...`` to change them)
DEFAULT_COLUMNS = {"image": "image", "label": "label", "mask": "mask", "patient": "patient"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as fl_plugins.data.medmnist
_HIGH_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # 16-bit / 32-bit grey: values read as they are
_GREY = ("L", "LA", "1")


def _open(path: str | Path, what: str) -> Any:
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what} file {str(p)!r} does not exist")
    try:
        im = Image.open(p)
        im.load()
    except Exception as e:  # UnidentifiedImageError (OSError), truncated files, DecompressionBombError ...
        raise DataError(f"{what} file {str(p)!r} is not a readable PNG/JPEG image: {type(e).__name__}: {e}") from e
    return im


def image_file_channels(path: str | Path) -> int:
    """3 for a colour image file, 1 for a grey one, from the file's header (pixels are not decoded)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            mode = im.mode
    except Exception as e:
        raise DataError(f"image file {str(path)!r} is not a readable PNG/JPEG image: {type(e).__name__}: {e}") from e
    return 1 if mode in _GREY + _HIGH_DEPTH else 3


def read_image_array(path: str | Path, rgb: bool = False) -> np.ndarray:
    """Pixel values of an image file as float32 ``[C, H, W]`` (not normalised).

    ``rgb=False``: one channel (colour by BT.601 luma); ``rgb=True``: three channels (grey files repeated).
    """
    im = _open(path, "image")
    if im.mode in _HIGH_DEPTH or im.mode in _GREY:
        a = np.asarray(im if im.mode in _HIGH_DEPTH else im.convert("L"), dtype=np.float32)
        if a.ndim != 2:
            raise DataError(f"image file {str(path)!r}: unexpected pixel array shape {a.shape} (mode {im.mode})")
        a = a[None]
        return np.repeat(a, 3, axis=0) if rgb else a
    a = np.asarray(im.convert("RGB"), dtype=np.float32)  # [H, W, 3]; palette / CMYK / RGBA converted
    return np.ascontiguousarray(a.transpose(2, 0, 1)) if rgb else (a @ _LUMA)[None]


def read_mask_array(path: str | Path) -> np.ndarray:
    """Class indices of a mask image as int64 ``[H, W]`` (grey / palette index / 16-bit values; a colour mask is
    accepted only when its three channels are equal)."""
    im = _open(path, "mask")
    if im.mode in ("RGB", "RGBA"):
        a = np.asarray(im.convert("RGB"))
        if not ((a[..., 0] == a[..., 1]).all() and (a[..., 0] == a[..., 2]).all()):
            raise DataError(f"mask file {str(path)!r} is a colour image: a mask's pixel values must be class indices "
                            "(save it as a grey or palette PNG, 0 = background, 1, 2, ... = classes)")
        a = a[..., 0]
    elif im.mode == "LA":
        a = np.asarray(im.convert("L"))
    else:  # L, P (palette indices), 1, I;16, I, F
        a = np.asarray(im)
    if a.ndim != 2:
        raise DataError(f"mask file {str(path)!r}: unexpected pixel array shape {a.shape} (mode {im.mode})")
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
            raise DataError(f"mask file {str(path)!r} holds non-integer values: a mask's pixel values are class "
                            "indices")
    return a.astype(np.int64)


# ------------------------------------------------------------------------------------------------------------ CSV
@dataclass(frozen=True)
class CSVRow:
    """One data row of a labels CSV: ``row`` is 1-based over the data rows, ``line`` the line in the file."""

    row: int
    line: int
    values: dict[str, str]

    def where(self, csv_path: str | Path) -> str:
        return f"{str(csv_path)!r}, row {self.row} (line {self.line})"


def read_labels_csv(path: str | Path) -> tuple[list[str], list[CSVRow]]:
    """The columns and rows of a labels CSV (UTF-8, an Excel BOM allowed; ``,``, ``;`` or tab separated; cells
    stripped of spaces; empty lines skipped).

    Raises:
        DataError: missing / unreadable / empty file, no data rows, a row with more cells than the header.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"labels CSV {str(p)!r} does not exist")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"labels CSV {str(p)!r} cannot be read as UTF-8 text: {e}") from e
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise DataError(f"labels CSV {str(p)!r} is empty: expected a header line (e.g. 'image,label') and rows")
    header = lines[0]
    delimiter = max((",", ";", "\t"), key=header.count) if any(d in header for d in ",;\t") else ","
    reader = csv.reader(lines, delimiter=delimiter)
    columns = [c.strip() for c in next(reader)]
    rows: list[CSVRow] = []
    for cells in reader:
        line = reader.line_num
        if not any(c.strip() for c in cells):
            continue
        if len(cells) > len(columns):
            raise DataError(f"{str(p)!r}, line {line}: {len(cells)} cells but the header has {len(columns)} columns "
                            f"{columns}")
        values = {c: (cells[i].strip() if i < len(cells) else "") for i, c in enumerate(columns)}
        rows.append(CSVRow(row=len(rows) + 1, line=line, values=values))
    if not rows:
        raise DataError(f"labels CSV {str(p)!r} has a header ({columns}) but no data rows")
    return columns, rows


# -------------------------------------------------------------------------------------------------------- dataset
class ImageDataset(Dataset):
    """PNG/JPEG images of a datalist of format ``"images"``.

    Items (``docs/contracts.md``): classification ``image`` float32 ``[C, S, S]`` and ``label`` int64 scalar;
    segmentation the 2D-slice item: ``image`` ``[C, S, S]``, ``label`` int64 ``[S, S]``, ``volume_id`` (the image
    file name without suffix, made unique), ``slice_index`` 0, ``num_slices`` 1. ``C`` is 1, or 3 with
    ``keep_rgb``. ``label`` only with ``with_labels``.

    Args:
        entries: datalist entries ``{"image"[, "label"]}`` (absolute paths; a classification label is a class id,
            a segmentation label the mask file).
        task: ``"classification"`` or ``"segmentation"``.
        preset: modality preset applied per image before resizing (``"unit"``: min-max to [0, 1]).
        image_size: output side ``S`` (bilinear with antialiasing; masks nearest-exact); None keeps the native size
            (images of different sizes then do not batch).
        with_labels: return labels; every entry must then have one.
        keep_rgb: three channels (the datalist's ``"rgb": true``) instead of one grey channel.
        cache: keep each decoded, resized item in memory after its first read.
    """

    def __init__(
        self,
        entries: Sequence[dict[str, Any]],
        task: str,
        preset: str = "unit",
        image_size: int | None = 64,
        with_labels: bool = True,
        keep_rgb: bool = False,
        cache: bool = True,
    ) -> None:
        self.entries = list(entries)
        if not self.entries:
            raise DataError("ImageDataset: no entries (the datalist section is empty)")
        if task not in ("classification", "segmentation"):
            raise DataError(f"ImageDataset: task must be 'classification' or 'segmentation', got {task!r}")
        if image_size is not None and (not isinstance(image_size, int) or isinstance(image_size, bool)
                                       or image_size < 1):
            raise DataError(f"ImageDataset: image_size must be a positive integer or None, got {image_size!r}")
        for i, e in enumerate(self.entries):
            if not isinstance(e, dict) or "image" not in e:
                raise DataError(f"ImageDataset: entry {i} has no 'image' field: {e!r}")
            if with_labels and e.get("label") is None:
                raise DataError(f"ImageDataset: entry {i} ({e['image']!r}) has no 'label' but with_labels=True; "
                                "select labelled entries first (fl_plugins.data.labelled_entries)")
        self.task = task
        self.normalise = get_preset(preset)
        self.preset = preset
        self.image_size = image_size
        self.with_labels = with_labels
        self.keep_rgb = keep_rgb
        self.cache = cache
        self.volume_ids = unique_ids([Path(e["image"]).stem for e in self.entries])
        self._cache: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def _load(self, i: int) -> dict[str, Any]:
        e = self.entries[i]
        x = torch.from_numpy(np.ascontiguousarray(self.normalise(read_image_array(e["image"], self.keep_rgb))))
        size = (self.image_size, self.image_size) if self.image_size is not None else tuple(x.shape[-2:])
        item: dict[str, Any] = {}
        if self.task == "segmentation" and self.with_labels:
            m = read_mask_array(e["label"])
            if m.shape != tuple(x.shape[-2:]):
                raise DataError(f"image {e['image']!r} is {x.shape[-1]}x{x.shape[-2]} pixels but its mask "
                                f"{e['label']!r} is {m.shape[1]}x{m.shape[0]}")
            lab = torch.from_numpy(m)
            if tuple(lab.shape) != size:
                lab = F.interpolate(lab[None, None].float(), size=size, mode="nearest-exact")[0, 0].round().long()
            item["label"] = lab
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)[0]
        item["image"] = x.float().contiguous()
        if self.task == "segmentation":
            item.update(volume_id=self.volume_ids[i], slice_index=0, num_slices=1)
        elif self.with_labels:
            item["label"] = torch.tensor(int(e["label"]), dtype=torch.int64)
        return item

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self._cache.get(i)
        if item is None:
            item = self._load(i)
            if self.cache:
                self._cache[i] = item
        return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in item.items()}
