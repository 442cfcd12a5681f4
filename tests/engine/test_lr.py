"""Fine-tuning LR (``FinetuneConfig.lr_at``): a pure function of the global step on ``fl_plugins.core.schedules``
(warm-up 0 -> lr over ``warmup_steps``, lr reached at step ``warmup_steps``; cosine to ``lr * min_lr_ratio``)."""

from __future__ import annotations

import pytest

from fl_plugins.engine.finetune import FinetuneConfig

MODEL = {"arch": "unet", "num_classes": 2}


# lr = 1e-3, final = 1e-4; hand-computed: cosine value at fraction t = 1e-4 + 9e-4 * (1 + cos(pi t)) / 2
@pytest.mark.parametrize(
    ("total", "warmup", "step", "expected"),
    [
        (40, 0, 0, 1e-3),  # no warm-up: step 0 has the peak
        (40, 0, 20, 5.5e-4),  # half-way: (1e-3 + 1e-4) / 2
        (40, 0, 40, 1e-4),  # the end: lr * min_lr_ratio
        (40, 0, 1000, 1e-4),  # clamped after the end
        (110, 10, 0, 0.0),  # warm-up starts at 0
        (110, 10, 1, 1e-4),  # 1e-3 * 1 / 10
        (110, 10, 5, 5e-4),
        (110, 10, 10, 1e-3),  # warm-up ends at step 10 with the peak; the cosine starts there
        (110, 10, 60, 5.5e-4),  # half-way through the 100 cosine steps
        (110, 10, 110, 1e-4),
        (None, 4, 0, 0.0),  # no schedule length: warm-up, then constant lr
        (None, 4, 1, 2.5e-4),
        (None, 4, 3, 7.5e-4),
        (None, 4, 4, 1e-3),
        (None, 4, 1000, 1e-3),
        (None, 0, 0, 1e-3),
    ],
)
def test_lr_at_hand_computed(total, warmup, step, expected):
    cfg = FinetuneConfig(model=MODEL, lr=1e-3, min_lr_ratio=0.1, total_steps=total, warmup_steps=warmup)
    assert cfg.lr_at(step) == pytest.approx(expected, abs=1e-15)


def test_lr_at_is_monotone_after_warmup():
    cfg = FinetuneConfig(model=MODEL, lr=1e-3, min_lr_ratio=0.01, total_steps=50, warmup_steps=5)
    lrs = [cfg.lr_at(s) for s in range(0, 60)]
    assert all(a <= b for a, b in zip(lrs[:6], lrs[1:6]))
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))


def test_lr_at_rejects_a_negative_step():
    with pytest.raises(ValueError, match="step"):
        FinetuneConfig(model=MODEL, total_steps=10).lr_at(-1)
