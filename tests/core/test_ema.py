"""Teacher EMA: exact limits m=1 / m=0, midpoint, buffers untouched, validation."""

import pytest
import torch
from torch import nn

from fl_plugins.core.ema import update_momentum


def _pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    student = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    teacher = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    teacher[1].running_mean.fill_(7.0)
    return student, teacher


def _params(m: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in m.parameters()]


def test_m_one_keeps_teacher_exactly():
    student, teacher = _pair()
    before = _params(teacher)
    update_momentum(student, teacher, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))


def test_m_zero_copies_student_exactly():
    student, teacher = _pair()
    update_momentum(student, teacher, 0.0)
    assert all(torch.equal(s, t) for s, t in zip(student.parameters(), teacher.parameters()))


@pytest.mark.parametrize("m", [0.5, 0.9, 0.996])
def test_ema_formula_and_buffers_untouched(m):
    student, teacher = _pair()
    s0, t0 = _params(student), _params(teacher)
    update_momentum(student, teacher, m)
    for s, t, new in zip(s0, t0, teacher.parameters()):
        torch.testing.assert_close(new.detach(), m * t + (1 - m) * s)
    assert torch.all(teacher[1].running_mean == 7.0)
    assert all(torch.equal(a, b) for a, b in zip(s0, student.parameters()))


def test_ema_does_not_build_a_graph():
    student, teacher = _pair()
    update_momentum(student, teacher, 0.5)
    assert all(p.grad_fn is None for p in teacher.parameters())


@pytest.mark.parametrize("m", [-0.1, 1.5])
def test_bad_momentum_raises(m):
    student, teacher = _pair()
    with pytest.raises(ValueError, match="momentum"):
        update_momentum(student, teacher, m)


def test_mismatched_architectures_raise():
    with pytest.raises(ValueError, match="parameters"):
        update_momentum(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), 0.5)
