"""Collapse monitor of the DINO/iBOT teacher targets (pure torch, no gradient).

DINO avoids two trivial solutions by balancing centering and sharpening (Caron et al. 2021, sec. 5.3 / fig. 7:
"collapse" is read off two entropies of the teacher output):

* per-sample entropy ``H(P_t)``: mean over the batch of ``-sum_k p_k log p_k``;
* entropy of the batch-mean target ``H(mean_b P_t)``.

Uniform collapse (centering wins): both tend to ``log K``. One-hot collapse (sharpening wins): both tend to 0.
Healthy training: per-sample entropy well below ``log K`` while the batch mean stays spread out, i.e. the
difference ``H(mean) - H(P_t)`` (the mutual information between a sample and its prototype under the batch's
empirical distribution, ``>= 0`` by concavity) stays large. It is 0 exactly when every sample gets the same target
-- the output does not depend on the input any more, whichever kind of collapse it is.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["target_entropies"]

_EPS = 1e-12  # guards log(0); 0 * log(eps) = 0 so exact zeros contribute nothing


def target_entropies(probs: Tensor) -> dict[str, float]:
    """Collapse statistics of teacher target distributions ``probs [N, K]`` (rows sum to 1), in nats.

    Returns:
        ``{"teacher_entropy": mean_n H(p_n), "teacher_mean_entropy": H(mean_n p_n),
        "teacher_mi": teacher_mean_entropy - teacher_entropy}``.

    Raises:
        ValueError: ``probs`` is not 2-D with at least one row.
    """
    if probs.dim() != 2 or probs.shape[0] < 1:
        raise ValueError(f"probs must be [N, K] with N >= 1, got shape {tuple(probs.shape)}")
    p = probs.detach().float()
    per_sample = float(-(p * p.clamp_min(_EPS).log()).sum(dim=1).mean())
    mean = p.mean(dim=0)
    of_mean = float(-(mean * mean.clamp_min(_EPS).log()).sum())
    return {"teacher_entropy": per_sample, "teacher_mean_entropy": of_mean, "teacher_mi": of_mean - per_sample}
