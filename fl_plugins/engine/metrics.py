"""Evaluation metrics: per-volume Dice (MONAI) for slice-wise segmentation, accuracy for classification.

Segmentation (methods-spec 8.2: "Dice per class per volume (background excluded), mean over volumes"):

* slice predictions are grouped by the item's ``volume_id`` and stacked in ``slice_index`` order into a volume
  ``[H, W, D]`` (the contract's slice axis is the last one); items without a ``volume_id`` count as one-slice
  volumes. Dice is therefore computed **at the model's (resized) slice resolution S x S**, not at the native
  voxel grid -- resizing labels back is left to a separate native-resolution evaluation.
* per volume and foreground class, ``monai.metrics.compute_dice`` on MONAI one-hot maps with
  ``include_background=False``.
* empty classes follow MONAI's ``ignore_empty`` (default True, MONAI's own default): when a class is absent from
  a volume's ground truth its Dice is NaN (whatever the prediction -- false positives on such a volume are not
  penalised) and NaNs are skipped in every mean. With ``ignore_empty=False`` the class scores 1.0 when absent from
  both prediction and ground truth and 0.0 when only predicted.
* ``dice_per_class[c]`` = NaN-skipping mean over volumes; ``dice`` = NaN-skipping mean of ``dice_per_class``
  (the mean over classes and volumes); ``per_volume[v]`` = NaN-skipping mean over the classes of volume ``v``
  (for mean +- sd over patients). A value is NaN only when every contributing entry is NaN.

Classification: top-1 accuracy over items.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.metrics import compute_dice
from monai.networks.utils import one_hot

__all__ = ["dice_per_class", "accuracy", "mean_interval", "SegmentationMetric", "ClassificationMetric"]


def dice_per_class(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_empty: bool = True) -> torch.Tensor:
    """Dice of each foreground class for one volume (or one image).

    Args:
        pred: predicted label map, integer, any spatial shape (e.g. ``[H, W, D]`` or ``[H, W]``).
        target: ground-truth label map, same shape as ``pred``.
        num_classes: number of classes including background (label 0).
        ignore_empty: MONAI ``ignore_empty`` (see module docstring).

    Returns:
        float tensor ``[num_classes - 1]`` (classes 1..K-1), NaN where ignored.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != label shape {tuple(target.shape)}")
    for name, t in (("prediction", pred), ("label", target)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            raise ValueError(f"{name} values must be in [0, {num_classes - 1}], got [{int(t.min())}, {int(t.max())}]")
    p = one_hot(pred.long().reshape(1, 1, *pred.shape), num_classes)  # [1, K, *spatial]
    y = one_hot(target.long().reshape(1, 1, *target.shape), num_classes)
    return compute_dice(p, y, include_background=False, ignore_empty=ignore_empty)[0].float()


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Top-1 accuracy.

    Args:
        pred: logits ``[B, K]`` or predicted labels ``[B]``.
        target: labels ``[B]``.

    Returns:
        fraction of correct predictions (NaN for an empty batch).
    """
    if pred.ndim == 2:
        pred = pred.argmax(dim=1)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != label shape {tuple(target.shape)}")
    if target.numel() == 0:
        return float("nan")
    return float((pred.long() == target.long()).float().mean())


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


class SegmentationMetric:
    """Accumulates slice predictions and computes per-volume Dice (see module docstring).

    Args:
        num_classes: number of classes including background.
        ignore_empty: MONAI ``ignore_empty`` semantics for classes absent from a volume's ground truth.
    """

    def __init__(self, num_classes: int, ignore_empty: bool = True) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_empty = ignore_empty
        self._slices: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._anon = 0

    def reset(self) -> None:
        """Forget every accumulated slice."""
        self._slices.clear()
        self._anon = 0

    def update(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        volume_ids: Sequence[str] | None = None,
        slice_indices: Sequence[int] | None = None,
    ) -> None:
        """Add a batch of slices.

        Args:
            pred: predicted labels ``[B, H, W]`` (integer; take ``logits.argmax(1)``).
            target: labels ``[B, H, W]``.
            volume_ids: volume of each slice (None: every slice is its own volume).
            slice_indices: position of each slice in its volume (required with ``volume_ids``).
        """
        if pred.shape != target.shape or pred.ndim != 3:
            raise ValueError(f"expected pred and target [B, H, W], got {tuple(pred.shape)} and {tuple(target.shape)}")
        b = pred.shape[0]
        if volume_ids is None:
            volume_ids = [f"__item{self._anon + i}" for i in range(b)]
            slice_indices = [0] * b
            self._anon += b
        if slice_indices is None or len(volume_ids) != b or len(slice_indices) != b:
            raise ValueError("volume_ids and slice_indices must both be given, one per slice")
        dtype = torch.uint8 if self.num_classes <= 256 else torch.int64
        for i in range(b):
            vid, si = str(volume_ids[i]), int(slice_indices[i])
            vol = self._slices.setdefault(vid, {})
            if si in vol:
                raise ValueError(f"slice {si} of volume {vid!r} was given twice")
            vol[si] = (pred[i].detach().to("cpu", dtype), target[i].detach().to("cpu", dtype))

    def volume_dice(self) -> dict[str, list[float]]:
        """Dice per foreground class of every accumulated volume (NaN where ignored), by volume id."""
        out = {}
        for vid, vol in self._slices.items():
            order = sorted(vol)
            p = torch.stack([vol[s][0] for s in order], dim=-1)  # [H, W, D]
            y = torch.stack([vol[s][1] for s in order], dim=-1)
            out[vid] = dice_per_class(p, y, self.num_classes, self.ignore_empty).tolist()
        return out

    def compute(self) -> dict:
        """Aggregate.

        Returns:
            ``{"dice": float, "dice_per_class": [K-1 floats], "per_volume": {volume_id: float},
            "num_volumes": int}``; NaN-skipping means as documented in the module docstring.
        """
        per_vol = self.volume_dice()
        k = self.num_classes - 1
        per_class = [_nanmean([d[c] for d in per_vol.values()]) for c in range(k)]
        return {
            "dice": _nanmean(per_class),
            "dice_per_class": per_class,
            "per_volume": {vid: _nanmean(d) for vid, d in per_vol.items()},
            "num_volumes": len(per_vol),
        }


class ClassificationMetric:
    """Accumulates predictions; computes accuracy, balanced accuracy and macro one-vs-rest AUC.

    Balanced accuracy = the mean over classes present in the targets of each class's recall (so predicting the
    majority class everywhere scores ``1 / K_present``, whatever the imbalance). Macro AUC = the mean over classes
    with both positives and negatives of the one-vs-rest ROC AUC of the class probability (Mann-Whitney U with
    ties counted half); it needs logits (``update`` with ``[B, K]``), else NaN.
    """

    def __init__(self) -> None:
        self._pred: list[torch.Tensor] = []
        self._target: list[torch.Tensor] = []
        self._prob: list[torch.Tensor] = []

    def reset(self) -> None:
        """Forget every accumulated prediction."""
        self._pred.clear()
        self._target.clear()
        self._prob.clear()

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch.

        Args:
            pred: logits ``[B, K]`` or predicted labels ``[B]``.
            target: labels ``[B]``.
        """
        target = target.reshape(-1).long().cpu()
        if pred.ndim == 2:
            self._prob.append(torch.softmax(pred.detach().float().cpu(), dim=1))
            pred = pred.argmax(dim=1)
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != label shape {tuple(target.shape)}")
        self._pred.append(pred.long().cpu())
        self._target.append(target)

    def compute(self) -> dict:
        """Returns ``{"accuracy", "balanced_accuracy", "auc" (NaN when not computable), "num_samples",
        "per_sample": [0/1 ...]}``; every score is NaN when nothing was accumulated."""
        nan = float("nan")
        if not self._pred:
            return {"accuracy": nan, "balanced_accuracy": nan, "auc": nan, "num_samples": 0, "per_sample": []}
        pred, target = torch.cat(self._pred), torch.cat(self._target)
        correct = (pred == target).to(torch.uint8)
        recalls = [float(correct[target == k].float().mean()) for k in target.unique().tolist()]
        auc = nan
        if self._prob and sum(p.shape[0] for p in self._prob) == target.numel():
            prob = torch.cat(self._prob)
            aucs = [a for k in range(prob.shape[1]) if (a := _ovr_auc(prob[:, k], target == k)) == a]  # drop NaN
            auc = sum(aucs) / len(aucs) if aucs else nan
        return {
            "accuracy": float(correct.float().mean()),
            "balanced_accuracy": sum(recalls) / len(recalls),
            "auc": auc,
            "num_samples": int(correct.numel()),
            "per_sample": correct.tolist(),
        }


def _ovr_auc(score: torch.Tensor, positive: torch.Tensor) -> float:
    """ROC AUC of ``score`` for the boolean ``positive`` labels (Mann-Whitney U / (n_pos n_neg), ties half); NaN
    when one of the two groups is empty."""
    pos, neg = score[positive], score[~positive]
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (pos.numel() * neg.numel()))


#: two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom (standard tables, e.g. NIST/SEMATECH
#: e-Handbook of Statistical Methods, table 1.3.6.7.2); above 30 the normal 1.96 is within 2 %
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def mean_interval(values: list[float]) -> dict[str, float | int | list[float]]:
    """Mean, sample sd (ddof 1) and the t-based 95 % interval of the mean of ``values`` (e.g. one score per seed).

    Returns ``{"n", "mean"}`` for one value, plus ``"sd", "ci95": [low, high]`` for two or more; ``{"n": 0}`` for
    none. Non-finite values are refused (ValueError naming them)."""
    v = [float(x) for x in values]
    bad = [x for x in v if not math.isfinite(x)]
    if bad:
        raise ValueError(f"mean_interval: non-finite values {bad}")
    n = len(v)
    if n == 0:
        return {"n": 0}
    mean = sum(v) / n
    if n == 1:
        return {"n": 1, "mean": mean}
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
    t = T975[n - 2] if n - 1 <= len(T975) else 1.96
    h = t * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "ci95": [mean - h, mean + h]}
