"""Per-volume Dice (MONAI, background excluded, ignore_empty) and accuracy against hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from fl_plugins.engine.metrics import ClassificationMetric, SegmentationMetric, accuracy, dice_per_class


def _vol(slices: list[list[list[int]]]) -> torch.Tensor:
    return torch.tensor(slices, dtype=torch.long)  # [D, H, W]


# Volume "a": 2 slices of 2x3, classes {0, 1, 2, 3}; class 3 absent in prediction and ground truth.
#   class 1: gt 3 px, pred 2 px, overlap 2 -> 2*2 / (3 + 2) = 0.8
#   class 2: gt 2 px, pred 3 px, overlap 1 -> 2*1 / (2 + 3) = 0.4
A_GT = _vol([[[1, 1, 0], [0, 2, 0]], [[1, 0, 0], [0, 2, 0]]])
A_PR = _vol([[[1, 1, 0], [2, 2, 0]], [[0, 0, 2], [0, 0, 0]]])


def test_dice_per_class_hand_computed_with_empty_class() -> None:
    d = dice_per_class(A_PR.permute(1, 2, 0), A_GT.permute(1, 2, 0), num_classes=4)
    assert d.shape == (3,)
    assert d[0].item() == pytest.approx(0.8) and d[1].item() == pytest.approx(0.4)
    assert math.isnan(d[2].item())  # absent in both -> NaN (MONAI ignore_empty=True)


def test_dice_ignore_empty_false() -> None:
    gt = torch.zeros(2, 2, dtype=torch.long)
    both_empty = dice_per_class(torch.zeros(2, 2, dtype=torch.long), gt, 2, ignore_empty=False)
    only_pred = dice_per_class(torch.ones(2, 2, dtype=torch.long), gt, 2, ignore_empty=False)
    assert both_empty.tolist() == [1.0] and only_pred.tolist() == [0.0]
    assert math.isnan(dice_per_class(torch.ones(2, 2, dtype=torch.long), gt, 2).item())  # FP on empty GT ignored


def test_dice_rejects_out_of_range_labels() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        dice_per_class(torch.full((2, 2), 2), torch.zeros(2, 2, dtype=torch.long), 2)


def test_segmentation_metric_reassembles_volumes_from_shuffled_slices() -> None:
    # volume "b": one slice; class 1 perfect (1.0), class 2 absent in gt but predicted (NaN), class 3 gt only (0.0)
    b_gt = _vol([[[1, 3, 0], [0, 0, 0]]])
    b_pr = _vol([[[1, 0, 2], [0, 0, 0]]])
    m = SegmentationMetric(num_classes=4)
    # slices of both volumes, interleaved and out of order
    m.update(torch.stack([A_PR[1], b_pr[0]]), torch.stack([A_GT[1], b_gt[0]]), ["a", "b"], [1, 0])
    m.update(A_PR[:1], A_GT[:1], ["a"], [0])
    r = m.compute()
    assert r["num_volumes"] == 2
    assert r["per_volume"]["a"] == pytest.approx((0.8 + 0.4) / 2)
    assert r["per_volume"]["b"] == pytest.approx((1.0 + 0.0) / 2)
    # per class: NaN-skipping mean over volumes; overall: mean over classes
    assert r["dice_per_class"] == pytest.approx([(0.8 + 1.0) / 2, 0.4, 0.0])
    assert r["dice"] == pytest.approx((0.9 + 0.4 + 0.0) / 3)


def test_segmentation_metric_volume_equals_whole_volume_dice() -> None:
    m = SegmentationMetric(num_classes=4)
    m.update(A_PR.flip(0), A_GT.flip(0), ["a", "a"], [1, 0])
    direct = dice_per_class(A_PR.permute(1, 2, 0), A_GT.permute(1, 2, 0), 4)
    got = m.volume_dice()["a"]
    assert got[:2] == pytest.approx(direct[:2].tolist()) and math.isnan(got[2])


def test_segmentation_metric_class_absent_everywhere_is_nan_and_skipped() -> None:
    m = SegmentationMetric(num_classes=3)
    m.update(torch.tensor([[[1, 0]]]), torch.tensor([[[1, 0]]]), None, None)  # items without volume ids
    r = m.compute()
    assert r["dice_per_class"][0] == 1.0 and math.isnan(r["dice_per_class"][1]) and r["dice"] == 1.0


def test_segmentation_metric_duplicate_slice_raises() -> None:
    m = SegmentationMetric(num_classes=2)
    m.update(A_GT[:1].clamp(max=1), A_GT[:1].clamp(max=1), ["a"], [0])
    with pytest.raises(ValueError, match="slice 0 of volume 'a'"):
        m.update(A_GT[:1].clamp(max=1), A_GT[:1].clamp(max=1), ["a"], [0])


def test_accuracy() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
    target = torch.tensor([0, 1, 1, 1])
    assert accuracy(logits, target) == 0.75
    m = ClassificationMetric()
    m.update(logits[:2], target[:2])
    m.update(logits[2:].argmax(1), target[2:])
    r = m.compute()
    assert r["accuracy"] == 0.75 and r["num_samples"] == 4 and r["per_sample"] == [1, 1, 0, 1]


def test_balanced_accuracy_and_macro_auc_by_hand():
    from fl_plugins.engine.metrics import ClassificationMetric

    # 6 samples, classes 0 (x4) and 1 (x2); logits give p(class 1) = sigmoid(l1 - l0)
    target = torch.tensor([0, 0, 0, 0, 1, 1])
    p1 = torch.tensor([0.1, 0.2, 0.6, 0.3, 0.7, 0.4])  # predicted 1 for samples 2 and 4
    logits = torch.stack([torch.zeros(6), torch.log(p1 / (1 - p1))], dim=1)
    m = ClassificationMetric()
    m.update(logits[:3], target[:3])
    m.update(logits[3:], target[3:])
    r = m.compute()
    assert r["accuracy"] == pytest.approx(4 / 6)  # samples 0, 1, 3 and 4 right
    assert r["balanced_accuracy"] == pytest.approx((3 / 4 + 1 / 2) / 2)  # recall class 0 = 3/4, class 1 = 1/2
    # AUC of class 1: pairs (pos, neg) with pos > neg: 0.7 beats all 4; 0.4 beats 0.1, 0.2, 0.3 -> 7 of 8;
    # class 0 scores are 1 - p1, the same ranking reversed -> 7/8 too; macro = 7/8
    assert r["auc"] == pytest.approx(7 / 8)
    assert r["num_samples"] == 6 and r["per_sample"] == [1, 1, 0, 1, 1, 0]


def test_majority_prediction_scores_one_over_k_and_auc_needs_both_groups():
    from fl_plugins.engine.metrics import ClassificationMetric

    m = ClassificationMetric()
    m.update(torch.zeros(10, dtype=torch.long), torch.tensor([0] * 8 + [1] * 2))  # labels only: no AUC
    r = m.compute()
    assert r["accuracy"] == pytest.approx(0.8) and r["balanced_accuracy"] == pytest.approx(0.5)
    assert math.isnan(r["auc"])
    m = ClassificationMetric()
    m.update(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))  # one class present: AUC undefined
    assert math.isnan(m.compute()["auc"])
    empty = ClassificationMetric().compute()
    assert empty["num_samples"] == 0 and math.isnan(empty["balanced_accuracy"])
