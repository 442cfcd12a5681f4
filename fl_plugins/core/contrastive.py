"""Contrastive losses of federated contrastive learning with feature exchange (FCL, methods-spec 7.5), pure torch.

Notation (methods-spec 7.5 [V equations]): ``q`` an L2-normalised query feature, ``P`` a set of positive keys,
``Q'`` a set of ``K`` negatives sampled without replacement from the memory bank ``Q`` (local and remote momentum
features), temperature ``tau``::

    l(q, P, Q') = -(1/|P|) sum_{k+ in P} log[ exp(q.k+/tau) / (exp(q.k+/tau) + sum_{n in Q'} exp(q.n/tau)) ]
    L_local     = l(q, P(q), Q')      P(q): same-partition keys of *other* local volumes and q's own other view
    L_remote    = l(q, L(q), Q')      L(q): the *remote* elements of Q' with q's partition (global structural
                                      matching); dropped for a query without any
    L_q         = L_local + L_remote; the batch loss is the mean of L_q over queries

Elements of ``Q'`` that are positives stay in the denominator sum, exactly as written (methods-spec 7.5 note i).
Everything here works on tensors only; the method (:mod:`fl_plugins.methods.fcl`) makes the features.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sample_without_replacement", "positive_set_nce", "fcl_loss"]


def sample_without_replacement(n_items: int, k: int, n_draws: int, generator: torch.Generator,
                               device: torch.device | str = "cpu") -> Tensor:
    """``n_draws`` independent uniform samples of ``min(k, n_items)`` distinct indices of ``range(n_items)``.

    Each row is the top-``k`` of i.i.d. uniform keys (a uniformly random ``k``-subset, in random order).

    Returns:
        int64 ``[n_draws, min(k, n_items)]``.

    Raises:
        ValueError: ``n_items < 1``, ``k < 1`` or ``n_draws < 0``.
    """
    if n_items < 1:
        raise ValueError(f"cannot sample negatives from an empty memory bank (n_items={n_items})")
    if k < 1:
        raise ValueError(f"num_negatives must be >= 1, got {k}")
    if n_draws < 0:
        raise ValueError(f"n_draws must be >= 0, got {n_draws}")
    keys = torch.rand(n_draws, n_items, generator=generator).to(device)
    return keys.topk(min(k, n_items), dim=1).indices


def positive_set_nce(pos_logits: Tensor, pos_mask: Tensor, neg_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Per-query ``l(q, P, Q')`` from logits (dot products already divided by ``tau``).

    Args:
        pos_logits: ``[B, P]`` candidate-positive logits ``q.k / tau``.
        pos_mask: ``[B, P]`` bool, True where the candidate is a positive of the query.
        neg_logits: ``[B, K]`` logits of the query's negatives ``Q'`` (``K >= 1``).

    Returns:
        ``(loss [B], has_positive [B] bool)``; the loss of a query without a positive is 0.
    """
    if pos_logits.shape != pos_mask.shape or pos_logits.shape[0] != neg_logits.shape[0]:
        raise ValueError(f"positive_set_nce: pos_logits {tuple(pos_logits.shape)}, pos_mask {tuple(pos_mask.shape)} "
                         f"and neg_logits {tuple(neg_logits.shape)} do not match")
    neg_lse = torch.logsumexp(neg_logits, dim=1, keepdim=True)  # log sum_n exp(q.n/tau)
    log_ratio = pos_logits - torch.logaddexp(pos_logits, neg_lse)
    mask = pos_mask.to(log_ratio.dtype)
    count = mask.sum(1)
    loss = -(log_ratio * mask).sum(1) / count.clamp(min=1)
    return loss, count > 0


def fcl_loss(
    q: Tensor,
    keys: Tensor,
    part: Tensor,
    vol: Tensor,
    bank: Tensor,
    bank_part: Tensor,
    bank_remote: Tensor,
    num_negatives: int,
    temperature: float,
    generator: torch.Generator,
    batch_negatives: bool = False,
) -> tuple[Tensor, dict[str, float]]:
    """The FCL loss of a batch (methods-spec 7.5).

    Args:
        q: ``[B, D]`` L2-normalised query features (main encoder, first view).
        keys: ``[B, D]`` L2-normalised momentum features of the same slices (second view), aligned with ``q``.
        part: ``[B]`` partition id of each slice; ``vol``: ``[B]`` its local volume index.
        bank: ``[M, D]`` memory bank ``Q`` (local momentum features of this round and the other sites' features).
        bank_part: ``[M]`` partition ids; ``bank_remote``: ``[M]`` bool, True for another site's feature.
        num_negatives: ``K``, negatives sampled without replacement per query (``min(K, M)`` when the bank is
            smaller).
        temperature: ``tau`` > 0.
        generator: the step's random stream (negative sampling).
        batch_negatives: also count the batch's keys of *other* partitions as negatives of every query (appended to
            ``Q'``) [R]: keys computed with the same batch statistics as the positives, so that "computed in this
            batch" does not tell positives from negatives (the BatchNorm shortcut MoCo removes with shuffled BN).

    Returns:
        ``(loss, stats)``: the batch mean of ``L_local + L_remote`` (graph attached through ``q``) and floats
        ``loss_local``, ``loss_remote`` (mean over queries with a remote positive; 0 without any),
        ``remote_positive_fraction`` (queries with a remote positive), ``negatives_remote_fraction``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    b = q.shape[0]
    if keys.shape != q.shape or part.shape != (b,) or vol.shape != (b,):
        raise ValueError(f"fcl_loss: q {tuple(q.shape)}, keys {tuple(keys.shape)}, part {tuple(part.shape)}, vol "
                         f"{tuple(vol.shape)} do not match")
    if bank.dim() != 2 or bank.shape[1] != q.shape[1] or bank_part.shape != bank.shape[:1] \
            or bank_remote.shape != bank.shape[:1]:
        raise ValueError(f"fcl_loss: bank {tuple(bank.shape)}, bank_part {tuple(bank_part.shape)}, bank_remote "
                         f"{tuple(bank_remote.shape)} do not match features of dimension {q.shape[1]}")
    idx = sample_without_replacement(bank.shape[0], num_negatives, b, generator, device=q.device)
    negs = bank[idx]  # [B, K, D]
    neg_logits = torch.einsum("bd,bkd->bk", q, negs) / temperature
    same_part = part[:, None] == part[None, :]
    local_mask = same_part & ((vol[:, None] != vol[None, :]) | torch.eye(b, dtype=torch.bool, device=q.device))
    key_logits = q @ keys.t() / temperature
    all_negs = neg_logits
    if batch_negatives:  # other-partition keys of the batch; same-partition ones masked out (-inf adds nothing)
        all_negs = torch.cat([neg_logits, key_logits.masked_fill(same_part, float("-inf"))], dim=1)
    local, _ = positive_set_nce(key_logits, local_mask, all_negs)
    remote_mask = bank_remote[idx] & (bank_part[idx] == part[:, None])
    remote, has_remote = positive_set_nce(neg_logits, remote_mask, all_negs)
    loss = (local + remote * has_remote.to(remote.dtype)).mean()
    n_remote = int(has_remote.sum())
    stats = {
        "loss": float(loss.detach()),
        "loss_local": float(local.detach().mean()),
        "loss_remote": float(remote.detach()[has_remote].mean()) if n_remote else 0.0,
        "remote_positive_fraction": n_remote / b,
        "negatives_remote_fraction": float(bank_remote[idx].float().mean()),
    }
    return loss, stats
