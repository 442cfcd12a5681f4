"""DINO projection head (lightly's :class:`~lightly.models.modules.heads.DINOProjectionHead`) and its
last-layer freeze.

Architecture (DINO ``DINOHead`` [V], methods-spec 2.1): ``Linear(d, H) - GELU - Linear(H, H) - GELU -
Linear(H, bottleneck)`` -> L2-normalise -> ``last_layer = weight_norm(Linear(bottleneck, K, bias=False))`` with
``weight_g`` filled with 1. Lightly's class implements exactly this (no batch norm for ViTs), so it is used
as is; this module only adds what the federated method needs:

* ``norm_last_layer`` (DINO ``True`` [V], DINOv2 ``False`` [V]): when True, ``weight_g`` is frozen at 1, so the
  prototypes are unit vectors and only their directions (``weight_v``) are learnt. In federated mode A the
  weight-norm parameters are averaged separately; averaging ``weight_v`` is not averaging the normalised
  weight unless ``g`` is frozen, hence the recommendation to keep it True (methods-spec 2.7).
* the freeze of the whole last layer during the first ``freeze_last_layer_steps`` GLOBAL steps (DINO freezes it
  for the first epoch [V]): :func:`cancel_last_layer_gradients` drops its gradients (``grad = None``) after
  ``backward()`` and before ``optimizer.step()``, so AdamW does not touch it (no update, no weight decay).
* :func:`copy_dino_head`: the legacy ``torch.nn.utils.weight_norm`` used by lightly cannot be
  ``copy.deepcopy``-ed, so the teacher head is a fresh head loaded with the student's state.

State-dict keys: ``layers.{0,2,4}.{weight,bias}``, ``last_layer.weight_g`` ``[K, 1]``, ``last_layer.weight_v``
``[K, bottleneck]``.
"""

from __future__ import annotations

import warnings

from lightly.models.modules.heads import DINOProjectionHead
from torch import nn

__all__ = [
    "DINOProjectionHead",
    "build_dino_head",
    "copy_dino_head",
    "last_layer_parameters",
    "cancel_last_layer_gradients",
]


def build_dino_head(
    in_dim: int,
    out_dim: int,
    hidden_dim: int = 2048,
    bottleneck_dim: int = 256,
    norm_last_layer: bool = True,
) -> DINOProjectionHead:
    """3-layer MLP head + weight-normalised prototype layer; ``forward(x[N, in_dim]) -> [N, out_dim]``.

    Args:
        in_dim: backbone embedding width ``d``.
        out_dim: number of prototypes ``K`` (65536 [V]; 1024-4096 on CPU, methods-spec 2.7/9.3 [R]).
        hidden_dim: MLP width (2048 [V]).
        bottleneck_dim: width before the prototype layer (256 [V]).
        norm_last_layer: freeze ``weight_g = 1`` (see module docstring).
    """
    for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden_dim", hidden_dim)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if bottleneck_dim < 1:
        raise ValueError(f"bottleneck_dim must be >= 1, got {bottleneck_dim}")
    with warnings.catch_warnings():
        # lightly builds the prototype layer with the legacy torch.nn.utils.weight_norm (deprecated, still works)
        warnings.filterwarnings("ignore", message=".*torch.nn.utils.weight_norm.*", category=FutureWarning)
        return DINOProjectionHead(
            input_dim=in_dim,
            hidden_dim=hidden_dim,
            bottleneck_dim=bottleneck_dim,
            output_dim=out_dim,
            batch_norm=False,
            norm_last_layer=norm_last_layer,
        )


def copy_dino_head(head: DINOProjectionHead) -> DINOProjectionHead:
    """A new head with the same architecture, ``requires_grad`` flags and values as ``head``."""
    linears = [m for m in head.layers if isinstance(m, nn.Linear)]
    out_dim, bottleneck_dim = head.last_layer.weight_v.shape
    new = build_dino_head(
        in_dim=linears[0].in_features,
        out_dim=out_dim,
        hidden_dim=linears[0].out_features,
        bottleneck_dim=bottleneck_dim,
        norm_last_layer=not head.last_layer.weight_g.requires_grad,
    )
    new.load_state_dict(head.state_dict())
    return new


def last_layer_parameters(head: DINOProjectionHead) -> list[nn.Parameter]:
    """``[weight_g, weight_v]`` of the prototype layer."""
    return list(head.last_layer.parameters())


def cancel_last_layer_gradients(head: DINOProjectionHead, global_step: int, freeze_last_layer_steps: int) -> bool:
    """Set the last layer's gradients to None while ``global_step < freeze_last_layer_steps``.

    Call after ``backward()`` (and clipping) and before ``optimizer.step()``. Returns True if gradients were
    cancelled.
    """
    if global_step < 0:
        raise ValueError(f"global_step must be >= 0, got {global_step}")
    if global_step >= freeze_last_layer_steps:
        return False
    for p in last_layer_parameters(head):
        p.grad = None
    return True
