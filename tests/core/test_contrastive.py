"""The FCL loss (methods-spec 7.5) against hand computation, and negative sampling without replacement."""

from __future__ import annotations

import math

import pytest
import torch

from fl_plugins.core.contrastive import fcl_loss, positive_set_nce, sample_without_replacement


def _l(q: list[float], pos: list[list[float]], negs: list[list[float]], tau: float) -> float:
    """l(q, P, Q') written out with math: -(1/|P|) sum_k log[e^{q.k/t} / (e^{q.k/t} + sum_n e^{q.n/t})]."""
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    neg = sum(math.exp(dot(q, n) / tau) for n in negs)
    return -sum(math.log(math.exp(dot(q, k) / tau) / (math.exp(dot(q, k) / tau) + neg)) for k in pos) / len(pos)


def _unit(*xs: float) -> list[float]:
    n = math.sqrt(sum(x * x for x in xs))
    return [x / n for x in xs]


def test_positive_set_nce_matches_the_equation():
    tau = 0.5
    q = [_unit(1, 0), _unit(0.6, 0.8)]
    cand = [[_unit(1, 1), _unit(-1, 0.2)], [_unit(0, 1), _unit(1, 0)]]
    negs = [[_unit(0, 1), _unit(-1, -1), _unit(1, -0.5)], [_unit(-1, 0), _unit(0.3, 1), _unit(1, 1)]]
    mask = torch.tensor([[True, True], [True, False]])
    qt = torch.tensor(q)
    pos_logits = torch.einsum("bd,bpd->bp", qt, torch.tensor(cand)) / tau
    neg_logits = torch.einsum("bd,bkd->bk", qt, torch.tensor(negs)) / tau
    loss, has = positive_set_nce(pos_logits, mask, neg_logits)
    assert has.tolist() == [True, True]
    assert loss[0].item() == pytest.approx(_l(q[0], cand[0], negs[0], tau), rel=1e-5)
    assert loss[1].item() == pytest.approx(_l(q[1], cand[1][:1], negs[1], tau), rel=1e-5)
    loss, has = positive_set_nce(pos_logits, torch.zeros_like(mask), neg_logits)
    assert has.tolist() == [False, False] and loss.tolist() == [0.0, 0.0]


def _batch():
    # 4 queries: volumes 0,0,1,1 x partitions 0,1,0,1; D = 2
    q = [_unit(1, 0.1), _unit(0.1, 1), _unit(1, -0.2), _unit(-0.3, 1)]
    k = [_unit(1, 0.3), _unit(0.2, 1), _unit(0.9, -0.1), _unit(-0.1, 1)]
    part, vol = [0, 1, 0, 1], [0, 0, 1, 1]
    return q, k, part, vol


def _loss_by_hand(q, k, part, vol, bank, bank_part, bank_remote, tau, batch_negatives=False):
    total, remote_n = 0.0, 0
    for i in range(len(q)):
        negs = list(bank)  # K >= M: Q' = the whole bank
        if batch_negatives:  # + the batch's keys of other partitions
            negs += [k[j] for j in range(len(q)) if part[j] != part[i]]
        pos = [k[j] for j in range(len(q)) if part[j] == part[i] and (vol[j] != vol[i] or j == i)]
        li = _l(q[i], pos, negs, tau)
        rpos = [bank[n] for n in range(len(bank)) if bank_remote[n] and bank_part[n] == part[i]]
        if rpos:
            li += _l(q[i], rpos, negs, tau)
            remote_n += 1
        total += li
    return total / len(q), remote_n


@pytest.mark.parametrize(("bank_part", "bank_remote", "remote_queries"), [
    ([0, 1, 0, 1, 0], [False, False, True, True, True], 4),   # local and remote negatives, both partitions remote
    ([0, 1, 1, 1, 0], [False, True, False, True, False], 2),  # partition 0 has no remote feature: L_remote dropped
    ([0, 1, 0, 1, 0], [True, True, True, True, True], 4),     # every negative is remote
    ([0, 1, 0, 1, 0], [False] * 5, 0),                         # no remote feature at all (the no-exchange baseline)
])
def test_fcl_loss_matches_hand_computation(bank_part, bank_remote, remote_queries):
    tau = 0.1
    q, k, part, vol = _batch()
    bank = [_unit(1, 0), _unit(0, 1), _unit(1, 1), _unit(-1, 1), _unit(0.5, -1)]
    loss, stats = fcl_loss(torch.tensor(q, requires_grad=True), torch.tensor(k), torch.tensor(part), torch.tensor(vol),
                           torch.tensor(bank), torch.tensor(bank_part), torch.tensor(bank_remote),
                           num_negatives=len(bank), temperature=tau, generator=torch.Generator().manual_seed(0))
    want, n_remote = _loss_by_hand(q, k, part, vol, bank, bank_part, bank_remote, tau)
    assert n_remote == remote_queries
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert stats["remote_positive_fraction"] == remote_queries / 4
    assert stats["negatives_remote_fraction"] == pytest.approx(sum(bank_remote) / len(bank))
    loss.backward()


@pytest.mark.parametrize("bank_remote", [[False, False, True, True, True], [False] * 5])
def test_batch_negatives_add_the_other_partition_keys_to_every_denominator(bank_remote):
    tau = 0.2
    q, k, part, vol = _batch()
    bank = [_unit(1, 0), _unit(0, 1), _unit(1, 1), _unit(-1, 1), _unit(0.5, -1)]
    bank_part = [0, 1, 0, 1, 0]
    loss, _ = fcl_loss(torch.tensor(q), torch.tensor(k), torch.tensor(part), torch.tensor(vol), torch.tensor(bank),
                       torch.tensor(bank_part), torch.tensor(bank_remote), num_negatives=5, temperature=tau,
                       generator=torch.Generator().manual_seed(0), batch_negatives=True)
    want, _ = _loss_by_hand(q, k, part, vol, bank, bank_part, bank_remote, tau, batch_negatives=True)
    assert loss.item() == pytest.approx(want, rel=1e-5)


def test_fcl_loss_gradient_reaches_the_queries_only():
    q, k, part, vol = _batch()
    qt, kt = torch.tensor(q, requires_grad=True), torch.tensor(k, requires_grad=True)
    bank = torch.nn.functional.normalize(torch.randn(10, 2), dim=1).requires_grad_(True)
    loss, _ = fcl_loss(qt, kt.detach(), torch.tensor(part), torch.tensor(vol), bank.detach(), torch.zeros(10).long(),
                       torch.ones(10).bool(), 4, 0.1, torch.Generator().manual_seed(1))
    loss.backward()
    assert qt.grad is not None and qt.grad.abs().sum() > 0 and kt.grad is None and bank.grad is None


@pytest.mark.parametrize(("n", "k", "draws"), [(10, 4, 200), (7, 7, 50), (5, 9, 20), (1, 3, 4)])
def test_sampling_is_without_replacement_and_uniform(n, k, draws):
    idx = sample_without_replacement(n, k, draws, torch.Generator().manual_seed(0))
    assert idx.shape == (draws, min(n, k)) and idx.dtype == torch.int64
    assert all(len(set(row.tolist())) == min(n, k) for row in idx)  # no index twice in a row
    assert int(idx.min()) >= 0 and int(idx.max()) < n
    if n == 10:  # every item equally likely: each is drawn ~ draws * k / n = 80 times
        counts = torch.bincount(idx.flatten(), minlength=n).float()
        assert counts.min() > 50 and counts.max() < 110


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"n_items": 0, "k": 4, "n_draws": 2}, "empty memory bank"),
    ({"n_items": 5, "k": 0, "n_draws": 2}, "num_negatives must be >= 1"),
])
def test_sampling_errors_name_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_without_replacement(generator=torch.Generator(), **kwargs)


def test_fcl_loss_rejects_mismatched_shapes_and_bad_temperature():
    q, k, part, vol = _batch()
    args = [torch.tensor(q), torch.tensor(k), torch.tensor(part), torch.tensor(vol)]
    bank = torch.ones(3, 3)
    with pytest.raises(ValueError, match="bank"):
        fcl_loss(*args, bank, torch.zeros(3).long(), torch.zeros(3).bool(), 2, 0.1, torch.Generator())
    with pytest.raises(ValueError, match="temperature must be > 0"):
        fcl_loss(*args, torch.ones(3, 2), torch.zeros(3).long(), torch.zeros(3).bool(), 2, 0.0, torch.Generator())
