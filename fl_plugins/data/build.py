"""Build the right torch dataset for a datalist (Decathlon slices or volumes, MedMNIST images)."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from fl_plugins.data.decathlon import SliceDataset, VolumeDataset
from fl_plugins.data.errors import DataError
from fl_plugins.data.images import ImageDataset
from fl_plugins.data.medmnist import MedMNISTDataset

__all__ = ["build_dataset", "build_split_datasets"]


def build_dataset(
    dl: dict[str, Any],
    entries: list[dict[str, Any]],
    image_size: int | None = 64,
    with_labels: bool = True,
    cache: bool = True,
) -> Dataset:
    """Dataset over ``entries`` of a loaded datalist ``dl``.

    * ``decathlon`` + ``segmentation``: :class:`SliceDataset` (2D slices, ``dl["modality_preset"]``), items
      ``image [1, S, S]``, ``label [S, S]``; with the datalist field ``"volumes": true`` (``flssl split
      --volumes``) :class:`VolumeDataset` instead, one item per volume fitted into a cube (aspect kept, MONAI
      ``Resize`` + ``SpatialPad``), ``image [1, S, S, S]``, ``label [S, S, S]`` -- the data of 3D methods
      (``mae3d_pretrain``). The mode is a datalist field, not an argument, so that ``data_geometry`` (and with it
      ``flssl check-data --job``, the simulate pre-flight and the handlers' checks) sees the same 2D/3D answer as
      every dataset built from the datalist;
    * ``medmnist`` + ``classification``: :class:`MedMNISTDataset`, items ``image [1, H, W]`` / ``[1, D, H, W]``
      (``[3, H, W]`` when the datalist says ``"rgb": true``), ``label`` scalar;
    * ``images`` (PNG/JPEG files from a labels CSV, ``flssl split --dataset labels.csv``): :class:`ImageDataset`,
      classification items ``image [C, S, S]`` + ``label`` scalar, segmentation items as 2D slices (``image [C, S,
      S]``, ``label [S, S]``, ``volume_id`` = the image's id, ``slice_index`` 0, ``num_slices`` 1); ``C`` = 3 with
      ``"rgb": true``, else 1; normalised by ``dl["modality_preset"]`` (``unit``).

    Args:
        dl: a datalist from :func:`load_datalist`.
        entries: the entries to use (a section, or the labelled part of one).
        image_size: slice / image / volume side ``S`` (None: MedMNIST, PNG/JPEG images and volumes native size; slices
            need a size, default 64).
        with_labels: include labels (every entry must then have one).
        cache: keep decoded (resized) volumes in memory (slices and volumes).

    Raises:
        DataError: unsupported format/task combination.
    """
    fmt, task = dl.get("format"), dl.get("task")
    if fmt == "decathlon" and task == "segmentation" and dl.get("volumes"):
        return VolumeDataset(entries, preset=dl.get("modality_preset", "unit"), image_size=image_size,
                             with_labels=with_labels, cache=cache)
    if fmt == "decathlon" and task == "segmentation":
        return SliceDataset(entries, preset=dl.get("modality_preset", "unit"), image_size=image_size or 64,
                            with_labels=with_labels, cache=cache)
    if fmt == "medmnist" and task == "classification":
        return MedMNISTDataset(entries, with_labels=with_labels, image_size=image_size, keep_rgb=bool(dl.get("rgb")))
    if fmt == "images" and task in ("classification", "segmentation"):
        return ImageDataset(entries, task=task, preset=dl.get("modality_preset", "unit"), image_size=image_size,
                            with_labels=with_labels, keep_rgb=bool(dl.get("rgb")), cache=cache)
    raise DataError(f"datalist {dl.get('datalist_path', '<datalist>')!r}: no dataset for format={fmt!r} with "
                    f"task={task!r} (supported: decathlon/segmentation, medmnist/classification, "
                    "images/classification, images/segmentation)")


def build_split_datasets(
    dl: dict[str, Any],
    train_entries: list[dict[str, Any]],
    val_entries: list[dict[str, Any]],
    image_size: int | None = 64,
) -> tuple[Dataset, Dataset]:
    """Labelled training and validation datasets for supervised fine-tuning (see :func:`build_dataset`)."""
    return (build_dataset(dl, train_entries, image_size=image_size, with_labels=True),
            build_dataset(dl, val_entries, image_size=image_size, with_labels=True))
