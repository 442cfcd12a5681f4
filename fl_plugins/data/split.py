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
* :func:`split_images_csv`: a folder of PNG/JPEG images with a CSV of labels (datalist format ``images``), grouped
  by patient (or image) and stratified by class.

All are deterministic: same inputs and seed -> byte-identical files (sorted, indented JSON; no timestamps).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fl_plugins.atomic_io import atomic_write_json
from fl_plugins.data.datalist import DATALIST_NAME, resolve_path, write_datalist
from fl_plugins.data.errors import DataError
from fl_plugins.data.medmnist import load_npz
from fl_plugins.data.nifti import nifti_stem
from fl_plugins.data.presets import PRESETS
from fl_plugins.data.synthetic import site_name

__all__ = ["split_decathlon", "split_medmnist", "split_images_csv", "SUMMARY_NAME", "DEFAULT_VAL_FRACTION",
           "DEFAULT_TEST_FRACTION"]

logger = logging.getLogger(__name__)

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


def _write_split(out_dir: str | Path, sites: Iterable[tuple[dict[str, Any], dict[str, Any]]],
                 summary: Mapping[str, Any]) -> list[Path]:
    """The tail of every splitter: write each site's datalist to ``<out_dir>/<site>/datalist.json`` as ``sites``
    yields it (``(datalist, the site's summary)``; the datalist's ``site`` names the folder), then
    ``<out_dir>/split_summary.json`` = ``summary`` + ``"sites"`` (site -> its summary).

    ``sites`` may be a generator that raises for a later site: the datalists of the sites before it are written
    then, the summary is not.

    Returns:
        The datalist paths in the order of ``sites``.

    Raises:
        ValueError: two datalists of the same site.
    """
    out = Path(out_dir)
    paths, summary_sites = [], {}
    for dl, site_summary in sites:
        site = dl["site"]
        if site in summary_sites:
            raise ValueError(f"split: site {site!r} is written twice")
        paths.append(write_datalist(dl, out / site / DATALIST_NAME))
        summary_sites[site] = site_summary
    _write_json({**summary, "sites": summary_sites}, out / SUMMARY_NAME)
    return paths


def _check_labelled(labelled_per_site: int | None, n_train: int, what: str, site: str, num_sites: int,
                    src: Path) -> None:
    """``DataError`` when ``labelled_per_site`` exceeds a site's ``n_train`` training ``what`` (patients, images)."""
    if labelled_per_site is not None and labelled_per_site > n_train:
        raise DataError(f"labelled_per_site={labelled_per_site} exceeds the {n_train} training {what} of {site} "
                        f"(num_sites={num_sites}, {str(src)!r})")


def _draw_labelled(train_ids: list[str], labelled_per_site: int | None, rng: np.random.Generator) -> set[str]:
    """The training groups flagged ``"labelled": true``: all (None), else ``labelled_per_site`` drawn with ``rng``."""
    if labelled_per_site is None:
        return set(train_ids)
    return {train_ids[j] for j in rng.permutation(len(train_ids))[:labelled_per_site]}


def _section_rows(ids: Mapping[str, list[str]], groups: Mapping[str, list[dict[str, Any]]], sort_key: str,
                  labelled: set[str]) -> dict[str, list[dict[str, Any]]]:
    """The ``training`` / ``validation`` / ``test`` rows of a site: every entry of each group of ``ids[section]``
    (a copy; a group's entries in ``sort_key`` order), training rows flagged ``"labelled"`` (group in
    ``labelled``)."""
    sections: dict[str, list[dict[str, Any]]] = {}
    for s in ("training", "validation", "test"):
        rows = []
        for pid in ids[s]:
            for e in sorted(groups[pid], key=lambda x: x[sort_key]):
                row = dict(e)
                if s == "training":
                    row["labelled"] = pid in labelled
                rows.append(row)
        sections[s] = rows
    return sections


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
    for section in ("training", "validation", "test"):
        if section in ds and not isinstance(ds[section], list):
            raise DataError(f"dataset description {str(p)!r}: section {section!r} must be a list")
    if not ds.get("training") and not ds.get("test") and not ds.get("validation"):
        raise DataError(f"dataset description {str(p)!r}: section 'training' is missing or empty (a dataset to "
                        "evaluate on only lists its cases, with labels, in a 'test' section)")
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
        where = f"dataset description {str(src)!r}, {section}[{i}]"
        image = str(resolve_path(base / e["image"], f"{where}, field 'image'"))
        label = str(resolve_path(base / e["label"], f"{where}, field 'label'"))
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
    eval_only: bool = False,
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
        eval_only: write evaluation-only datalists (``"eval_only": true``): every labelled case of every section
            goes to the sites' ``test`` sections, ``training``/``validation`` stay empty (for ``flssl evaluate``;
            training jobs refuse them). Also chosen, and logged, when the dataset has labelled cases but none in
            ``training`` (e.g. only a ``test`` section).

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
    if not any(sections.values()):
        raise DataError(f"dataset description {str(src)!r}: no labelled entries (with a 'label') in any section; "
                        "training and evaluation both need labels")
    if not sections["training"] and not eval_only:
        eval_only = True
        logger.warning("dataset description %s has no labelled 'training' entries: writing evaluation-only datalists "
                       "(every case in 'test', for flssl evaluate)", src)
    if eval_only:
        if labelled_per_site is not None:
            raise DataError("labelled_per_site (--labelled) chooses training cases; an evaluation-only split has none")
        return _split_decathlon_eval_only(src, ds, sections, out_dir, num_sites, seed, group_key, modality_preset,
                                          dataset_name, volumes)
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
                        f"{str(src)!r}; every site needs at least one: use --sites {n_train_groups} or fewer, or "
                        "--eval-only to spread the cases over the sites' test sections for evaluation only")

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
            raise DataError(_too_few_message(site_name(si), n, str(src), carve, num_sites, val_fraction,
                                             test_fraction))
        order = [train[j] for j in rng.permutation(n)]
        for s in ("validation", "test"):
            k = carve[s]
            if k:
                site_ids[s][si] = sorted(order[:k])
                order = order[k:]
        site_ids["training"][si] = sorted(order)
    pooled = {pid: ents for g in groups.values() for pid, ents in g.items()}

    labels, num_classes = _decathlon_labels(ds, src)

    def sites() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        for si in range(num_sites):
            site = site_name(si)
            train_ids = site_ids["training"][si]
            _check_labelled(labelled_per_site, len(train_ids), "patients", site, num_sites, src)
            labelled = _draw_labelled(train_ids, labelled_per_site, rng)
            dl_sections = _section_rows({s: site_ids[s][si] for s in site_ids}, pooled, "image", labelled)
            dl = _decathlon_datalist(site, ds, src, seed, dataset_name, modality_preset, num_classes, labels,
                                     volumes, dl_sections)
            yield dl, {
                "patients": {s: len(site_ids[s][si]) for s in dl_sections},
                "volumes": {s: len(v) for s, v in dl_sections.items()},
                "labelled_patients": len(labelled),
                "labelled_volumes": sum(1 for e in dl_sections["training"] if e["labelled"]),
            }

    return _write_split(out_dir, sites(), {
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
    })


def _decathlon_datalist(site: str, ds: dict[str, Any], src: Path, seed: int, dataset_name: str | None,
                        modality_preset: str, num_classes: int, labels: dict[str, Any], volumes: bool,
                        sections: dict[str, list[dict[str, Any]]], eval_only: bool = False) -> dict[str, Any]:
    """A site's Decathlon datalist: the header fields, then ``sections`` (``eval_only``: ``"eval_only": true``)."""
    return {
        "format": "decathlon",
        "dataset": dataset_name or str(ds.get("name", src.parent.name)).lower(),
        "task": "segmentation",
        "modality_preset": modality_preset,
        "num_classes": num_classes,
        "labels": labels,
        "site": site,
        "seed": int(seed),
        "source": str(src),
        **({"eval_only": True} if eval_only else {}),
        **({"volumes": True} if volumes else {}),
        **sections,
    }


def _too_few_message(site: str, n: int, src: str, carve: dict[str, int], num_sites: int, val_fraction: float,
                     test_fraction: float) -> str:
    """What to do when a site's cases cannot fill validation + test + 1 training: the options that exist."""
    fixes = []
    if num_sites > 1:
        fixes.append(f"fewer sites (--sites 1 puts every case on one site; now --sites {num_sites})")
    fixes.append(f"no carved sections: --val-fraction 0 --test-fraction 0 (now {val_fraction}/{test_fraction}; "
                 "every case of the site then trains, and fine-tuning, which validates, needs a validation case)")
    fixes.append("--eval-only: every case to the sites' test sections, to evaluate a trained model on")
    return (f"{site} gets only {n} patients/cases of {src!r}: too few for {carve['validation']} validation + "
            f"{carve['test']} test + 1 training; use " + "; or ".join(fixes))


def _split_decathlon_eval_only(src: Path, ds: dict[str, Any], sections: dict[str, list[dict[str, Any]]],
                               out_dir: str | Path, num_sites: int, seed: int, group_key: str, modality_preset: str,
                               dataset_name: str | None, volumes: bool) -> list[Path]:
    """Evaluation-only datalists: every labelled case (all sections pooled) dealt by patient to the sites' test."""
    groups = _group(sections["training"] + sections["validation"] + sections["test"])
    if num_sites > len(groups):
        raise DataError(f"num_sites={num_sites} exceeds the {len(groups)} labelled patients/cases of {str(src)!r}; "
                        f"every site needs at least one test case: use --sites {len(groups)} or fewer")
    site_ids, _ = _deal(sorted(groups), num_sites, np.random.default_rng(int(seed)), 0)
    labels, num_classes = _decathlon_labels(ds, src)

    def sites() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        for si in range(num_sites):
            site = site_name(si)
            rows = [dict(e) for pid in site_ids[si] for e in sorted(groups[pid], key=lambda x: x["image"])]
            dl = _decathlon_datalist(site, ds, src, seed, dataset_name, modality_preset, num_classes, labels,
                                     volumes, {"training": [], "validation": [], "test": rows}, eval_only=True)
            yield dl, {"patients": {"training": 0, "validation": 0, "test": len(site_ids[si])},
                       "volumes": {"training": 0, "validation": 0, "test": len(rows)}}

    return _write_split(out_dir, sites(), {"source": str(src), "format": "decathlon", "num_sites": num_sites,
                                           "seed": int(seed), "group_key": group_key, "eval_only": True})


def _decathlon_labels(ds: dict[str, Any], src: Path) -> tuple[dict[str, Any], int]:
    labels = {str(k): v for k, v in ds["labels"].items()}
    try:
        return labels, max(int(k) for k in labels) + 1
    except ValueError as e:
        raise DataError(f"dataset description {str(src)!r}: 'labels' keys must be class ids, "
                        f"got {sorted(labels)}") from e


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
    section_of = {"train": "training", "val": "validation", "test": "test"}

    def sites() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        for si in range(num_sites):
            site = site_name(si)
            train_idx = parts["train"][si]
            _check_labelled(labelled_per_site, len(train_idx), "images", site, num_sites, src)
            labelled = (set(train_idx.tolist()) if labelled_per_site is None
                        else set(rng.choice(train_idx, size=labelled_per_site, replace=False).tolist()))
            dl_sections: dict[str, list[dict[str, Any]]] = {}
            for s, section in section_of.items():
                rows = []
                for i in parts[s][si].tolist():
                    row: dict[str, Any] = {"npz": str(src), "split": s, "index": i,
                                           "label": int(labels_all[s][i, 0])}
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
            yield dl, {"images": {s: len(v) for s, v in dl_sections.items()}, "labelled_images": len(labelled)}

    return _write_split(out_dir, sites(), {"source": str(src), "format": "medmnist", "num_sites": num_sites,
                                           "seed": int(seed), "labelled_per_site": labelled_per_site})


def _as_class_id(value: str) -> int | None:
    """``"2"`` / ``"2.0"`` -> 2; anything else (a class name, ``"1.5"``) -> None."""
    try:
        return int(value)
    except ValueError:
        pass
    try:
        f = float(value)
    except ValueError:
        return None
    return int(f) if f.is_integer() else None


def _stratified_order(ids: list[str], cls: dict[str, int], rng: np.random.Generator) -> list[str]:
    """``ids`` in an order whose every window holds the classes in proportion (systematic sampling per class with a
    random start): carving the first k for validation, the next for test keeps the site's class mix."""
    keyed = []
    for c in sorted({cls[g] for g in ids}):
        members = [g for g in ids if cls[g] == c]
        members = [members[j] for j in rng.permutation(len(members))]
        u = float(rng.random())
        keyed += [((j + u) / len(members), g) for j, g in enumerate(members)]
    return [g for _, g in sorted(keyed)]


def split_images_csv(
    csv_path: str | Path,
    out_dir: str | Path,
    num_sites: int,
    seed: int = 0,
    labelled_per_site: int | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    task: str | None = None,
    image_column: str = "image",
    label_column: str = "label",
    mask_column: str = "mask",
    patient_column: str | None = None,
    num_classes: int | None = None,
    rgb: bool = False,
    modality_preset: str = "unit",
    eval_only: bool = False,
    dataset_name: str | None = None,
) -> list[Path]:
    """Split a folder of PNG/JPEG images described by a CSV into ``num_sites`` sites (datalist format ``images``).

    The CSV has a header line; each row names an image (path relative to the CSV) and either its class
    (classification: an integer class id in every row, or a class name in every row -- names get ids in sorted
    order) or a mask image whose pixel values are class indices (segmentation); optionally a patient id. Rows are
    grouped by patient (every image of a patient on one site and in one section) or, without a patient column, by
    image; classification groups are dealt to the sites class by class and carved into ``validation``/``test``
    in class proportion (stratified), so every site and section keeps the class mix as far as counts allow.

    Args:
        csv_path: the labels CSV.
        out_dir: writes ``<out_dir>/site-N/datalist.json`` (absolute image paths; nothing copied) and
            ``split_summary.json``.
        num_sites: number of sites; each needs one patient / image at least.
        seed: shuffling seed; same seed -> identical files.
        labelled_per_site: flag only N training patients / images per site ``"labelled": true``; None = all.
        val_fraction: share of each site's patients / images in ``validation`` (at least one when > 0).
        test_fraction: the same for ``test``.
        task: ``"classification"`` or ``"segmentation"``; None: segmentation when the CSV has the mask column and
            not the label column, classification when it has the label column and not the mask column.
        image_column: CSV column of the image paths.
        label_column: CSV column of the class labels (classification).
        mask_column: CSV column of the mask image paths (segmentation).
        patient_column: CSV column of the patient ids; None: ``"patient"`` when the CSV has it, else rows are
            grouped by image.
        num_classes: number of classes (default: classification the largest class id + 1 or the number of class
            names; segmentation the largest mask value + 1, at least 2).
        rgb: keep colour images as 3 channels (``"rgb": true``); refused when every image is grey.
        modality_preset: intensity preset written to the datalists (``"unit"``: min-max to [0, 1] per image).
        eval_only: evaluation-only datalists (``"eval_only": true``): every row goes to the sites' ``test``.
        dataset_name: ``dataset`` field of the datalists (default: the CSV's folder name).

    Returns:
        The site datalist paths, ``site-1`` first.

    Raises:
        DataError: a missing column (the message lists the columns present and the option naming it), an empty
            cell, a missing image or mask file or a bad label (named with its CSV row and line), too few rows for
            the sites and sections, bad arguments.
    """
    from fl_plugins.data.datalist import TASKS
    from fl_plugins.data.images import DEFAULT_COLUMNS, image_file_channels, read_labels_csv, read_mask_array

    _check_common(num_sites, labelled_per_site)
    if modality_preset not in PRESETS:
        raise DataError(f"unknown modality_preset {modality_preset!r}; valid presets: {sorted(PRESETS)}")
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= f < 1:
            raise DataError(f"{name} must be in [0, 1), got {f!r}")
    if num_classes is not None and (not isinstance(num_classes, (int, np.integer)) or num_classes < 1):
        raise DataError(f"num_classes must be an integer >= 1 or None, got {num_classes!r}")
    if eval_only and labelled_per_site is not None:
        raise DataError("labelled_per_site (--labelled) chooses training images; an evaluation-only split has none")
    src = Path(csv_path).expanduser().resolve()
    columns, rows = read_labels_csv(src)

    def need(col: str, what: str, option: str) -> None:
        if col not in columns:
            raise DataError(f"labels CSV {str(src)!r} has no column {col!r} ({what}); its columns are {columns}: "
                            f"name the right one with {option}")

    need(image_column, "image paths, relative to the CSV", "--image-column")
    if task is None:
        if label_column in columns and mask_column in columns:
            raise DataError(f"labels CSV {str(src)!r} has both a label column {label_column!r} and a mask column "
                            f"{mask_column!r}: choose the task with --task classification or --task segmentation")
        if label_column not in columns and mask_column not in columns:
            raise DataError(f"labels CSV {str(src)!r} has no column {label_column!r} (class labels: classification) "
                            f"and no column {mask_column!r} (mask image paths: segmentation); its columns are "
                            f"{columns}: name the right one with --label-column or --mask-column")
        task = "segmentation" if mask_column in columns else "classification"
    elif task not in TASKS:
        raise DataError(f"task must be one of {list(TASKS)}, got {task!r}")
    if task == "classification":
        need(label_column, "class labels", "--label-column")
    else:
        need(mask_column, "mask image paths, relative to the CSV; mask pixel values are class indices",
             "--mask-column")
    if patient_column is not None:
        need(patient_column, "patient ids", "--patient-column")
    elif DEFAULT_COLUMNS["patient"] in columns:
        patient_column = DEFAULT_COLUMNS["patient"]
    base = src.parent

    def file_of(r: Any, col: str, what: str) -> str:
        v = r.values[col]
        if not v:
            raise DataError(f"{r.where(src)}: column {col!r} is empty (expected the {what} file's path, relative to "
                            "the CSV)")
        f = Path(v).expanduser()
        f = resolve_path(f if f.is_absolute() else base / f, f"{r.where(src)}: column {col!r} = {v!r}")
        if not f.is_file():
            raise DataError(f"{r.where(src)}: {what} file {str(f)!r} (column {col!r} = {v!r}) does not exist")
        return str(f)

    entries: list[dict[str, Any]] = []
    for r in rows:
        e: dict[str, Any] = {"image": file_of(r, image_column, "image"), "csv_row": r.row}
        if patient_column is not None:
            if not r.values[patient_column]:
                raise DataError(f"{r.where(src)}: column {patient_column!r} (patient id) is empty")
            e["patient"] = r.values[patient_column]
        else:
            e["patient"] = r.values[image_column]  # one group per image (the same image twice: one group)
        entries.append(e)

    labels: dict[str, str]
    if task == "classification":
        raw = [r.values[label_column] for r in rows]
        for r, v in zip(rows, raw):
            if not v:
                raise DataError(f"{r.where(src)}: column {label_column!r} (class label) is empty")
        ids = [_as_class_id(v) for v in raw]
        if all(i is None for i in ids):  # class names: ids in sorted order
            names = sorted(set(raw))
            ids = [names.index(v) for v in raw]
            labels = {str(i): n for i, n in enumerate(names)}
        else:
            for r, v, i in zip(rows, raw, ids):
                if i is None:
                    raise DataError(f"{r.where(src)}: label {v!r} (column {label_column!r}) is not a class id, while "
                                    "other rows have integer class ids: use integers 0, 1, ... in every row, or class "
                                    "names in every row")
                if i < 0:
                    raise DataError(f"{r.where(src)}: label {v!r} (column {label_column!r}) is negative: class ids "
                                    "are 0, 1, ...")
            labels = {}
        biggest = max(int(i) for i in ids)  # type: ignore[arg-type]
        if num_classes is not None and biggest >= num_classes:
            r = next(r for r, i in zip(rows, ids) if i is not None and i >= num_classes)
            raise DataError(f"{r.where(src)}: label {r.values[label_column]!r} (class id {biggest}) is outside "
                            f"range(num_classes={num_classes})")
        n_cls = int(num_classes) if num_classes is not None else (len(labels) or biggest + 1)
        labels = labels or {str(c): str(c) for c in range(n_cls)}
        for e, i in zip(entries, ids):
            e["label"] = int(i)  # type: ignore[arg-type]
    else:
        biggest = 0
        for r, e in zip(rows, entries):
            e["label"] = file_of(r, mask_column, "mask")
            m = int(read_mask_array(e["label"]).max(initial=0))
            if num_classes is not None and m >= num_classes:
                raise DataError(f"{r.where(src)}: mask file {e['label']!r} has value {m} outside "
                                f"range(num_classes={num_classes}) (mask pixel values are class indices)")
            biggest = max(biggest, m)
        n_cls = int(num_classes) if num_classes is not None else max(2, biggest + 1)
        labels = {str(c): ("background" if c == 0 else str(c)) for c in range(n_cls)}
    if rgb and all(image_file_channels(e["image"]) == 1 for e in entries):
        raise DataError(f"--rgb: every image listed by {str(src)!r} is grey: leave --rgb out")

    groups = _group(entries)
    counts: dict[str, dict[int, int]] = {}
    for pid, ents in groups.items():
        for e in ents:
            counts.setdefault(pid, {})
            if task == "classification":
                counts[pid][e["label"]] = counts[pid].get(e["label"], 0) + 1
    # the class a group is stratified by: its most frequent label (segmentation: one stratum)
    cls = {pid: (min(c, key=lambda k: (-c[k], k)) if c else 0) for pid, c in counts.items()}
    unit = "patients" if patient_column else "images"
    if num_sites > len(groups):
        raise DataError(f"num_sites={num_sites} exceeds the {len(groups)} {unit} of {str(src)!r}; every site needs at "
                        f"least one: use --sites {len(groups)} or fewer")
    rng = np.random.default_rng(int(seed))
    site_ids: list[list[str]] = [[] for _ in range(num_sites)]
    start = 0
    for c in sorted(set(cls.values())):
        dealt, start = _deal(sorted(g for g in groups if cls[g] == c), num_sites, rng, start)
        for si in range(num_sites):
            site_ids[si] += dealt[si]
    sections_of: list[dict[str, list[str]]] = []
    for si in range(num_sites):
        ids = sorted(site_ids[si])
        if eval_only:
            sections_of.append({"training": [], "validation": [], "test": ids})
            continue
        n = len(ids)
        carve = {"validation": _n_carve(val_fraction, n), "test": _n_carve(test_fraction, n)}
        if n - carve["validation"] - carve["test"] < 1:
            raise DataError(_too_few_message(site_name(si), n, str(src), carve, num_sites, val_fraction,
                                             test_fraction).replace("patients/cases", unit))
        order = _stratified_order(ids, cls, rng)
        v, t = carve["validation"], carve["test"]
        sections_of.append({"validation": sorted(order[:v]), "test": sorted(order[v:v + t]),
                            "training": sorted(order[v + t:])})

    def sites() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        for si in range(num_sites):
            site, secs = site_name(si), sections_of[si]
            train_ids = secs["training"]
            _check_labelled(labelled_per_site, len(train_ids), unit, site, num_sites, src)
            labelled = _draw_labelled(train_ids, labelled_per_site, rng)
            dl_sections = _section_rows(secs, groups, "csv_row", labelled)
            dl = {
                "format": "images",
                "dataset": dataset_name or src.parent.name.lower(),
                "task": task,
                "modality_preset": modality_preset,
                **({"rgb": True} if rgb else {}),
                "num_classes": n_cls,
                "labels": labels,
                "site": site,
                "seed": int(seed),
                "source": str(src),
                **({"eval_only": True} if eval_only else {}),
                **dl_sections,
            }
            yield dl, {
                unit: {s: len(secs[s]) for s in secs},
                "images": {s: len(v) for s, v in dl_sections.items()},
                f"labelled_{unit}": len(labelled),
                **({"classes": {s: {str(c): sum(1 for e in v if e["label"] == c) for c in range(n_cls)}
                                for s, v in dl_sections.items()}} if task == "classification" else {}),
            }

    return _write_split(out_dir, sites(), {
        "source": str(src),
        "format": "images",
        "task": task,
        "num_sites": num_sites,
        "seed": int(seed),
        "columns": {"image": image_column, **({"label": label_column} if task == "classification"
                                              else {"mask": mask_column}),
                    **({"patient": patient_column} if patient_column else {})},
        "grouped_by": f"column {patient_column!r}" if patient_column else "image",
        "stratified_by_class": task == "classification",
        "eval_only": eval_only,
        "labelled_per_site": labelled_per_site,
    })
