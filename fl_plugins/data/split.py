"""Split a real dataset into N federated sites: one datalist per site plus ``split_summary.json``.

* :func:`split_decathlon`: a Decathlon-layout ``dataset.json`` (ACDC, MSD tasks). Entries are grouped by patient
  (``group_key``, ACDC's ``patient``) or, when absent, by case (the image file stem, e.g. ``hippocampus_001``),
  so every volume of one patient (ACDC's ED and ES frames) lands on one site. With ``use_predefined_sections``
  the dataset's own ``validation``/``test`` sections are honoured: their patients are spread over the sites'
  ``validation``/``test`` sections, the ``training`` patients over the sites' ``training``; a missing section
  (MSD has no labelled test set) is carved from each site's training patients with ``val_fraction`` /
  ``test_fraction`` (also for a site that received no patient of a predefined section, when it has fewer
  patients than there are sites).
* :func:`split_medmnist`: a MedMNIST ``.npz``, split by index within each of its train/val/test splits.

Both are deterministic: same inputs and seed -> byte-identical files (sorted, indented JSON; no timestamps).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fl_plugins.atomic_io import atomic_write_json
from fl_plugins.data.datalist import DATALIST_NAME, write_datalist
from fl_plugins.data.errors import DataError
from fl_plugins.data.medmnist import load_npz
from fl_plugins.data.nifti import nifti_stem
from fl_plugins.data.presets import PRESETS
from fl_plugins.data.synthetic import site_name

__all__ = ["split_decathlon", "split_medmnist", "SUMMARY_NAME", "DEFAULT_VAL_FRACTION", "DEFAULT_TEST_FRACTION"]

SUMMARY_NAME = "split_summary.json"
# Fractions of a site's patients carved out when the dataset has no section of its own: 10 % validation and
# 20 % test mirror ACDC's official 70 / 10 / 20 patient split (dataset.json of ../shared/data/acdc).
DEFAULT_VAL_FRACTION = 0.1
DEFAULT_TEST_FRACTION = 0.2


def _check_common(num_sites: Any, labelled_per_site: Any) -> None:
    if not isinstance(num_sites, (int, np.integer)) or isinstance(num_sites, bool) or num_sites < 1:
        raise DataError(f"num_sites must be an integer >= 1, got {num_sites!r}")
    if labelled_per_site is not None and (
        not isinstance(labelled_per_site, (int, np.integer)) or isinstance(labelled_per_site, bool)
        or labelled_per_site < 1
    ):
        raise DataError(f"labelled_per_site must be an integer >= 1 or None, got {labelled_per_site!r}")


def _write_json(obj: Any, path: Path) -> Path:
    atomic_write_json(obj, path, indent=1, sort_keys=True)
    return path


def _load_dataset_json(dataset_json: str | Path) -> tuple[Path, dict[str, Any]]:
    p = Path(dataset_json).expanduser()
    if p.is_dir():
        p = p / "dataset.json"
    if not p.is_file():
        raise DataError(f"dataset description {str(p)!r} does not exist (expected a Decathlon dataset.json)")
    try:
        ds = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"dataset description {str(p)!r} is not valid JSON: {e}") from e
    if not isinstance(ds, dict):
        raise DataError(f"dataset description {str(p)!r}: top level must be a JSON object")
    if not isinstance(ds.get("training"), list) or not ds["training"]:
        raise DataError(f"dataset description {str(p)!r}: section 'training' is missing or empty")
    if not isinstance(ds.get("labels"), dict) or not ds["labels"]:
        raise DataError(f"dataset description {str(p)!r}: field 'labels' (class id -> name) is missing or empty")
    return p.resolve(), ds


def _abs_entries(ds: dict[str, Any], section: str, base: Path, group_key: str, src: Path) -> list[dict[str, Any]]:
    """Labelled entries of one dataset.json section with absolute paths and a ``patient`` group id.

    MSD ``test`` sections list bare image paths without labels; such entries are skipped (they cannot be
    evaluated)."""
    out = []
    for i, e in enumerate(ds.get(section) or []):
        if not isinstance(e, dict) or e.get("label") is None:
            continue
        if "image" not in e:
            raise DataError(f"dataset description {str(src)!r}: {section}[{i}] has no 'image'")
        image = str((base / e["image"]).resolve())
        label = str((base / e["label"]).resolve())
        for key, f in (("image", image), ("label", label)):
            if not Path(f).is_file():
                raise DataError(f"dataset description {str(src)!r}: {section}[{i}] {key} file {f!r} does not exist")
        group = str(e.get(group_key) or nifti_stem(image))
        out.append({"image": image, "label": label, "patient": group})
    return out


def _group(entries: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        groups.setdefault(e["patient"], []).append(e)
    return groups


def _deal(ids: list[str], num_sites: int, rng: np.random.Generator, start: int) -> tuple[list[list[str]], int]:
    """Shuffle ``ids`` and deal them round-robin to sites starting at site ``start`` (balances totals when
    several sections are dealt one after another). Returns per-site id lists (sorted) and the next start."""
    order = [ids[j] for j in rng.permutation(len(ids))]
    per_site: list[list[str]] = [[] for _ in range(num_sites)]
    for k, g in enumerate(order):
        per_site[(start + k) % num_sites].append(g)
    return [sorted(s) for s in per_site], (start + len(order)) % num_sites


def _n_carve(fraction: float, n: int) -> int:
    return 0 if fraction <= 0 else max(1, int(round(fraction * n)))


def split_decathlon(
    dataset_json: str | Path,
    out_dir: str | Path,
    num_sites: int,
    seed: int = 0,
    labelled_per_site: int | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    group_key: str = "patient",
    use_predefined_sections: bool = True,
    modality_preset: str = "mr",
    dataset_name: str | None = None,
    volumes: bool = False,
) -> list[Path]:
    """Split a Decathlon dataset into ``num_sites`` sites, patients never straddling sites.

    Args:
        dataset_json: the dataset's ``dataset.json`` (or its folder).
        out_dir: writes ``<out_dir>/site-N/datalist.json`` and ``<out_dir>/split_summary.json``; image paths in
            the datalists are absolute (the data is not copied).
        num_sites: number of sites; each needs at least one training patient.
        seed: shuffling seed; same seed -> identical files.
        labelled_per_site: flag only N training patients per site ``"labelled": true`` (chosen with the seed; the
            others ``false``, their label paths kept); None = all labelled.
        val_fraction: share of a site's patients moved to ``validation`` when the dataset has no labelled
            validation section (or ``use_predefined_sections=False``); at least one patient when > 0.
        test_fraction: the same for ``test``.
        group_key: entry field naming the patient; entries without it are grouped by image file stem.
        use_predefined_sections: honour the dataset's own ``validation``/``test`` sections (ACDC). False pools
            every labelled entry and carves all three sections per site.
        modality_preset: preset written to the datalists (``"mr"`` default: MR datasets; see ``presets``).
        dataset_name: ``dataset`` field of the datalists (default: the dataset.json ``name``, lower case).
        volumes: write ``"volumes": true``: the data layer then yields whole 3D volumes (fitted into a cube) instead
            of 2D slices, for 3D methods (``mae3d_pretrain``); False writes no such field.

    Returns:
        The site datalist paths, ``site-1`` first.

    Raises:
        DataError: missing/invalid dataset.json, more sites than patients, ``labelled_per_site`` larger than a
            site's training patients, a patient in two sections, bad arguments.
    """
    _check_common(num_sites, labelled_per_site)
    if modality_preset not in PRESETS:
        raise DataError(f"unknown modality_preset {modality_preset!r}; valid presets: {sorted(PRESETS)}")
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= f < 1:
            raise DataError(f"{name} must be in [0, 1), got {f!r}")
    src, ds = _load_dataset_json(dataset_json)
    base = src.parent
    sections = {s: _abs_entries(ds, s, base, group_key, src) for s in ("training", "validation", "test")}
    if not sections["training"]:
        raise DataError(f"dataset description {str(src)!r}: no labelled entries in section 'training'")
    predefined = {s: bool(sections[s]) and use_predefined_sections for s in ("validation", "test")}
    if not use_predefined_sections:
        sections = {"training": sections["training"] + sections["validation"] + sections["test"],
                    "validation": [], "test": []}
    groups = {s: _group(v) for s, v in sections.items()}
    seen: dict[str, str] = {}
    for s, g in groups.items():
        for pid in g:
            if pid in seen:
                raise DataError(f"dataset description {str(src)!r}: patient {pid!r} is in both section "
                                f"{seen[pid]!r} and {s!r}")
            seen[pid] = s
    n_train_groups = len(groups["training"])
    if num_sites > n_train_groups:
        raise DataError(f"num_sites={num_sites} exceeds the {n_train_groups} training patients/cases of "
                        f"{str(src)!r}; every site needs at least one")

    rng = np.random.default_rng(int(seed))
    site_ids: dict[str, list[list[str]]] = {}
    start = 0
    for s in ("training", "validation", "test"):
        site_ids[s], start = _deal(sorted(groups[s]), num_sites, rng, start)
    # carve missing sections from each site's training patients
    for si in range(num_sites):
        train = site_ids["training"][si]
        n = len(train)
        # a predefined section with fewer patients than sites leaves some sites without one: carve theirs
        carve = {s: (0 if site_ids[s][si] else _n_carve(f, n))
                 for s, f in (("validation", val_fraction), ("test", test_fraction))}
        if n - carve["validation"] - carve["test"] < 1:
            raise DataError(f"{site_name(si)} gets only {n} patients/cases of {str(src)!r}: too few for "
                            f"{carve['validation']} validation + {carve['test']} test + 1 training; use fewer sites "
                            f"(--sites, now {num_sites}) or smaller --val-fraction/--test-fraction (now "
                            f"{val_fraction}/{test_fraction}; 0 carves none)")
        order = [train[j] for j in rng.permutation(n)]
        for s in ("validation", "test"):
            k = carve[s]
            if k:
                site_ids[s][si] = sorted(order[:k])
                order = order[k:]
        site_ids["training"][si] = sorted(order)
    pooled = {pid: ents for g in groups.values() for pid, ents in g.items()}

    labels = {str(k): v for k, v in ds["labels"].items()}
    try:
        num_classes = max(int(k) for k in labels) + 1
    except ValueError as e:
        raise DataError(f"dataset description {str(src)!r}: 'labels' keys must be class ids, got {sorted(labels)}") from e
    out = Path(out_dir)
    paths, summary_sites = [], {}
    for si in range(num_sites):
        site = site_name(si)
        train_ids = site_ids["training"][si]
        if labelled_per_site is not None and labelled_per_site > len(train_ids):
            raise DataError(f"labelled_per_site={labelled_per_site} exceeds the {len(train_ids)} training "
                            f"patients of {site} (num_sites={num_sites}, {str(src)!r})")
        if labelled_per_site is None:
            labelled = set(train_ids)
        else:
            labelled = {train_ids[j] for j in rng.permutation(len(train_ids))[:labelled_per_site]}
        dl_sections: dict[str, list[dict[str, Any]]] = {}
        for s in ("training", "validation", "test"):
            rows = []
            for pid in site_ids[s][si]:
                for e in sorted(pooled[pid], key=lambda x: x["image"]):
                    row = dict(e)
                    if s == "training":
                        row["labelled"] = pid in labelled
                    rows.append(row)
            dl_sections[s] = rows
        dl = {
            "format": "decathlon",
            "dataset": dataset_name or str(ds.get("name", src.parent.name)).lower(),
            "task": "segmentation",
            "modality_preset": modality_preset,
            "num_classes": num_classes,
            "labels": labels,
            "site": site,
            "seed": int(seed),
            "source": str(src),
            **({"volumes": True} if volumes else {}),
            **dl_sections,
        }
        paths.append(write_datalist(dl, out / site / DATALIST_NAME))
        summary_sites[site] = {
            "patients": {s: len(site_ids[s][si]) for s in dl_sections},
            "volumes": {s: len(v) for s, v in dl_sections.items()},
            "labelled_patients": len(labelled),
            "labelled_volumes": sum(1 for e in dl_sections["training"] if e["labelled"]),
        }
    _write_json({
        "source": str(src),
        "format": "decathlon",
        "num_sites": num_sites,
        "seed": int(seed),
        "group_key": group_key,
        "grouped_by": (group_key if any(group_key in e for s in ("training", "validation", "test")
                                        for e in ds.get(s) or [] if isinstance(e, dict))
                       else "image file stem"),
        "predefined_sections": {s: predefined[s] for s in ("validation", "test")},
        "labelled_per_site": labelled_per_site,
        "sites": summary_sites,
    }, out / SUMMARY_NAME)
    return paths


def split_medmnist(
    npz_path: str | Path,
    out_dir: str | Path,
    num_sites: int,
    seed: int = 0,
    labelled_per_site: int | None = None,
    num_classes: int | None = None,
    rgb: bool = False,
) -> list[Path]:
    """Split a MedMNIST ``.npz`` into ``num_sites`` sites by index.

    Each of the file's ``train``/``val``/``test`` splits is shuffled with the seed and cut into ``num_sites``
    near-equal parts, which become the sites' ``training``/``validation``/``test`` sections.

    Args:
        npz_path: an official-format MedMNIST ``.npz``.
        out_dir: writes ``<out_dir>/site-N/datalist.json`` (absolute ``npz`` path) and ``split_summary.json``.
        num_sites: number of sites; every split needs at least one image per site.
        seed: shuffling seed; same seed -> identical files.
        labelled_per_site: flag only N training images per site ``"labelled": true`` (seeded); None = all.
        num_classes: number of classes (default: largest label in the file + 1).
        rgb: keep RGB images as 3 channels (writes ``"rgb": true``); refused for a file that is not RGB.

    Returns:
        The site datalist paths, ``site-1`` first.
    """
    _check_common(num_sites, labelled_per_site)
    src = Path(npz_path).expanduser().resolve()
    arrays = load_npz(src)
    shape = np.asarray(arrays["train_images"]).shape
    if rgb and not (len(shape) == 4 and shape[-1] == 3):
        raise DataError(f"--rgb: MedMNIST file {str(src)!r} is not RGB (train_images shape {shape})")
    labels_all = {s: np.asarray(arrays[f"{s}_labels"]).reshape(len(arrays[f"{s}_labels"]), -1)
                  for s in ("train", "val", "test")}
    for s, lab in labels_all.items():
        if lab.shape[1] != 1:
            raise DataError(f"MedMNIST file {str(src)!r}: {s}_labels has shape {arrays[f'{s}_labels'].shape}; only "
                            f"single-label (N, 1) files are supported")
        if len(lab) < num_sites:
            raise DataError(f"num_sites={num_sites} exceeds the {len(lab)} images of split {s!r} in {str(src)!r}")
    max_label = int(max(int(v[:, 0].max()) for v in labels_all.values() if len(v)))
    if num_classes is None:
        num_classes = max_label + 1
    elif max_label >= num_classes:
        raise DataError(f"MedMNIST file {str(src)!r} has label {max_label} >= num_classes={num_classes}")
    rng = np.random.default_rng(int(seed))
    parts = {s: [np.sort(p) for p in np.array_split(rng.permutation(len(labels_all[s])), num_sites)]
             for s in ("train", "val", "test")}
    out = Path(out_dir)
    paths, summary_sites = [], {}
    section_of = {"train": "training", "val": "validation", "test": "test"}
    for si in range(num_sites):
        site = site_name(si)
        train_idx = parts["train"][si]
        if labelled_per_site is not None and labelled_per_site > len(train_idx):
            raise DataError(f"labelled_per_site={labelled_per_site} exceeds the {len(train_idx)} training images "
                            f"of {site} (num_sites={num_sites}, {str(src)!r})")
        labelled = (set(train_idx.tolist()) if labelled_per_site is None
                    else set(rng.choice(train_idx, size=labelled_per_site, replace=False).tolist()))
        dl_sections: dict[str, list[dict[str, Any]]] = {}
        for s, section in section_of.items():
            rows = []
            for i in parts[s][si].tolist():
                row: dict[str, Any] = {"npz": str(src), "split": s, "index": i, "label": int(labels_all[s][i, 0])}
                if s == "train":
                    row["labelled"] = i in labelled
                rows.append(row)
            dl_sections[section] = rows
        dl = {
            "format": "medmnist",
            "dataset": src.stem,
            "task": "classification",
            "modality_preset": "unit",
            **({"rgb": True} if rgb else {}),
            "num_classes": int(num_classes),
            "labels": {str(c): str(c) for c in range(int(num_classes))},
            "site": site,
            "seed": int(seed),
            "source": str(src),
            **dl_sections,
        }
        paths.append(write_datalist(dl, out / site / DATALIST_NAME))
        summary_sites[site] = {
            "images": {s: len(v) for s, v in dl_sections.items()},
            "labelled_images": len(labelled),
        }
    _write_json({"source": str(src), "format": "medmnist", "num_sites": num_sites, "seed": int(seed),
                 "labelled_per_site": labelled_per_site, "sites": summary_sites}, out / SUMMARY_NAME)
    return paths
