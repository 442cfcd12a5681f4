"""iBOT masked-patch loss: per-image weights, hand value, lightly's IBOTPatchLoss as oracle."""

import math

import pytest
import torch
from lightly.loss.ibot_loss import IBOTPatchLoss

from fl_plugins.core.centering import centered_teacher_probs
from fl_plugins.core.ibot_loss import ibot_patch_loss, ibot_patch_weights

# 3 images on a 2 x 2 grid: 1 masked patch, 3 masked patches, none
MASKS = torch.tensor([[[1, 0], [0, 0]], [[1, 1], [0, 1]], [[0, 0], [0, 0]]], dtype=torch.bool)


def test_weights_are_one_over_masked_count_per_image():
    assert ibot_patch_weights(MASKS).tolist() == pytest.approx([1.0, 1 / 3, 1 / 3, 1 / 3])


def test_hand_computation():
    k = 3
    teacher = torch.tensor([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]])
    student = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.5, 1.5, -1.0], [2.0, 0.0, 0.0]])

    def ce(t, s, tau=0.1):
        e = [math.exp(v / tau) for v in s]
        return -sum(t[i] * math.log(e[i] / sum(e)) for i in range(k))

    per_patch = [ce(teacher[i].tolist(), student[i].tolist()) for i in range(4)]
    image_means = [per_patch[0], sum(per_patch[1:]) / 3, 0.0]  # per-image mean over masked patches
    expected = sum(image_means) / 3  # mean over all 3 images (unmasked image counts as 0)
    assert ibot_patch_loss(teacher, student, MASKS).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("teacher_temp,student_temp", [(0.04, 0.1), (0.07, 0.2)])
def test_matches_lightly(teacher_temp, student_temp):
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(4, 3, 3, generator=g) < 0.4
    m, k = int(masks.sum()), 16
    t_logits, s_logits = torch.randn(m, k, generator=g), torch.randn(m, k, generator=g)
    ref = IBOTPatchLoss(output_dim=k, teacher_temp=teacher_temp, student_temp=student_temp)
    expected = ref(t_logits, s_logits, masks, teacher_temp=teacher_temp)
    probs = centered_teacher_probs(t_logits, torch.zeros(k), teacher_temp)
    torch.testing.assert_close(ibot_patch_loss(probs, s_logits, masks, student_temp), expected)


def test_no_masked_patch_gives_zero_with_graph():
    s = torch.randn(0, 5, requires_grad=True)
    loss = ibot_patch_loss(torch.rand(0, 5), s, torch.zeros(2, 2, 2, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad


def test_count_mismatch_raises():
    with pytest.raises(ValueError, match="masks select 4 patches"):
        ibot_patch_loss(torch.rand(3, 5), torch.randn(3, 5), MASKS)
