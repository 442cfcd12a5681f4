"""DINO loss: value, gradients and centre vs lightly's DINOLoss (oracle) and vs a hand computation."""

import itertools
import math

import pytest
import torch
from lightly.loss import DINOLoss

from fl_plugins.core.centering import centered_teacher_probs, update_center
from fl_plugins.core.dino_loss import dino_cross_entropy, dino_loss, dino_num_terms

# batch, n_local, out_dim, teacher_temp, student_temp
CASES = list(itertools.product([1, 3], [0, 2], [8, 33], [0.04, 0.07], [0.1, 0.2]))


def _inputs(batch: int, n_local: int, out_dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    teacher = [torch.randn(batch, out_dim, generator=g) for _ in range(2)]
    student = [torch.randn(batch, out_dim, generator=g) for _ in range(2 + n_local)]
    center = 0.3 * torch.randn(out_dim, generator=g)
    return teacher, student, center


@pytest.mark.parametrize("batch,n_local,out_dim,teacher_temp,student_temp", CASES)
def test_matches_lightly_loss_gradients_and_center(batch, n_local, out_dim, teacher_temp, student_temp):
    teacher, student, center = _inputs(batch, n_local, out_dim, seed=batch * 100 + n_local * 10 + out_dim)
    ref = DINOLoss(output_dim=out_dim, teacher_temp=teacher_temp, student_temp=student_temp, center_momentum=0.9)
    ref.center.copy_(center.view(1, 1, -1))
    s_ref = [s.clone().requires_grad_(True) for s in student]
    loss_ref = ref(teacher, s_ref, teacher_temp=teacher_temp)
    loss_ref.backward()

    s_ours = [s.clone().requires_grad_(True) for s in student]
    loss, new_center = dino_loss(teacher, s_ours, center, teacher_temp, student_temp, center_momentum=0.9)
    loss.backward()

    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(s_ours, s_ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(new_center, ref.center.view(-1))


def test_hand_computation_on_tiny_tensors():
    # 2 teacher views, 3 student views (2 globals + 1 local), batch 2, K = 3
    t = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]], [[0.0, 2.0, 0.0], [-1.0, 0.0, 1.0]]])
    s = torch.tensor(
        [[[0.2, 0.1, 0.0], [1.0, -1.0, 0.0]], [[0.0, 0.3, 0.3], [0.1, 0.1, 0.9]], [[2.0, 0.0, 1.0], [0.0, 0.0, 0.0]]]
    )
    c = torch.tensor([0.1, -0.2, 0.0])
    tau_t, tau_s = 0.5, 0.25

    def softmax(v, tau):
        e = [math.exp(x / tau) for x in v]
        return [x / sum(e) for x in e]

    total, terms = 0.0, 0
    for i in range(2):
        for j in range(3):
            if i == j:
                continue
            per_sample = []
            for b in range(2):
                p_t = softmax([t[i, b, k].item() - c[k].item() for k in range(3)], tau_t)
                p_s = softmax(s[j, b].tolist(), tau_s)
                per_sample.append(-sum(pt * math.log(ps) for pt, ps in zip(p_t, p_s)))
            total += sum(per_sample) / 2
            terms += 1
    assert terms == 4 == dino_num_terms(2, 3)
    loss, new_c = dino_loss(list(t), list(s), c, tau_t, tau_s)
    assert loss.item() == pytest.approx(total / terms, rel=1e-6)
    expected_c = [0.9 * c[k].item() + 0.1 * t[:, :, k].mean().item() for k in range(3)]
    assert new_c.tolist() == pytest.approx(expected_c, rel=1e-6)
    assert c.tolist() == pytest.approx([0.1, -0.2, 0.0])  # input centre not modified


@pytest.mark.parametrize("n_local", [0, 1, 4, 8])
def test_num_terms_skips_same_view_pairs(n_local):
    assert dino_num_terms(2, 2 + n_local) == 2 * (2 + n_local) - 2


def test_same_view_pairs_do_not_contribute():
    teacher, student, center = _inputs(2, 2, 16, seed=1)
    probs = centered_teacher_probs(torch.stack(teacher), center, 0.04)
    base = dino_cross_entropy(probs, student)
    # student view 0 is the teacher's view 0, so it pairs only with teacher view 1: changing it must change
    # the loss by exactly the difference of that one term (the same-view pair (0, 0) is skipped)
    changed = [s.clone() for s in student]
    changed[0] = torch.randn(2, 16)
    diff = dino_cross_entropy(probs, changed) - base
    lsm = torch.log_softmax
    h_new = -(probs[1] * lsm(changed[0] / 0.1, -1)).sum(-1).mean()
    h_old = -(probs[1] * lsm(student[0] / 0.1, -1)).sum(-1).mean()
    torch.testing.assert_close(diff, (h_new - h_old) / dino_num_terms(2, 4))


def test_single_view_raises():
    with pytest.raises(ValueError, match="cross-view"):
        dino_cross_entropy([torch.softmax(torch.randn(2, 4), -1)], [torch.randn(2, 4)])


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        dino_cross_entropy([torch.rand(2, 4)] * 2, [torch.randn(3, 4)] * 3)


def test_update_center_hand_and_no_grad():
    c = torch.zeros(2)
    t = torch.tensor([[1.0, 3.0], [3.0, 5.0]], requires_grad=True)
    new = update_center(c, t, 0.9)
    assert new.tolist() == pytest.approx([0.2, 0.4])
    assert not new.requires_grad
    assert torch.equal(update_center(new, t[:0], 0.9), new)  # nothing observed -> unchanged
