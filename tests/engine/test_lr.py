"""LR schedule: a pure function of the global step (end values, warmup, validation)."""

from __future__ import annotations

import math

import pytest

from fl_plugins.engine.finetune import FinetuneConfig
from fl_plugins.engine.lr import cosine_lr


@pytest.mark.parametrize(
    ("step", "total", "warmup", "expected"),
    [
        (0, 100, 0, 1.0),  # starts at base
        (50, 100, 0, 0.55),  # half-way: (base + min) / 2
        (100, 100, 0, 0.1),  # ends at min
        (1000, 100, 0, 0.1),  # stays at min
        (0, 100, 10, 0.1),  # warmup: base * (step + 1) / warmup
        (9, 100, 10, 1.0),  # last warmup step reaches base
        (10, 100, 10, 1.0),  # first decay step is base
        (55, 100, 10, 0.55),
        (100, 100, 10, 0.1),
    ],
)
def test_cosine_lr_values(step: int, total: int, warmup: int, expected: float) -> None:
    assert math.isclose(cosine_lr(step, total, 1.0, 0.1, warmup), expected, rel_tol=1e-12)


def test_cosine_lr_monotone_after_warmup() -> None:
    lrs = [cosine_lr(s, 50, 1e-3, 1e-5, 5) for s in range(5, 60)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


@pytest.mark.parametrize(("step", "total", "warmup"), [(-1, 10, 0), (0, 0, 0), (0, 10, 11), (0, 10, -1)])
def test_cosine_lr_rejects_bad_arguments(step: int, total: int, warmup: int) -> None:
    with pytest.raises(ValueError):
        cosine_lr(step, total, 1.0, 0.0, warmup)


def test_config_lr_at() -> None:
    model = {"arch": "unet", "num_classes": 2}
    cfg = FinetuneConfig(model=model, lr=1e-3, min_lr_ratio=0.1, total_steps=40)
    assert cfg.lr_at(0) == pytest.approx(1e-3) and cfg.lr_at(40) == pytest.approx(1e-4)
    const = FinetuneConfig(model=model, lr=1e-3, total_steps=None, warmup_steps=4)
    assert const.lr_at(0) == pytest.approx(2.5e-4) and const.lr_at(3) == const.lr_at(1000) == pytest.approx(1e-3)
