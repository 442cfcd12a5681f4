"""One data layer: Decathlon/NIfTI volumes, MedMNIST ``.npz`` files, PNG/JPEG folders with a CSV of labels,
synthetic phantoms, site splits and the site-config contract (see ``docs/contracts.md``). No FLARE imports here:
everything is testable without FLARE.
"""

from __future__ import annotations

from fl_plugins.data.build import build_dataset, build_split_datasets
from fl_plugins.data.datalist import labelled_entries, load_datalist, validate_datalist, write_datalist
from fl_plugins.data.decathlon import SliceDataset, VolumeDataset, slices_by_volume
from fl_plugins.data.errors import DataError
from fl_plugins.data.geometry import DataGeometry, data_geometry
from fl_plugins.data.images import ImageDataset
from fl_plugins.data.medmnist import MedMNISTDataset
from fl_plugins.data.partition import PartitionBatches, position_partition, slice_partitions
from fl_plugins.data.presets import PRESETS, get_preset
from fl_plugins.data.site_config import resolve_datalist, write_site_config
from fl_plugins.data.split import split_decathlon, split_images_csv, split_medmnist
from fl_plugins.data.synthetic import generate_synthetic_multitask, generate_synthetic_segmentation

__all__ = [
    "DataGeometry",
    "data_geometry",
    "DataError",
    "PRESETS",
    "get_preset",
    "load_datalist",
    "validate_datalist",
    "labelled_entries",
    "write_datalist",
    "SliceDataset",
    "VolumeDataset",
    "slices_by_volume",
    "MedMNISTDataset",
    "position_partition",
    "slice_partitions",
    "PartitionBatches",
    "build_dataset",
    "build_split_datasets",
    "generate_synthetic_segmentation",
    "generate_synthetic_multitask",
    "split_decathlon",
    "split_medmnist",
    "split_images_csv",
    "ImageDataset",
    "resolve_datalist",
    "write_site_config",
]
