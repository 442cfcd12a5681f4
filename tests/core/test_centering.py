"""Sinkhorn-Knopp marginals (methods-spec 3.3 / 9.4) and softmax centering."""

import pytest
import torch

from fl_plugins.core.centering import centered_teacher_probs, sinkhorn_knopp


@pytest.mark.parametrize("batch,k", [(4, 16), (8, 64), (6, 6)])
def test_sinkhorn_marginals_after_three_iterations(batch, k):
    logits = 0.5 * torch.randn(batch, k, generator=torch.Generator().manual_seed(batch + k))
    p = sinkhorn_knopp(logits, teacher_temp=1.0, n_iterations=3)  # [B, K]
    q = p.t() / batch  # the spec's Q (K x B) before the final "Q * B"
    torch.testing.assert_close(q.sum(dim=0), torch.full((batch,), 1.0 / batch))  # columns: exactly 1/B
    torch.testing.assert_close(q.sum(dim=1), torch.full((k,), 1.0 / k), rtol=0.05, atol=0.0)  # rows: ~1/K
    torch.testing.assert_close(p.sum(dim=1), torch.ones(batch))  # each sample's target sums to 1


def test_sinkhorn_rows_converge_with_more_iterations():
    logits = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    q = sinkhorn_knopp(logits, teacher_temp=0.5, n_iterations=200).t() / 8
    torch.testing.assert_close(q.sum(dim=1), torch.full((32,), 1 / 32), rtol=1e-4, atol=0.0)


def test_sinkhorn_matches_plain_iterations_and_is_stable():
    logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(3))
    q = torch.exp(logits / 0.3).t().double()
    q /= q.sum()
    for _ in range(3):
        q /= q.sum(dim=1, keepdim=True) * 7
        q /= q.sum(dim=0, keepdim=True) * 5
    torch.testing.assert_close(sinkhorn_knopp(logits, 0.3), (q * 5).t().float())
    assert torch.isfinite(sinkhorn_knopp(1000 * logits, 0.04)).all()  # exp would overflow without log domain


def test_centered_probs_rows_sum_to_one():
    p = centered_teacher_probs(torch.randn(3, 10), torch.randn(10), 0.04)
    torch.testing.assert_close(p.sum(-1), torch.ones(3))


@pytest.mark.parametrize(
    "call",
    [
        lambda: sinkhorn_knopp(torch.randn(2, 3), 0.0),
        lambda: centered_teacher_probs(torch.randn(2, 3), torch.zeros(3), -1.0),
    ],
)
def test_bad_temperature_raises(call):
    with pytest.raises(ValueError, match="teacher_temp"):
        call()
