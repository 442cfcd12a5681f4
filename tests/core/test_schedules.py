"""Schedules are pure functions of the global step: end values, warm-up values, clamping, validation."""

import math

import pytest

from fl_plugins.core.schedules import cosine_schedule, cosine_with_warmup, linear_warmup_then_constant
from fl_plugins.methods.dino_config import DINOConfig
from fl_plugins.models.backbone import BackboneSpec

TINY = BackboneSpec(img_size=32, patch_size=8, depth=2)


# (start, end, total) -> value at 0, at total/2, at total, past the end
@pytest.mark.parametrize("start,end,total", [(0.996, 1.0, 100), (0.992, 1.0, 7), (0.04, 0.4, 1000), (1.0, 0.0, 1)])
def test_cosine_schedule_end_values(start, end, total):
    assert cosine_schedule(0, total, start, end) == pytest.approx(start)
    assert cosine_schedule(total, total, start, end) == end
    assert cosine_schedule(total + 10, total, start, end) == end  # clamped past the end
    if total % 2 == 0:
        assert cosine_schedule(total // 2, total, start, end) == pytest.approx((start + end) / 2)


def test_cosine_schedule_is_monotone_and_matches_formula():
    values = [cosine_schedule(s, 50, 0.996, 1.0) for s in range(51)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert values[10] == pytest.approx(1.0 - 0.004 * (1 + math.cos(math.pi * 10 / 50)) / 2)


@pytest.mark.parametrize("warmup", [0, 1, 30])
def test_linear_warmup_then_constant(warmup):
    assert linear_warmup_then_constant(0, warmup, 0.04, 0.07) == (0.07 if warmup == 0 else 0.04)
    assert linear_warmup_then_constant(warmup, warmup, 0.04, 0.07) == 0.07
    assert linear_warmup_then_constant(warmup + 100, warmup, 0.04, 0.07) == 0.07
    if warmup == 30:
        assert linear_warmup_then_constant(15, warmup, 0.04, 0.07) == pytest.approx(0.055)


def test_cosine_with_warmup_values():
    assert cosine_with_warmup(0, 100, 10, 5e-4, 1e-6) == 0.0
    assert cosine_with_warmup(5, 100, 10, 5e-4, 1e-6) == pytest.approx(2.5e-4)
    assert cosine_with_warmup(10, 100, 10, 5e-4, 1e-6) == pytest.approx(5e-4)
    assert cosine_with_warmup(100, 100, 10, 5e-4, 1e-6) == 1e-6
    assert cosine_with_warmup(500, 100, 10, 5e-4, 1e-6) == 1e-6


# The one warm-up convention (module docstring): value(s) = start + (peak - start) * s / W for s < W, the peak at
# s = W; then the cosine over the remaining total - W steps. Hand-computed with peak 1.0, final 0.1, W = 4, total 14.
@pytest.mark.parametrize("step,expected", [(0, 0.0), (1, 0.25), (2, 0.5), (3, 0.75), (4, 1.0), (9, 0.55), (14, 0.1),
                                           (20, 0.1)])
def test_warmup_convention_hand_computed(step, expected):
    assert cosine_with_warmup(step, 14, 4, 1.0, 0.1) == pytest.approx(expected, abs=1e-15)


def test_warmup_convention_with_a_start_value_and_without_warmup():
    assert cosine_with_warmup(0, 14, 4, 1.0, 0.1, warmup_start_value=0.2) == pytest.approx(0.2)
    assert cosine_with_warmup(2, 14, 4, 1.0, 0.1, warmup_start_value=0.2) == pytest.approx(0.6)
    assert cosine_with_warmup(0, 10, 0, 1.0, 0.1) == 1.0  # W = 0: the peak from step 0
    assert cosine_with_warmup(5, 10, 0, 1.0, 0.1) == pytest.approx(0.55)


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda: cosine_schedule(-1, 10, 0.0, 1.0), "step"),
        (lambda: cosine_schedule(0, -1, 0.0, 1.0), "total_steps"),
        (lambda: linear_warmup_then_constant(-3, 10, 0.0, 1.0), "step"),
        (lambda: linear_warmup_then_constant(0, -1, 0.0, 1.0), "warmup_steps"),
        (lambda: cosine_with_warmup(0, 10, -1, 1.0, 0.0), "warmup_steps"),
        (lambda: cosine_with_warmup(0, 10, 11, 1.0, 0.0), "warmup_steps"),
    ],
)
def test_negative_or_inconsistent_steps_raise(call, name):
    with pytest.raises(ValueError, match=name):
        call()


# preset -> (tau_t at step 0, at end of warm-up, momentum at 0, momentum at the end)
@pytest.mark.parametrize("variant,t0,t_end,m0", [("dino", 0.04, 0.04, 0.996), ("dinov2", 0.04, 0.07, 0.992)])
def test_config_schedules_from_global_step(variant, t0, t_end, m0):
    from fl_plugins.methods.dino_config import VARIANT_PRESETS

    cfg = DINOConfig.from_dict({**VARIANT_PRESETS[variant], "backbone": TINY, "local_crop_size": 16,
                                "total_steps": 100, "out_dim": 64})
    assert cfg.teacher_temp_at(0) == pytest.approx(t0)
    assert cfg.teacher_temp_at(cfg.warmup_teacher_temp_steps) == pytest.approx(t_end)
    assert cfg.teacher_temp_at(10_000) == pytest.approx(t_end)
    assert cfg.teacher_momentum_at(0) == pytest.approx(m0)
    assert cfg.teacher_momentum_at(100) == 1.0
    assert cfg.lr_at(cfg.warmup_steps) == pytest.approx(cfg.lr)
    assert cfg.lr_at(100) == pytest.approx(cfg.min_lr)
    assert cfg.weight_decay_at(0) == pytest.approx(0.04) and cfg.weight_decay_at(100) == pytest.approx(0.4)
    if variant == "dinov2":
        assert cfg.warmup_teacher_temp_steps == 30
        assert cfg.teacher_temp_at(15) == pytest.approx(0.055)
