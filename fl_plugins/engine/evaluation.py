"""Held-out evaluation of a global checkpoint over several sites' splits (the ``flssl evaluate`` command).

Segmentation reports per-volume Dice (mean over foreground classes, MONAI semantics, at the model's slice
resolution) as mean ± sd over all volumes of all sites; classification reports accuracy over all images.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["evaluate_sites"]


def _stats(values: list[float]) -> dict[str, float | int]:
    v = np.array([x for x in values if not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def evaluate_sites(
    model_cfg: dict[str, Any],
    state_dict: dict[str, Any],
    datalists: list[Path],
    split: str = "test",
    image_size: int | None = None,
) -> dict[str, Any]:
    """Evaluate one model on ``split`` of every datalist.

    Returns:
        ``{"metric", "split", "sites": {site: {"mean", "std", "n", ...}}, "overall": {"mean", "std", "n"},
        "per_item": {site: {volume_id: dice}}}`` (classification: per-image correctness).
    """
    from fl_plugins.data import build_dataset, load_datalist, validate_datalist
    from fl_plugins.engine.finetune import evaluate_checkpoint

    if image_size is None:
        bb = model_cfg.get("backbone") or {}
        image_size = int(bb.get("img_size", 64))
    sites: dict[str, Any] = {}
    per_item: dict[str, Any] = {}
    everything: list[float] = []
    metric = None
    for p in datalists:
        dl = load_datalist(p)
        validate_datalist(dl, sections=(split,), deep=False)
        site = dl.get("site") or Path(p).parent.name
        ds = build_dataset(dl, dl[split], image_size=image_size, with_labels=True)
        r = evaluate_checkpoint(model_cfg, state_dict, ds, dl["task"])
        if dl["task"] == "segmentation":
            metric = "dice"
            vals = [float(x) for x in r["per_volume"].values()]
            per_item[site] = r["per_volume"]
            sites[site] = {**_stats(vals), "dice_per_class": r["dice_per_class"]}
        else:
            metric = "accuracy"
            vals = [float(x) for x in r["per_sample"]]
            per_item[site] = r["per_sample"]
            sites[site] = {**_stats(vals), "balanced_accuracy": r["balanced_accuracy"], "auc": r["auc"]}
        everything += vals
    return {"metric": metric, "split": split, "sites": sites, "overall": _stats(everything), "per_item": per_item}
