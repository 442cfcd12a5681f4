"""Per-site datalists (see ``docs/contracts.md``): loading with schema checks and validating the files they list.

:func:`load_datalist` checks the JSON schema and resolves relative paths against the datalist's folder;
:func:`validate_datalist` checks that the listed data exists (and, with ``deep=True``, that it is readable and
consistent). Both raise :class:`DataError` naming the file, the field and the bad value.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from fl_plugins.atomic_io import atomic_write_json
from fl_plugins.data.errors import DataError
from fl_plugins.data.nifti import read_image, read_label
from fl_plugins.data.presets import PRESETS

__all__ = [
    "DATALIST_NAME",
    "FORMATS",
    "TASKS",
    "SECTIONS",
    "MEDMNIST_SPLITS",
    "load_datalist",
    "validate_datalist",
    "labelled_entries",
    "write_datalist",
]

logger = logging.getLogger(__name__)

DATALIST_NAME = "datalist.json"  # <data folder>/<site>/datalist.json, written by `flssl synth` / `flssl split`
FORMATS = ("decathlon", "medmnist", "images")  # images: PNG/JPEG files listed by a CSV (flssl split)
TASKS = ("segmentation", "classification")
SECTIONS = ("training", "validation", "test")
MEDMNIST_SPLITS = ("train", "val", "test")


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _resolve(value: Any, base: Path, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: expected a non-empty path string, got {value!r}")
    p = Path(value).expanduser()
    if not p.is_absolute():
        p = base / p
    return str(resolve_path(p, where))


def resolve_path(p: Path, where: str) -> Path:
    """``p.resolve()``; a symlink loop (RuntimeError before Python 3.13, OSError ELOOP after) is a
    :class:`DataError` naming ``where`` and the path."""
    try:
        return p.resolve()
    except (RuntimeError, OSError) as e:
        raise DataError(f"{where}: {str(p)!r} is a symlink loop (its links point back at each other): fix the links "
                        f"(ls -l) or list the real file ({e})") from e


#: modality names (Decathlon ``dataset.json`` "modality" values, lower-cased) -> intensity preset
MODALITY_PRESETS = {"mr": "mr", "mri": "mr", "t1": "mr", "t2": "mr", "flair": "mr", "t1gd": "mr", "adc": "mr",
                    "cine-mri": "mr", "ct": "ct", "us": "unit", "ultrasound": "unit", "xray": "unit",
                    "x-ray": "unit"}


def _default_preset(dl: dict[str, Any], name: str) -> tuple[str, str]:
    """The intensity preset of a datalist that names none: MedMNIST images are 8-bit (``unit``); otherwise from the
    datalist's ``modality`` (a name, or Decathlon's ``{"0": "MRI"}``); with neither, the user must choose."""
    if dl["format"] == "medmnist":
        return "unit", "MedMNIST images are 8-bit: scaled to [0, 1]"
    if dl["format"] == "images":
        return "unit", "PNG/JPEG images: min-max scaled to [0, 1] per image"
    modality = dl.get("modality")
    if isinstance(modality, dict):
        modality = next(iter(modality.values()), None)
    if isinstance(modality, str) and modality.strip().lower() in MODALITY_PRESETS:
        return MODALITY_PRESETS[modality.strip().lower()], f"from modality {modality!r}"
    raise DataError(
        f"datalist {name!r}: required field 'modality_preset' is missing"
        + (f" and modality {modality!r} is not one of {sorted(MODALITY_PRESETS)}" if modality else "")
        + f": set it to one of {sorted(PRESETS)} ('mr': z-score per volume, 'ct': HU window, 'unit': [0, 1]; "
        "'flssl split' writes it) -- evaluating with the wrong preset gives meaningless scores"
    )


def load_datalist(path: str | Path) -> dict[str, Any]:
    """Load a site datalist, check its schema and resolve relative paths.

    Args:
        path: the datalist JSON file, or a folder holding ``datalist.json``.

    Returns:
        The datalist dict with ``validation``/``test`` defaulting to ``[]``, ``modality_preset`` defaulted when
        absent (MedMNIST: ``"unit"``; else from ``modality``; else an error) with ``modality_preset_reason`` and a
        logged warning, ``volumes`` (optional, Decathlon only: true = items are whole 3D volumes, not 2D slices)
        checked to be a bool, every entry's ``image``/``label``/``npz`` made absolute, every training entry's ``labelled``
        filled in (default: it has a ``label``), and ``datalist_path`` (absolute path of the file) added.

    Raises:
        DataError: missing/empty file, invalid JSON, or a schema violation (message names file, field, value).
    """
    p = Path(path).expanduser()
    if p.is_dir():
        if not any(p.iterdir()):
            raise DataError(f"data folder {str(p)!r} is empty: expected {DATALIST_NAME} (make one with "
                            f"'flssl synth' or 'flssl split')")
        p = p / DATALIST_NAME
    if not p.is_file():
        raise DataError(f"datalist {str(p)!r} does not exist (make one with 'flssl synth' or 'flssl split')")
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"datalist {str(p)!r} is empty")
    try:
        dl = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"datalist {str(p)!r} is not valid JSON: {e}") from e
    if not isinstance(dl, dict):
        raise DataError(f"datalist {str(p)!r}: top level must be a JSON object, got {type(dl).__name__}")
    name = str(p)
    for key in ("format", "task", "num_classes", "training"):
        if key not in dl:
            raise DataError(f"datalist {name!r}: required field {key!r} is missing")
    if dl["format"] not in FORMATS:
        raise DataError(f"datalist {name!r}: field 'format' = {dl['format']!r}, expected one of {list(FORMATS)}")
    if dl["task"] not in TASKS:
        raise DataError(f"datalist {name!r}: field 'task' = {dl['task']!r}, expected one of {list(TASKS)}")
    if dl["format"] == "medmnist" and dl["task"] != "classification":
        raise DataError(f"datalist {name!r}: format 'medmnist' supports task 'classification' only, "
                        f"got task={dl['task']!r}")
    if not _is_int(dl["num_classes"]) or dl["num_classes"] < 1:
        raise DataError(f"datalist {name!r}: field 'num_classes' must be an integer >= 1, got {dl['num_classes']!r}")
    if "modality_preset" not in dl:
        preset, reason = _default_preset(dl, name)
        dl["modality_preset"] = preset
        dl["modality_preset_reason"] = reason
        logger.warning("datalist %s: no 'modality_preset'; using %r (%s)", name, preset, reason)
    if "rgb" in dl and (not isinstance(dl["rgb"], bool) or (dl["rgb"] and dl["format"] not in ("medmnist", "images"))):
        raise DataError(f"datalist {name!r}: field 'rgb' = {dl['rgb']!r}: must be true or false, and true only for "
                        "formats 'medmnist' and 'images' (keeps RGB images as 3 channels)")
    if "eval_only" in dl and not isinstance(dl["eval_only"], bool):
        raise DataError(f"datalist {name!r}: field 'eval_only' = {dl['eval_only']!r}: must be true or false")
    if dl.get("eval_only") and dl["training"]:
        raise DataError(f"datalist {name!r} is evaluation-only (\"eval_only\": true) but its 'training' section has "
                        f"{len(dl['training'])} entries: remove the field or the entries")
    if "volumes" in dl and (not isinstance(dl["volumes"], bool) or (dl["volumes"] and dl["format"] != "decathlon")):
        raise DataError(f"datalist {name!r}: field 'volumes' = {dl['volumes']!r}: must be true or false, and true only "
                        "for format 'decathlon' (reads whole 3D volumes instead of 2D slices; 'flssl split "
                        "--volumes' writes it)")
    if dl["modality_preset"] not in PRESETS:
        raise DataError(f"datalist {name!r}: field 'modality_preset' = {dl['modality_preset']!r}, "
                        f"expected one of {sorted(PRESETS)}")
    base = p.resolve().parent
    for section in SECTIONS:
        dl.setdefault(section, [])
        entries = dl[section]
        if not isinstance(entries, list):
            raise DataError(f"datalist {name!r}: section {section!r} must be a list, got {type(entries).__name__}")
        for i, e in enumerate(entries):
            where = f"datalist {name!r}, {section}[{i}]"
            if not isinstance(e, dict):
                raise DataError(f"{where}: entry must be an object, got {e!r}")
            _check_entry(e, dl, section, base, where)
    dl["datalist_path"] = str(p.resolve())
    return dl


def _check_entry(e: dict[str, Any], dl: dict[str, Any], section: str, base: Path, where: str) -> None:
    labelled = e.get("labelled", "label" in e)
    if not isinstance(labelled, bool):
        raise DataError(f"{where}: field 'labelled' must be true or false, got {labelled!r}")
    if section == "training":
        e["labelled"] = labelled
    elif not labelled or "label" not in e:
        raise DataError(f"{where}: {section} entries need a 'label' (they are used for evaluation)")
    if labelled and "label" not in e:
        raise DataError(f"{where}: entry is labelled but has no 'label' field")
    if dl["format"] in ("decathlon", "images"):
        if "image" not in e:
            raise DataError(f"{where}: required field 'image' is missing")
        e["image"] = _resolve(e["image"], base, f"{where}, field 'image'")
        if dl["format"] == "images" and dl["task"] == "classification":
            if "label" in e and (not _is_int(e["label"]) or not 0 <= e["label"] < dl["num_classes"]):
                raise DataError(f"{where}{_csv_row(e, dl)}: field 'label' = {e['label']!r} is not a class id in "
                                f"range(num_classes={dl['num_classes']})")
        elif e.get("label") is not None:
            e["label"] = _resolve(e["label"], base, f"{where}, field 'label'")
        elif "label" in e:
            raise DataError(f"{where}: field 'label' is null; omit it and set \"labelled\": false instead")
    else:
        for key in ("npz", "split", "index"):
            if key not in e:
                raise DataError(f"{where}: required field {key!r} is missing")
        e["npz"] = _resolve(e["npz"], base, f"{where}, field 'npz'")
        if e["split"] not in MEDMNIST_SPLITS:
            raise DataError(f"{where}: field 'split' = {e['split']!r}, expected one of {list(MEDMNIST_SPLITS)}")
        if not _is_int(e["index"]) or e["index"] < 0:
            raise DataError(f"{where}: field 'index' must be an integer >= 0, got {e['index']!r}")
        if "label" in e and (not _is_int(e["label"]) or not 0 <= e["label"] < dl["num_classes"]):
            raise DataError(f"{where}: field 'label' = {e['label']!r} is not a class id in "
                            f"range(num_classes={dl['num_classes']})")


def _csv_row(e: dict[str, Any], dl: dict[str, Any]) -> str:
    """`` (row N of 'labels.csv')`` for an entry written from a labels CSV by ``flssl split``, else empty."""
    if dl.get("format") == "images" and _is_int(e.get("csv_row")):
        return f" (row {e['csv_row']} of {dl.get('source', 'the CSV')!r})"
    return ""


def labelled_entries(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Entries usable for supervised training: ``labelled`` (default: has a label) and with a ``label``."""
    return [e for e in entries if e.get("labelled", "label" in e) and e.get("label") is not None]


def validate_datalist(
    dl: dict[str, Any],
    sections: tuple[str, ...] | list[str] = ("training", "validation"),
    deep: bool = False,
) -> dict[str, int]:
    """Check that the data a loaded datalist lists is there (and, with ``deep``, readable and consistent).

    Always: every requested section is non-empty; every data folder exists and is not empty; every image,
    label and ``.npz`` file exists. With ``deep=True`` also: NIfTI files can be read (corrupt / truncated files
    fail), label values lie in ``range(num_classes)``, image and label shapes agree; ``.npz`` files have the
    ``{split}_images``/``{split}_labels`` keys and the indices and labels are in range; PNG/JPEG images and masks
    (format ``images``) can be decoded, a mask has its image's size and class values in range. Messages about an
    ``images`` entry name its CSV row. An evaluation-only datalist (``"eval_only": true``) asked for its
    ``training`` section says so (no job can train on it).

    Args:
        dl: a datalist from :func:`load_datalist`.
        sections: sections to check.
        deep: also read every file (slow for big datasets: reads all voxels once).

    Returns:
        Number of entries per checked section.

    Raises:
        DataError: the first problem found; the message names the datalist, the file and the bad value.
    """
    name = dl.get("datalist_path", "<datalist>")
    counts: dict[str, int] = {}
    checked_dirs: set[Path] = set()
    npz_cache: dict[str, Any] = {}
    for section in sections:
        if section not in SECTIONS:
            raise DataError(f"unknown datalist section {section!r}; valid sections: {list(SECTIONS)}")
        entries = dl.get(section) or []
        if section == "training" and dl.get("eval_only"):
            raise DataError(f"datalist {name!r} is evaluation-only (\"eval_only\": true, written by 'flssl split "
                            "--eval-only' or from a dataset with test cases only): it has no training cases, so no "
                            "job can train on it; evaluate a checkpoint on it with 'flssl evaluate --data <dir> "
                            "--split test', and train on a split of a dataset with training cases")
        if not entries:
            raise DataError(f"datalist {name!r}: section {section!r} is empty (no entries)")
        counts[section] = len(entries)
        for i, e in enumerate(entries):
            where = f"datalist {name!r}, {section}[{i}]{_csv_row(e, dl)}"
            keys = {"decathlon": ("image", "label"), "medmnist": ("npz",),
                    "images": ("image", "label") if dl["task"] == "segmentation" else ("image",)}[dl["format"]]
            for key in keys:
                if e.get(key) is None:
                    continue
                f = Path(e[key])
                folder = f.parent
                if folder not in checked_dirs:
                    if not folder.is_dir():
                        raise DataError(f"{where}: data folder {str(folder)!r} (of {key} {f.name!r}) does not exist")
                    if not any(folder.iterdir()):
                        raise DataError(f"{where}: data folder {str(folder)!r} is empty")
                    checked_dirs.add(folder)
                if not f.is_file():
                    raise DataError(f"{where}: {key} file {str(f)!r} does not exist")
            if deep:
                try:
                    if dl["format"] == "decathlon":
                        _deep_check_volume(e, int(dl["num_classes"]), where)
                    elif dl["format"] == "images":
                        _deep_check_image(e, dl, where)
                    else:
                        _deep_check_medmnist(e, int(dl["num_classes"]), where, npz_cache)
                except DataError as err:
                    msg = str(err)
                    raise (err if msg.startswith(where) else DataError(f"{where}: {msg}")) from err.__cause__
    return counts


def _deep_check_volume(e: dict[str, Any], num_classes: int, where: str) -> None:
    image = read_image(e["image"])
    if e.get("label") is None:
        return
    label = read_label(e["label"])
    if image.shape != label.shape:
        raise DataError(f"{where}: image {e['image']!r} has shape {image.shape} but label {e['label']!r} has shape "
                        f"{label.shape}")
    values = np.unique(label)
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
        raise DataError(f"{where}: label file {e['label']!r} has values {bad[:10].tolist()} outside "
                        f"range(num_classes={num_classes})")


def _deep_check_image(e: dict[str, Any], dl: dict[str, Any], where: str) -> None:
    from fl_plugins.data.images import read_image_array, read_mask_array

    image = read_image_array(e["image"])
    if dl["task"] != "segmentation" or e.get("label") is None:
        return
    mask = read_mask_array(e["label"])
    if mask.shape != image.shape[-2:]:
        raise DataError(f"{where}: image {e['image']!r} is {image.shape[-1]}x{image.shape[-2]} pixels but its mask "
                        f"{e['label']!r} is {mask.shape[1]}x{mask.shape[0]}")
    values = np.unique(mask)
    bad = values[(values < 0) | (values >= int(dl["num_classes"]))]
    if bad.size:
        raise DataError(f"{where}: mask file {e['label']!r} has values {bad[:10].tolist()} outside "
                        f"range(num_classes={dl['num_classes']}) (mask pixel values are class indices)")


def _deep_check_medmnist(e: dict[str, Any], num_classes: int, where: str, cache: dict[str, Any]) -> None:
    from fl_plugins.data.medmnist import load_npz

    arrays = cache.get(e["npz"])
    if arrays is None:
        arrays = cache[e["npz"]] = load_npz(e["npz"])
    split = e["split"]
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    if e["index"] >= len(images):
        raise DataError(f"{where}: index {e['index']} out of range for {split}_images of {e['npz']!r} "
                        f"({len(images)} images)")
    lab = int(np.asarray(labels[e["index"]]).reshape(-1)[0])
    if not 0 <= lab < num_classes:
        raise DataError(f"{where}: {split}_labels[{e['index']}] = {lab} in {e['npz']!r} is outside "
                        f"range(num_classes={num_classes})")


def write_datalist(dl: dict[str, Any], path: str | Path) -> Path:
    """Write a datalist as indented, key-sorted JSON (byte-identical for identical content).

    ``datalist_path`` (added by :func:`load_datalist`) is not written.
    """
    p = Path(path)
    atomic_write_json({k: v for k, v in dl.items() if k != "datalist_path"}, p, indent=1, sort_keys=True)
    return p
