"""What a model built from a pretrained backbone took from the file and what it starts from scratch."""

from __future__ import annotations

from torch import nn

__all__ = ["pretrained_report"]


def pretrained_report(model: nn.Module, path: str) -> str:
    """One line per top-level part: ``backbone`` loaded from ``path``, every other part (decoder, head) fresh."""
    lines = [f"pretrained backbone {path}:"]
    for name, child in model.named_children():
        n = sum(p.numel() for p in child.parameters())
        what = "loaded from the file" if name == "backbone" else "randomly initialised (trained from scratch)"
        lines.append(f"  {name:<12s} {n:>10,d} parameters  {what}")
    return "\n".join(lines)
