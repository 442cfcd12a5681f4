"""Shared fixtures of the data-layer tests: small synthetic sites generated once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from fl_plugins.data import generate_synthetic_multitask, generate_synthetic_segmentation

# ../shared/data next to the project root (developers and CI have it; users do not)
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="session")
def seg_sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """2 sites x 4 volumes x 12 slices x 64^2, 4 classes (the brief's reference size)."""
    return generate_synthetic_segmentation(tmp_path_factory.mktemp("seg"), num_sites=2, volumes_per_site=4,
                                           num_slices=12, size=64, num_classes=4, seed=0)


@pytest.fixture(scope="session")
def mt_sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return generate_synthetic_multitask(tmp_path_factory.mktemp("mt"), class_counts=(2, 3, 4), images_per_site=60,
                                        seed=0)


@pytest.fixture()
def tiny_site(tmp_path: Path) -> Path:
    """A fresh, small site (1 site x 3 volumes x 4 slices x 16^2, 3 classes) that a test may damage."""
    return generate_synthetic_segmentation(tmp_path / "tiny", num_sites=1, volumes_per_site=3, num_slices=4,
                                           size=16, num_classes=3, seed=1)[0]
