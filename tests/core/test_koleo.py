"""KoLeo vs a hand computation and vs lightly's KoLeoLoss; degenerate batch."""

import math

import pytest
import torch
from lightly.loss import KoLeoLoss

from fl_plugins.core.koleo import koleo_loss


def test_hand_computation():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])  # normalised: e1, e2, (e1+e2)/sqrt(2)
    d_diag = math.sqrt((1 - 1 / math.sqrt(2)) ** 2 + (1 / math.sqrt(2)) ** 2)  # e1 <-> diagonal
    expected = -(math.log(d_diag + 1e-8) * 3) / 3  # every point's nearest neighbour is at d_diag
    assert koleo_loss(x).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("n,dim", [(2, 4), (5, 8), (16, 192)])
def test_matches_lightly(n, dim):
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(n * dim))
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    ours, ref = koleo_loss(a), KoLeoLoss()(b)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 8), (0, 8)])
def test_fewer_than_two_samples_raises(shape):
    with pytest.raises(ValueError, match="at least 2 samples"):
        koleo_loss(torch.randn(*shape))


def test_wrong_rank_raises():
    with pytest.raises(ValueError, match=r"\[n, D\]"):
        koleo_loss(torch.randn(2, 3, 4))
