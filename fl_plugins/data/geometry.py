"""What a site's images are, read from the files' headers only: 2D or 3D, and how many channels in the file.

Used to catch a mismatch between the data and the job (a 3D MedMNIST file given to a 2D model, RGB images given to
a grey model) in ``flssl check-data``, in the pre-flight of ``flssl simulate`` and when a site starts, before any
training, with the setting to change.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fl_plugins.data.errors import DataError

__all__ = ["DataGeometry", "data_geometry", "npz_array_shape"]


@dataclass(frozen=True)
class DataGeometry:
    """``spatial_dims``: 2 (slices / images) or 3 (volumes) as the dataset items come out; ``file_channels``:
    channels stored in the files (3 = RGB, converted to one grey channel by the data layer); ``source``: the file
    the answer was read from."""

    spatial_dims: int
    file_channels: int
    source: str


def npz_array_shape(path: str | Path, key: str) -> tuple[int, ...]:
    """Shape of array ``key`` in an ``.npz`` file, from its header (the array is not read)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z, z.open(f"{key}.npy") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, _ = read_header(f)  # header only
    except KeyError:
        raise DataError(f"{str(path)!r} has no array {key!r}") from None
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise DataError(f"cannot read the header of {key!r} in {str(path)!r}: {e}") from e
    return tuple(int(s) for s in shape)


def data_geometry(dl: dict[str, Any]) -> DataGeometry:
    """The geometry of a loaded datalist's training images (``load_datalist`` output).

    Decathlon segmentation data is read as 2D slices (1 channel), or as 3D volumes when the datalist says
    ``"volumes": true`` (``flssl split --volumes``; the source then names that field, so a message can say what to
    change). A MedMNIST file is 2D grey ``[N, H, W]``, 2D RGB ``[N, H, W, 3]`` or 3D ``[N, D, H, W]``. PNG/JPEG
    images (format ``images``) are 2D; their channels are the first image file's (3 with ``"rgb": true``).
    """
    if dl["format"] == "images":
        entries = dl["training"] or dl.get("validation") or dl.get("test") or []
        if not entries:
            raise DataError(f"datalist {dl.get('datalist_path')!r} has no entries to read the image geometry from")
        from fl_plugins.data.images import image_file_channels

        src = entries[0]["image"]
        return DataGeometry(spatial_dims=2, file_channels=3 if dl.get("rgb") else image_file_channels(src), source=src)
    if dl["format"] != "medmnist":
        path = str(dl.get("datalist_path", "?"))
        if dl.get("volumes"):
            return DataGeometry(spatial_dims=3, file_channels=1, source=f"{path}, \"volumes\": true")
        return DataGeometry(spatial_dims=2, file_channels=1, source=path)
    entries = dl["training"] or dl.get("validation") or dl.get("test") or []
    if not entries:
        raise DataError(f"datalist {dl.get('datalist_path')!r} has no entries to read the image geometry from")
    e = entries[0]
    shape = npz_array_shape(e["npz"], f"{e['split']}_images")
    if len(shape) == 4 and shape[-1] == 3:
        return DataGeometry(spatial_dims=2, file_channels=3, source=e["npz"])
    if len(shape) == 4:
        return DataGeometry(spatial_dims=3, file_channels=1, source=e["npz"])
    if len(shape) == 3:
        return DataGeometry(spatial_dims=2, file_channels=1, source=e["npz"])
    raise DataError(f"{e['npz']!r}: {e['split']}_images has shape {shape}; expected [N, H, W], [N, H, W, 3] or "
                    "[N, D, H, W]")
