"""Collapse monitor: entropies of teacher targets against hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from fl_plugins.core.collapse import target_entropies

K = 8


@pytest.mark.parametrize(("probs", "per_sample", "of_mean"), [
    # uniform collapse: every row uniform -> both log K, no information
    (torch.full((4, K), 1 / K), math.log(K), math.log(K)),
    # one-hot collapse: every row the same prototype -> both 0
    (torch.eye(K)[[3, 3, 3, 3]], 0.0, 0.0),
    # healthy extreme: 4 samples on 4 different prototypes -> sharp rows, spread mean
    (torch.eye(K)[[0, 1, 2, 3]], 0.0, math.log(4)),
    # two rows [1/2, 1/2, 0..] and [0, 0, 1/2, 1/2, 0..]: each H = log 2; mean = 1/4 on 4 -> log 4
    (torch.tensor([[.5, .5] + [0.] * 6, [0., 0., .5, .5] + [0.] * 4]), math.log(2), math.log(4)),
])
def test_target_entropies_by_hand(probs, per_sample, of_mean):
    out = target_entropies(probs)
    assert out["teacher_entropy"] == pytest.approx(per_sample, abs=1e-6)
    assert out["teacher_mean_entropy"] == pytest.approx(of_mean, abs=1e-6)
    assert out["teacher_mi"] == pytest.approx(of_mean - per_sample, abs=1e-6)


def test_mutual_information_is_nonnegative_on_random_targets():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        p = torch.softmax(torch.randn(16, 64, generator=g) * 3, dim=1)
        assert target_entropies(p)["teacher_mi"] >= -1e-6


@pytest.mark.parametrize("bad", [torch.ones(K), torch.ones(0, K), torch.ones(2, 2, K)])
def test_bad_shape_is_named(bad):
    with pytest.raises(ValueError, match=r"probs must be \[N, K\]"):
        target_entropies(bad)
