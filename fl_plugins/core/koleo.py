"""KoLeo regulariser (Sablayrolles et al. 2019), as used by DINOv2 on the student's backbone CLS features.

    L_KoLeo = -(1/n) sum_i log( min_{j != i} ||x_i - x_j||_2 + eps ),   x = L2-normalised features

DINOv2 applies it to each global crop's batch separately (pre-head CLS), weight 0.1 (methods-spec 3.3 [V]).

References:
    - [0] Spreading vectors for similarity search, 2019, https://arxiv.org/abs/1806.03198
    - [1] DINOv2 ``dinov2/loss/koleo_loss.py`` @ b8931f7 [V]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["KOLEO_WEIGHT", "koleo_loss"]

KOLEO_WEIGHT = 0.1  # DINOv2 dino.koleo_loss_weight [V]


def koleo_loss(features: Tensor, eps: float = 1e-8) -> Tensor:
    """Kozachenko-Leonenko entropy estimator (negated) on L2-normalised rows.

    The nearest neighbour of each row is found without gradient (largest cosine similarity, self excluded);
    the gradient flows through the distance to it.

    Args:
        features: ``[n, D]``, ``n >= 2`` (a nearest neighbour needs another sample).
        eps: added inside the log and to the normalisation (1e-8 [V]).

    Returns:
        Scalar loss.

    Raises:
        ValueError: if ``features`` is not 2-D or has fewer than 2 rows.
    """
    if features.dim() != 2:
        raise ValueError(f"KoLeo features must be [n, D], got shape {tuple(features.shape)}")
    n = features.shape[0]
    if n < 2:
        raise ValueError(
            f"KoLeo loss needs at least 2 samples per batch (per global crop) to find a nearest neighbour, got {n}; "
            "use a local batch size >= 2 or set koleo_weight=0"
        )
    x = F.normalize(features, p=2, dim=-1, eps=eps)
    with torch.no_grad():
        sim = x @ x.t()
        sim.fill_diagonal_(-2.0)  # cosine >= -1, so a row never picks itself
        nn_idx = sim.argmax(dim=1)
    dist = torch.linalg.vector_norm(x - x[nn_idx], dim=-1)
    return -torch.log(dist + eps).mean()
