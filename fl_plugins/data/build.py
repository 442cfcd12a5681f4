"""Build the right torch dataset for a datalist (Decathlon slices or MedMNIST images)."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from fl_plugins.data.decathlon import SliceDataset
from fl_plugins.data.errors import DataError
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
      ``image [1, S, S]``, ``label [S, S]``;
    * ``medmnist`` + ``classification``: :class:`MedMNISTDataset`, items ``image [1, H, W]`` / ``[1, D, H, W]``
      (``[3, H, W]`` when the datalist says ``"rgb": true``), ``label`` scalar.

    Args:
        dl: a datalist from :func:`load_datalist`.
        entries: the entries to use (a section, or the labelled part of one).
        image_size: slice / image side ``S`` (None: MedMNIST native size; slices need a size, default 64).
        with_labels: include labels (every entry must then have one).
        cache: keep decoded volumes in memory (slices).

    Raises:
        DataError: unsupported format/task combination.
    """
    fmt, task = dl.get("format"), dl.get("task")
    if fmt == "decathlon" and task == "segmentation":
        return SliceDataset(entries, preset=dl.get("modality_preset", "unit"), image_size=image_size or 64,
                            with_labels=with_labels, cache=cache)
    if fmt == "medmnist" and task == "classification":
        return MedMNISTDataset(entries, with_labels=with_labels, image_size=image_size, keep_rgb=bool(dl.get("rgb")))
    raise DataError(f"datalist {dl.get('datalist_path', '<datalist>')!r}: no dataset for format={fmt!r} with "
                    f"task={task!r} (supported: decathlon/segmentation, medmnist/classification)")


def build_split_datasets(
    dl: dict[str, Any],
    train_entries: list[dict[str, Any]],
    val_entries: list[dict[str, Any]],
    image_size: int | None = 64,
) -> tuple[Dataset, Dataset]:
    """Labelled training and validation datasets for supervised fine-tuning (see :func:`build_dataset`)."""
    return (build_dataset(dl, train_entries, image_size=image_size, with_labels=True),
            build_dataset(dl, val_entries, image_size=image_size, with_labels=True))
