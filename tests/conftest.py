"""Project-wide fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

#: ../shared/data next to the project root (developers and CI have it; users do not)
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def synth_seg_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of 2 synthetic sites (<dir>/site-N/datalist.json), 3 classes, 64x64, 4 volumes of 12 slices."""
    from fl_plugins.data import generate_synthetic_segmentation

    out = tmp_path_factory.mktemp("synth_seg")
    generate_synthetic_segmentation(out, num_sites=2, volumes_per_site=4, num_slices=12, size=64, num_classes=3,
                                    seed=0)
    return out


@pytest.fixture(scope="session")
def synth_cls_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of 2 synthetic classification sites (MedMNIST format), 2 classes each, 28x28."""
    from fl_plugins.data import generate_synthetic_multitask

    out = tmp_path_factory.mktemp("synth_cls")
    generate_synthetic_multitask(out, class_counts=(2, 2), images_per_site=60, size=28, seed=0)
    return out
