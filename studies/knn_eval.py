"""Held-out k-NN of pretrained backbones against random-init ViTs of the same shape, per site, with paired tests.

The job's k-NN monitor is small (at most 256 queries per site; 62-78 on the ACDC sites of the results), so a rise of
a few points is within its noise. This study measures the same quantity on every held-out slice a site has:

* bank: up to ``--bank`` of the site's training slices (seeded sample), queries: every validation and test slice;
* label: the k-NN monitor's own (slice-position partition of the volume, no annotation read; MedMNIST: the class);
* features: the backbone's CLS output in eval mode; weighted k-NN, k = 20, T = 0.07 (``fl_plugins.engine.knn``).

For each ``--backbone`` file (``flssl export-backbone``) and for ``--random N`` random-init ViTs (torch seeds
0..N-1, the job's backbone spec) it prints the accuracy per site and pooled over sites, and for each backbone
against each random init an exact McNemar test on the paired per-query correctness (two-sided binomial test on
the discordant pairs; scipy).

Example::

    python studies/knn_eval.py --data runs/pre3 --backbone runs/dino_long_vit.pt --random 5 --out runs/knn_eval.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def site_items(datalist: Path, image_size: int, bank: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(bank items, query items) ``{"image": [1, S, S], "label": int}`` of one site."""
    from fl_plugins.data import build_dataset, load_datalist
    from fl_plugins.engine.knn import knn_items

    dl = load_datalist(datalist)
    medmnist = dl["format"] == "medmnist"
    train = build_dataset(dl, dl["training"], image_size=image_size, with_labels=medmnist)
    held_out = [e for sec in ("validation", "test") for e in dl.get(sec, [])]
    if not held_out:
        raise SystemExit(f"{datalist}: no validation or test entries to query")
    queries = build_dataset(dl, held_out, image_size=image_size, with_labels=medmnist)
    return knn_items(train, bank, seed), knn_items(queries, len(queries), seed)


def correct(backbone: torch.nn.Module, bank: list[dict], queries: list[dict]) -> np.ndarray:
    """Per-query correctness (bool ``[Q]``) of the weighted k-NN."""
    from fl_plugins.engine.knn import extract_features, knn_predict

    bf, by = extract_features(backbone, bank)
    qf, qy = extract_features(backbone, queries)
    n_classes = int(max(by.max(), qy.max())) + 1
    return (knn_predict(bf, by, qf, 20, 0.07, n_classes) == qy).numpy()


def mcnemar(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Exact McNemar test of paired correctness ``a`` vs ``b``: discordant counts and the two-sided p-value."""
    from scipy.stats import binomtest

    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    p = binomtest(a_only, a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
    return {"a_only": a_only, "b_only": b_only, "p": float(p)}


def main(argv: list[str] | None = None) -> int:
    from fl_plugins.flare.job_builder import job_settings
    from fl_plugins.models.backbone import BackboneSpec, create_backbone, load_backbone_state

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder of <site>/datalist.json")
    p.add_argument("--backbone", nargs="*", default=[], help="exported backbone file(s)")
    p.add_argument("--random", type=int, default=5, help="random-init ViTs to compare with (torch seeds 0..N-1)")
    p.add_argument("--job", default="dino_pretrain", help="registered job whose dino.backbone spec to build")
    p.add_argument("--bank", type=int, default=1024, help="max training slices per site in the k-NN bank")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    sites = sorted(d for d in Path(a.data).iterdir() if (d / "datalist.json").is_file())
    if not sites:
        p.error(f"--data {a.data!r} has no <site>/datalist.json")
    for f in a.backbone:
        if not Path(f).is_file():
            p.error(f"--backbone {f!r} does not exist")
    spec = BackboneSpec.from_dict(job_settings(a.job)["dino"]["backbone"])

    models: dict[str, torch.nn.Module] = {}
    for f in a.backbone:
        m = create_backbone(spec)
        load_backbone_state(m, f)
        models[Path(f).name] = m
    for s in range(a.random):
        torch.manual_seed(s)
        models[f"random-init seed {s}"] = create_backbone(spec)

    t0 = time.perf_counter()
    hits: dict[str, dict[str, np.ndarray]] = {name: {} for name in models}
    sizes: dict[str, tuple[int, int]] = {}
    for site in sites:
        bank, queries = site_items(site / "datalist.json", spec.img_size, a.bank)
        sizes[site.name] = (len(bank), len(queries))
        for name, m in models.items():
            hits[name][site.name] = correct(m, bank, queries)
        print(f"[{time.perf_counter() - t0:5.0f}s] {site.name}: bank {len(bank)}, queries {len(queries)}", flush=True)

    out: dict[str, Any] = {"sites": {s: {"bank": b, "queries": q} for s, (b, q) in sizes.items()}, "accuracy": {},
                           "mcnemar": {}}
    names = list(models)
    print("| model | " + " | ".join(f"{s} (n={sizes[s][1]})" for s in sizes) + " | pooled |")
    print("|---" * (len(sizes) + 2) + "|")
    for name in names:
        pooled = np.concatenate([hits[name][s] for s in sizes])
        acc = {s: float(hits[name][s].mean()) for s in sizes} | {"pooled": float(pooled.mean())}
        out["accuracy"][name] = acc
        print(f"| {name} | " + " | ".join(f"{acc[s]:.3f}" for s in sizes) + f" | {acc['pooled']:.3f} |")
    for f in [Path(x).name for x in a.backbone]:
        for r in [n for n in names if n.startswith("random-init")]:
            res = {s: mcnemar(hits[f][s], hits[r][s]) for s in sizes}
            res["pooled"] = mcnemar(np.concatenate([hits[f][s] for s in sizes]),
                                    np.concatenate([hits[r][s] for s in sizes]))
            out["mcnemar"][f"{f} vs {r}"] = res
            print(f"McNemar {f} vs {r}: " + "; ".join(
                f"{s} +{v['a_only']}/-{v['b_only']} p={v['p']:.3g}" for s, v in res.items()))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
