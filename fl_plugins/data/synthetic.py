"""Synthetic "phantom" data for tests, CI and the quickstart (methods-spec 9.2): users need no real data.

Two generators, both deterministic given ``seed`` (same seed -> byte-identical files):

* :func:`generate_synthetic_segmentation`: cardiac-like short-axis NIfTI volumes ``[H, W, D]`` with exact labels,
  one Decathlon-format datalist per site (``<out_dir>/site-N/datalist.json``).
* :func:`generate_synthetic_multitask`: one MedMNIST-format ``.npz`` per site, each site a different 2D
  classification task (shape / texture / position classes with different class counts), for MedUniverse-style
  stage-wise training.

Anatomy of a segmentation phantom (normalised coordinates, image half-width = 1; ``t = z / (D - 1)`` runs from
apex, t=0, to base, t=1):

* ``body``: a large ellipse of soft tissue (label 0);
* ``cavity`` (label 1): a deformed ellipse whose radius grows smoothly from 0.08 at the apex to 0.28 at the base
  (``0.08 + 0.20 sin(pi t / 2)``), so area differs ~10x between apex and base and little between neighbours;
* ``wall`` (label 2): a ring around the cavity, thickness ``0.10 - 0.025 t`` (~3 px at 64 px);
* ``organ-2`` (label 3, only with ``num_classes=4``): a crescent beside the wall whose radius grows from 0 at
  ``t <= 0.15`` to 0.24 at the base (like the right ventricle, absent at the apex).

Every volume gets its own random centre, drift and twist over slices, orientation, aspect ratio, scale,
2nd/3rd-harmonic boundary wobble and a smooth low-frequency displacement field (the per-volume deformation);
labels are evaluated on the deformed grid, so they are exact. Image edges are blended over ~1 px (partial volume).
Every site gets a domain shift: contrast inversion inside the body (site-2 only), contrast, gamma, a smooth
multiplicative bias field, Rician noise and a scanner gain (MR intensities have no fixed scale).
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from fl_plugins.data.datalist import DATALIST_NAME, write_datalist
from fl_plugins.data.errors import DataError

__all__ = [
    "SiteShift",
    "site_name",
    "site_shift",
    "phantom_volume",
    "generate_synthetic_segmentation",
    "generate_synthetic_multitask",
    "MULTITASK_KINDS",
    "SHAPES",
    "write_npz_deterministic",
]

SEG_LABELS = {"0": "background", "1": "cavity", "2": "wall", "3": "organ-2"}
# Voxel spacing written to the NIfTI header (mm): typical cine-MRI short-axis stacks have ~1.5 mm in-plane and
# 8-10 mm slice spacing (Bernard et al. 2018, ACDC). Only metadata: no code here resamples by spacing.
PHANTOM_SPACING_MM = (1.5, 1.5, 8.0)
INVERTED_SITE = 1  # 0-based site index whose contrast is inverted (site-2), "contrast inversion for one site"


def site_name(i: int) -> str:
    """FLARE simulator site name of 0-based site ``i``: ``site-1``, ``site-2``, ..."""
    return f"site-{i + 1}"


@dataclass(frozen=True)
class SiteShift:
    """One site's acquisition differences (the domain shift)."""

    invert: bool  # contrast inversion inside the body (e.g. T1- vs T2-like contrast)
    contrast: float  # stretch around 0.5 before gamma
    gamma: float  # v -> v ** gamma
    bias_amplitude: float  # log-amplitude of the smooth multiplicative bias field
    bias_coeffs: tuple[float, float, float, float, float]  # x, y, xy, x^2-y^2, through-slice
    noise_sigma: float  # Rician noise std relative to a signal range of ~1
    gain: float  # scanner units per unit signal


def site_shift(seed: int, site_index: int) -> SiteShift:
    """Deterministic domain-shift parameters of a site (ranges chosen so sites differ visibly but stay MR-like:
    gamma 0.6-1.6, bias 10-35 % log-amplitude, noise 2-7 % of the signal range, gain 300-1500 units)."""
    rng = np.random.default_rng([int(seed), 1, int(site_index)])
    coeffs = rng.normal(size=5)
    coeffs = coeffs / np.linalg.norm(coeffs)
    return SiteShift(
        invert=site_index == INVERTED_SITE,
        contrast=float(rng.uniform(0.8, 1.25)),
        gamma=float(rng.uniform(0.6, 1.6)),
        bias_amplitude=float(rng.uniform(0.10, 0.35)),
        bias_coeffs=tuple(float(c) for c in coeffs),  # type: ignore[arg-type]
        noise_sigma=float(rng.uniform(0.02, 0.07)),
        gain=float(rng.uniform(300.0, 1500.0)),
    )


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def phantom_volume(
    rng: np.random.Generator,
    shift: SiteShift,
    num_slices: int = 12,
    size: int = 64,
    num_classes: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one phantom volume.

    Args:
        rng: the volume's random generator (deformation, tissue intensities, noise).
        shift: the site's domain shift.
        num_slices: ``D`` (slices along the last axis, apex first).
        size: in-plane side ``H = W``.
        num_classes: 2 (cavity), 3 (+ wall) or 4 (+ organ-2), background included; unlabelled structures are
            still drawn in the image.

    Returns:
        image float32 ``[H, W, D]`` (scanner units, >= 0) and label uint8 ``[H, W, D]`` with values in
        ``range(num_classes)``.
    """
    h = w = size
    d = num_slices
    px = 2.0 / size  # one pixel in normalised units
    t = np.linspace(0.0, 1.0, d) if d > 1 else np.array([0.5])
    yy, xx = np.meshgrid((np.arange(h) + 0.5) * px - 1.0, (np.arange(w) + 0.5) * px - 1.0, indexing="ij")
    X, Y, T = xx[..., None], yy[..., None], t[None, None, :]  # broadcast to [H, W, D]

    # per-volume deformation: smooth low-frequency displacement field (amplitude <= 0.03 = ~1 px at 64 px)
    amp = rng.uniform(0.0, 0.03, size=2)
    fr = rng.uniform(1.0, 2.5, size=2)
    ph = rng.uniform(0, 2 * np.pi, size=2)
    Xd = X + amp[0] * np.sin(np.pi * fr[0] * Y + ph[0] + T)
    Yd = Y + amp[1] * np.sin(np.pi * fr[1] * X + ph[1] - T)

    scale = rng.uniform(0.9, 1.1)
    aspect = rng.uniform(0.85, 1.15)
    c0 = rng.uniform(-0.06, 0.06, size=2)
    drift = rng.uniform(-0.05, 0.05, size=2)
    theta = rng.uniform(0, np.pi) + rng.uniform(-0.3, 0.3) * T  # orientation twists smoothly with t
    wob = rng.uniform(0.0, 0.06, size=2)
    wob_ph = rng.uniform(0, 2 * np.pi, size=2)
    organ_dir = np.pi + rng.uniform(-0.4, 0.4)  # organ-2 sits on the left, like the RV

    cx = c0[0] + drift[0] * np.sin(np.pi * T)
    cy = c0[1] + drift[1] * np.sin(np.pi * T)
    dx, dy = Xd - cx, Yd - cy
    ex = (dx * np.cos(theta) + dy * np.sin(theta)) / aspect
    ey = (-dx * np.sin(theta) + dy * np.cos(theta)) * aspect
    rho = np.hypot(ex, ey)
    ang = np.arctan2(ey, ex)
    wobble = 1.0 + wob[0] * np.cos(2 * ang + wob_ph[0]) + wob[1] * np.cos(3 * ang + wob_ph[1])

    r_cav = scale * (0.08 + 0.20 * np.sin(0.5 * np.pi * T)) * wobble
    r_wall = r_cav + scale * (0.10 - 0.025 * T) * wobble
    s = np.clip((T - 0.15) / 0.85, 0.0, 1.0)
    r_org = scale * 0.24 * s * s * (3 - 2 * s)  # smoothstep: 0 at the apex, grows smoothly to the base
    oc = r_wall.mean() * 1.05  # organ-2 centre just outside the wall's mean outer radius
    ox, oy = cx + oc * np.cos(organ_dir), cy + oc * np.sin(organ_dir)
    rho_org = np.hypot((Xd - ox) / 1.3, Yd - oy)  # elongated crescent
    body_r = rng.uniform(0.8, 0.9, size=2)
    rho_body = np.hypot(Xd / body_r[0], Yd / body_r[1])

    # signed distances in pixels (negative inside): exact labels by threshold, soft image edges by sigmoid
    sd_cav = (rho - r_cav) / px
    sd_wall = (rho - r_wall) / px
    sd_org = np.where(r_org > 0, (rho_org - r_org) / px, np.inf)
    sd_body = (rho_body - 1.0) / px * 0.9

    label = np.zeros((h, w, d), dtype=np.uint8)
    if num_classes >= 4:
        label[(sd_org < 0) & (sd_wall >= 0)] = 3
    if num_classes >= 3:
        label[(sd_wall < 0) & (sd_cav >= 0)] = 2
    label[sd_cav < 0] = 1

    # tissue intensities (bSSFP-like: blood bright, myocardium dark), jittered per volume
    i_body, i_wall, i_cav, i_org = np.array([0.45, 0.12, 0.9, 0.72]) + rng.uniform(-0.04, 0.04, size=4)
    m_body, m_wall, m_cav = _sigmoid(-sd_body), _sigmoid(-sd_wall), _sigmoid(-sd_cav)
    m_org = _sigmoid(-sd_org) * (1.0 - m_wall)
    tissue = i_body + (i_wall - i_body) * m_wall + (i_cav - i_wall) * m_cav + (i_org - i_body) * m_org
    texture = 0.03 * np.sin(7 * Xd + 3 * Yd + rng.uniform(0, 6.3)) * np.sin(5 * Yd - 4 * Xd + rng.uniform(0, 6.3))
    tissue = tissue + texture
    if shift.invert:
        tissue = 1.05 - tissue
    tissue = np.clip(0.5 + shift.contrast * (tissue - 0.5), 0.02, None) ** shift.gamma
    v = m_body * tissue  # air outside the body stays dark in every contrast

    b = shift.bias_coeffs
    bias = np.exp(shift.bias_amplitude * (b[0] * X + b[1] * Y + b[2] * X * Y + b[3] * (X**2 - Y**2) + b[4] * (T - 0.5)))
    v = v * bias
    n1 = rng.normal(0.0, shift.noise_sigma, size=v.shape)
    n2 = rng.normal(0.0, shift.noise_sigma, size=v.shape)
    v = np.sqrt((v + n1) ** 2 + n2**2)  # magnitude of complex Gaussian noise = Rician
    return (v * shift.gain).astype(np.float32), label


def _save_nifti(arr: np.ndarray, path: Path) -> None:
    affine = np.diag([*PHANTOM_SPACING_MM, 1.0])
    img = nib.Nifti1Image(arr, affine)
    img.header.set_data_dtype(arr.dtype)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def generate_synthetic_segmentation(
    out_dir: str | Path,
    num_sites: int = 2,
    volumes_per_site: int = 4,
    num_slices: int = 12,
    size: int = 64,
    num_classes: int = 3,
    labelled_per_site: int | None = None,
    seed: int = 0,
) -> list[Path]:
    """Write phantom NIfTI volumes and one datalist per site.

    Layout: ``<out_dir>/site-N/{imagesTr,labelsTr}/site-N_caseNNN.nii.gz`` and ``<out_dir>/site-N/datalist.json``
    (paths relative to the datalist). Each site's last volume is its ``test`` section, the one before its
    ``validation`` section, the rest ``training``; each volume is one "patient".

    Args:
        out_dir: output folder (created).
        num_sites: number of sites (>= 1).
        volumes_per_site: volumes per site (>= 3: one training, one validation, one test at least).
        num_slices: slices per volume ``D`` (>= 2; methods-spec 9.2: 12-16).
        size: in-plane side ``H = W`` (>= 16; methods-spec 9.2: 64).
        num_classes: 2, 3 or 4 label classes including background.
        labelled_per_site: mark only the first N training volumes ``"labelled": true`` (None = all).
        seed: random seed; same seed -> byte-identical files.

    Returns:
        The site datalist paths, ``site-1`` first.

    Raises:
        DataError: an argument out of range.
    """
    _check_int("num_sites", num_sites, 1)
    _check_int("volumes_per_site", volumes_per_site, 3)
    _check_int("num_slices", num_slices, 2)
    _check_int("size", size, 16)
    if num_classes not in (2, 3, 4):
        raise DataError(f"synthetic segmentation: num_classes must be 2, 3 or 4, got {num_classes!r}")
    n_train = volumes_per_site - 2
    if labelled_per_site is not None:
        _check_int("labelled_per_site", labelled_per_site, 1)
        if labelled_per_site > n_train:
            raise DataError(f"synthetic segmentation: labelled_per_site={labelled_per_site} exceeds the "
                            f"{n_train} training volumes per site (volumes_per_site={volumes_per_site})")
    out = Path(out_dir)
    paths = []
    for si in range(num_sites):
        site = site_name(si)
        shift = site_shift(seed, si)
        site_dir = out / site
        (site_dir / "imagesTr").mkdir(parents=True, exist_ok=True)
        (site_dir / "labelsTr").mkdir(parents=True, exist_ok=True)
        entries = []
        for vi in range(volumes_per_site):
            rng = np.random.default_rng([int(seed), 2, si, vi])
            image, label = phantom_volume(rng, shift, num_slices=num_slices, size=size, num_classes=num_classes)
            case = f"{site}_case{vi:03d}"
            _save_nifti(image, site_dir / "imagesTr" / f"{case}.nii.gz")
            _save_nifti(label, site_dir / "labelsTr" / f"{case}.nii.gz")
            entries.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz",
                            "patient": case})
        training = [dict(e, labelled=labelled_per_site is None or i < labelled_per_site)
                    for i, e in enumerate(entries[:n_train])]
        dl = {
            "format": "decathlon",
            "dataset": "synthetic_phantom",
            "task": "segmentation",
            "modality_preset": "mr",
            "num_classes": num_classes,
            "labels": {k: v for k, v in SEG_LABELS.items() if int(k) < num_classes},
            "site": site,
            "seed": seed,
            "domain_shift": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(shift).items()},
            "training": training,
            "validation": [entries[n_train]],
            "test": [entries[n_train + 1]],
        }
        paths.append(write_datalist(dl, site_dir / DATALIST_NAME))
    return paths


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise DataError(f"synthetic data: {name} must be an integer >= {minimum}, got {value!r}")


# ------------------------------------------------------------------------------------------ 2D multi-task variant
MULTITASK_KINDS = ("shape", "texture", "position")
SHAPES = ("disk", "square", "triangle", "cross", "ring", "diamond")


def _render_2d(kind: str, c: int, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One 2D image in [0, 1] of class ``c`` of ``n`` for a task kind, float ``[size, size]``."""
    yy, xx = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="ij")
    bg = rng.uniform(0.05, 0.3)
    fg = rng.uniform(0.6, 1.0)
    img = np.full((size, size), bg)
    if kind == "shape":
        cy, cx = size / 2 + rng.uniform(-0.1, 0.1, size=2) * size
        r = rng.uniform(0.25, 0.35) * size
        a = rng.uniform(-0.25, 0.25)  # small rotation only: a rotated square must not look like a diamond
        u = ((xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)) / r
        v = (-(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)) / r
        name = SHAPES[c]
        if name == "disk":
            m = u**2 + v**2 <= 1
        elif name == "square":
            m = (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8)
        elif name == "triangle":
            m = (v <= 0.7) & (v >= -0.9 + 2 * np.abs(u))
        elif name == "cross":
            m = ((np.abs(u) <= 0.3) & (np.abs(v) <= 1)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1))
        elif name == "ring":
            m = (u**2 + v**2 <= 1) & (u**2 + v**2 >= 0.4)
        else:  # diamond
            m = np.abs(u) + np.abs(v) <= 1
        img[m] = fg
    elif kind == "texture":
        ang = np.pi * c / n + rng.uniform(-0.25, 0.25) * np.pi / n  # orientation class, jitter < half a gap
        freq = rng.uniform(0.18, 0.28)  # cycles per pixel: 3.6-5.6 px period, resolvable at 28 px
        phase = rng.uniform(0, 2 * np.pi)
        img = bg + (fg - bg) * (0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(ang) + yy * np.sin(ang)) + phase))
    else:  # position: a blob at the c-th of n positions on a circle
        ang = 2 * np.pi * c / n + rng.uniform(-0.2, 0.2) * np.pi / n
        rad = 0.3 * size
        cy, cx = size / 2 + rad * np.sin(ang), size / 2 + rad * np.cos(ang)
        sig = rng.uniform(0.06, 0.09) * size
        img = bg + (fg - bg) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sig**2))
    return img


def write_npz_deterministic(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write a compressed ``.npz`` with fixed zip timestamps (``numpy.savez_compressed`` stamps the current time,
    so identical data would give different bytes)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())
    return p


def generate_synthetic_multitask(
    out_dir: str | Path,
    class_counts: tuple[int, ...] | list[int] = (2, 3, 4),
    images_per_site: int = 120,
    size: int = 28,
    seed: int = 0,
    labelled_per_site: int | None = None,
) -> list[Path]:
    """Write one MedMNIST-format ``.npz`` and datalist per site, each site a different classification task.

    Site ``k`` (0-based) gets ``class_counts[k]`` classes of task kind ``MULTITASK_KINDS[k % 3]``: shape type
    (up to 6 classes; more fall back to texture), stripe orientation (texture) or blob position. Per-site
    contrast, gamma and noise differ as in the segmentation phantoms. Splits: ``val`` and ``test`` hold
    ``max(n_classes, images_per_site // 6)`` images each, ``train`` the rest; classes are balanced.

    Args:
        out_dir: output folder; writes ``<out_dir>/site-N/{synth_<kind>_<n>cls.npz, datalist.json}``.
        class_counts: classes per site (each >= 2); its length is the number of sites.
        images_per_site: images per site over all splits (120 default: 80 train / 20 val / 20 test, seconds).
        size: image side (28 = MedMNIST's native size).
        seed: random seed; same seed -> byte-identical files.
        labelled_per_site: mark only the first N training images ``"labelled": true`` (None = all).

    Returns:
        The site datalist paths, ``site-1`` first.
    """
    counts = list(class_counts)
    if not counts:
        raise DataError("synthetic multitask: class_counts is empty (one class count per site)")
    _check_int("size", size, 8)
    out = Path(out_dir)
    paths = []
    for si, n in enumerate(counts):
        _check_int(f"class_counts[{si}]", n, 2)
        n_eval = max(n, images_per_site // 6)
        n_train = images_per_site - 2 * n_eval
        if n_train < n:
            raise DataError(f"synthetic multitask: images_per_site={images_per_site} is too few for "
                            f"{n} classes (need >= {3 * n})")
        if labelled_per_site is not None:
            _check_int("labelled_per_site", labelled_per_site, 1)
            if labelled_per_site > n_train:
                raise DataError(f"synthetic multitask: labelled_per_site={labelled_per_site} exceeds the "
                                f"{n_train} training images of site {site_name(si)}")
        kind = MULTITASK_KINDS[si % len(MULTITASK_KINDS)]
        if kind == "shape" and n > len(SHAPES):
            kind = "texture"
        site = site_name(si)
        shift = site_shift(seed, si)
        rng = np.random.default_rng([int(seed), 3, si])
        arrays: dict[str, np.ndarray] = {}
        sizes = {"train": n_train, "val": n_eval, "test": n_eval}
        for split, m in sizes.items():
            labels = rng.permutation(np.arange(m) % n)
            imgs = np.empty((m, size, size), dtype=np.uint8)
            for j, c in enumerate(labels):
                x = _render_2d(kind, int(c), n, size, rng)
                if shift.invert:
                    x = 1.0 - x
                x = np.clip(0.5 + shift.contrast * (x - 0.5), 0.0, 1.0) ** shift.gamma
                x = x + rng.normal(0.0, shift.noise_sigma, size=x.shape)
                imgs[j] = np.round(np.clip(x, 0.0, 1.0) * 255).astype(np.uint8)
            arrays[f"{split}_images"] = imgs
            arrays[f"{split}_labels"] = labels.astype(np.uint8).reshape(-1, 1)  # MedMNIST: uint8 (N, 1)
        fname = f"synth_{kind}_{n}cls.npz"
        write_npz_deterministic(out / site / fname, arrays)

        def _entries(split: str, train: bool) -> list[dict[str, Any]]:
            lab = arrays[f"{split}_labels"][:, 0]  # noqa: B023 - used immediately
            rows = []
            for i in range(len(lab)):
                e: dict[str, Any] = {"npz": f"./{fname}", "split": split, "index": i, "label": int(lab[i])}  # noqa: B023
                if train:
                    e["labelled"] = labelled_per_site is None or i < labelled_per_site
                rows.append(e)
            return rows

        names = list(SHAPES[:n]) if kind == "shape" else [f"{kind}-{c}" for c in range(n)]
        dl = {
            "format": "medmnist",
            "dataset": f"synthetic_{kind}",
            "task": "classification",
            "modality_preset": "unit",
            "num_classes": n,
            "labels": {str(c): names[c] for c in range(n)},
            "site": site,
            "seed": seed,
            "training": _entries("train", True),
            "validation": _entries("val", False),
            "test": _entries("test", False),
        }
        paths.append(write_datalist(dl, out / site / DATALIST_NAME))
    return paths
