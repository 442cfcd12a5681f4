"""StagewiseController through nvflare's real task machinery (``WFCommServer``: task scheduling, task requests,
submissions, cancellation, the controller's result callbacks), driven by hand instead of by its monitor thread; the
engine is a small fake and the sites answer with ``FLModel`` objects (through FLARE's own Shareable conversion).

Shows: heads never cross (only backbone keys are sent and accepted; a head key in a result is rejected), sites with
2, 3 and 5 classes in one stage, weighting exact against hand computation (uniform, by samples, with damping), a
stage closes at K (and cancels the rest), each kind of malformed, failed or late result is rejected, logged and absent
from the average, the sequential schedule asks the next site after a rejection, an invalid task report leaves the site
out, and every base is kept with its table.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fl_plugins.flare.stagewise import StagewiseController, report_problem
from fl_plugins.wire import (
    META_CLIENT_NAME,
    META_EVALUATE,
    META_HEAD_SHAPE,
    META_N_SAMPLES,
    META_NUM_CLASSES,
    META_NUM_STEPS,
    META_SPATIAL_DIMS,
    META_TASK_NAME,
    TASK_REPORT_TASK,
    TASK_STAGE_FINETUNE,
    TASK_VALIDATE,
)
from tests.flare.fake_engine import Behaviour, ControllerHarness

D = 4  # embedding width of the fake base (backbone.cls_token [1, 1, D])
BASE = {"backbone.cls_token": np.zeros((1, 1, D), np.float32), "backbone.norm.weight": np.ones(D, np.float32),
        "backbone.blocks.0.w": np.arange(6, dtype=np.float32).reshape(2, 3)}
CLASSES = {"site-1": 2, "site-2": 3, "site-3": 5, "site-4": 2}




def honest(delta: dict[str, float], n_samples: dict[str, int] | None = None) -> Behaviour:
    """Sites that report their task, return ``received base + delta[site]`` and validate with a fixed score."""

    def act(site: str, task: str, m: FLModel) -> Any:
        if task == TASK_REPORT_TASK:
            return FLModel(params={}, meta={META_NUM_CLASSES: CLASSES[site], META_SPATIAL_DIMS: 2,
                                            META_N_SAMPLES: (n_samples or {}).get(site, 10),
                                            META_TASK_NAME: f"task{CLASSES[site]}"})
        if task == TASK_STAGE_FINETUNE:
            params = {k: np.asarray(v, np.float32) + np.float32(delta[site]) for k, v in m.params.items()}
            metrics = {"val_accuracy": 0.25} if m.meta.get(META_EVALUATE) else {}
            return FLModel(params=params, params_type=ParamsType.FULL, current_round=m.current_round, metrics=metrics,
                           meta={META_NUM_STEPS: (n_samples or {}).get(site, 10)})
        if task == TASK_VALIDATE:
            return FLModel(params={}, metrics={"val_accuracy": 0.5 + 0.1 * m.current_round, "val_auc": float("nan")},
                           current_round=m.current_round)
        raise AssertionError(task)

    return act


class Run(ControllerHarness):
    """A StagewiseController on a real WFCommServer with a fake engine; :meth:`go` runs it with the sites' behaviour."""

    def __init__(self, tmp_path: Path, sites: list[str], **kwargs: Any) -> None:
        super().__init__(StagewiseController(num_clients=1, task_check_period=0.005, **kwargs), sites, tmp_path,
                         lambda: FLModel(params={k: v.copy() for k, v in BASE.items()}, params_type=ParamsType.FULL))

    def table(self) -> dict:
        return json.loads((self.app / "stage_bases.json").read_text())

    def base(self, b: int) -> dict[str, np.ndarray]:
        obj = torch.load(self.app / f"stage_{b}_base.pt", weights_only=True)
        assert obj["stage"] == b and obj["prefix"] == "backbone."
        return {"backbone." + k: v.numpy() for k, v in obj["state_dict"].items()}


def _sent(run: Run, task: str) -> list[tuple[str, FLModel]]:
    return [(s, m) for s, name, m in run.received if name == task]


# ------------------------------------------------------------------------------------------------ the protocol


def test_heads_never_cross_and_2_3_5_class_sites_share_a_stage(tmp_path):
    run = Run(tmp_path, ["site-1", "site-2", "site-3"], num_stages=2, k_per_stage=3)
    run.go(honest({"site-1": 1.0, "site-2": 2.0, "site-3": 3.0}))
    finetune = _sent(run, TASK_STAGE_FINETUNE)
    assert len(finetune) == 6
    for site, m in finetune:  # only the backbone is sent, with the head shape of the site's own task
        assert set(m.params) == set(BASE) and all(k.startswith("backbone.") for k in m.params)
        assert m.meta[META_HEAD_SHAPE] == [CLASSES[site], D]
        assert m.meta[META_EVALUATE] == (m.current_round == 0)  # later bases were validated already
    assert [s["contributors"] for s in run.table()["stages"]] == [["site-1", "site-2", "site-3"]] * 2
    assert {t[META_NUM_CLASSES] for t in run.table()["tasks"].values()} == {2, 3, 5}
    for b in range(3):  # every base kept: uniform average of +1, +2, +3 = +2 per stage
        got = run.base(b)
        assert set(got) == set(BASE)
        np.testing.assert_array_equal(got["backbone.blocks.0.w"], BASE["backbone.blocks.0.w"] + 2.0 * b)
    assert len(run.saved) == 2 and set(run.saved[-1].params) == set(BASE)
    metrics = json.loads((tmp_path / "stage_metrics.json").read_text())
    assert metrics["table"]["task5 (site-3)"] == [0.25, 0.6, 0.7]  # base 0 from stage 0, then the validations
    assert metrics["sites"]["site-1"]["metrics"]["1"]["val_auc"] is None  # NaN -> null in JSON
    assert "0.2500" in run.ctrl.metrics_table_text() and "task3 (site-2)" in run.ctrl.metrics_table_text()


@pytest.mark.parametrize(("weighting", "damping", "step"), [
    # deltas +1, +2, +3 with sample counts 1, 1, 2
    ("uniform", 1.0, 2.0),     # (1 + 2 + 3) / 3
    ("samples", 1.0, 2.25),    # (1*1 + 1*2 + 2*3) / 4
    ("uniform", 0.5, 1.0),     # 0.5 * 2
    ("samples", 0.5, 1.125),   # 0.5 * 2.25
])
def test_weighting_exact_against_hand_computation(weighting, damping, step, tmp_path):
    run = Run(tmp_path, ["site-1", "site-2", "site-3"], num_stages=2, k_per_stage=3, weighting=weighting,
              damping=damping)
    run.go(honest({"site-1": 1.0, "site-2": 2.0, "site-3": 3.0}, n_samples={"site-1": 1, "site-2": 1, "site-3": 2}))
    for b in (1, 2):
        for k, v in BASE.items():
            np.testing.assert_array_equal(run.base(b)[k], (v.astype(np.float64) + step * b).astype(np.float32))
    alpha = run.table()["stages"][0]["weights"]
    assert alpha == ({"site-1": 1 / 3, "site-2": 1 / 3, "site-3": 1 / 3} if weighting == "uniform"
                     else {"site-1": 0.25, "site-2": 0.25, "site-3": 0.5})


def test_a_stage_closes_at_k_and_cancels_the_rest(tmp_path):
    run = Run(tmp_path, ["site-1", "site-2", "site-3", "site-4"], num_stages=1, k_per_stage=2)
    act = honest({"site-1": 1.0, "site-2": 3.0, "site-3": 50.0, "site-4": 50.0})
    run.go(lambda s, t, m: None if t == TASK_STAGE_FINETUNE and s in ("site-3", "site-4") else act(s, t, m))
    (stage,) = run.table()["stages"]
    assert stage["close_reason"] == "k_reached" and stage["contributors"] == ["site-1", "site-2"]
    assert stage["cancelled"] == ["site-3", "site-4"] and stage["asked"] == ["site-1", "site-2", "site-3", "site-4"]
    np.testing.assert_array_equal(run.base(1)["backbone.norm.weight"], BASE["backbone.norm.weight"] + 2.0)
    assert run.comm.get_num_standing_tasks() == 0


def _bad(kind: str, m: FLModel) -> Any:
    """site-3's malformed / failed / late answer in stage 1."""
    good = {k: np.asarray(v, np.float32) + 3 for k, v in m.params.items()}
    meta = {META_NUM_STEPS: 10}
    if kind == "error":
        return "error"
    params = {
        "head_key": {**good, "head.weight": np.zeros((5, D), np.float32)},
        "missing_key": {k: v for k, v in good.items() if k != "backbone.norm.weight"},
        "shape": {**good, "backbone.norm.weight": np.ones(D + 1, np.float32)},
        "dtype": {**good, "backbone.norm.weight": np.ones(D, np.int32)},
        "nan": {**good, "backbone.norm.weight": np.full(D, np.nan, np.float32)},
        "inf": {**good, "backbone.norm.weight": np.full(D, np.inf, np.float32)},
        "norm_outlier": {k: v + 1e5 for k, v in good.items()},
    }.get(kind, good)
    rnd = 0 if kind == "late" else m.current_round
    return FLModel(params=params, params_type=ParamsType.FULL, current_round=rnd, meta=meta)


@pytest.mark.parametrize(("kind", "code"), [
    ("head_key", "unexpected_keys"), ("missing_key", "missing_keys"), ("shape", "shape"), ("dtype", "dtype"),
    ("nan", "non_finite"), ("inf", "non_finite"), ("norm_outlier", "norm_outlier"), ("late", "stage_closed"),
    ("error", None),
])
def test_malformed_failed_or_late_result_rejected_logged_and_absent(kind, code, tmp_path, caplog):
    run = Run(tmp_path, ["site-1", "site-2", "site-3"], num_stages=2, k_per_stage=3)
    act = honest({"site-1": 1.0, "site-2": 2.0, "site-3": 3.0})

    def misbehave(site: str, task: str, m: FLModel) -> Any:
        if site == "site-3" and task == TASK_STAGE_FINETUNE and m.current_round == 1:
            return _bad(kind, m)
        return act(site, task, m)

    with caplog.at_level(logging.WARNING, logger="fl_plugins.flare.stage_aggregator"):
        run.go(misbehave)
    stage = run.table()["stages"][1]
    # K = 3 cannot be reached without site-3: the stage closes with the 2 accepted results
    assert stage["close_reason"] == "no_more_results" and stage["contributors"] == ["site-1", "site-2"]
    if code is None:  # an execution error: nvflare drops it, the site counts as answered
        assert stage["rejected"] == []
    else:
        assert [(r["site"], r["code"]) for r in stage["rejected"]] == [("site-3", code)]
        assert any("site-3" in r.getMessage() and code in r.getMessage() for r in caplog.records)
    # absent from the average: base 2 = base 1 + (1 + 2) / 2
    np.testing.assert_array_equal(run.base(2)["backbone.blocks.0.w"], run.base(1)["backbone.blocks.0.w"] + 1.5)


def test_every_result_rejected_keeps_the_base(tmp_path):
    run = Run(tmp_path, ["site-1", "site-2"], num_stages=1, k_per_stage=2)
    act = honest({"site-1": 1.0, "site-2": 2.0})
    run.go(lambda s, t, m: _bad("nan", m) if t == TASK_STAGE_FINETUNE else act(s, t, m))
    (stage,) = run.table()["stages"]
    assert stage["close_reason"] == "empty" and stage["contributors"] == [] and len(stage["rejected"]) == 2
    np.testing.assert_array_equal(run.base(1)["backbone.blocks.0.w"], BASE["backbone.blocks.0.w"])


def test_sequential_asks_the_next_site_after_a_rejection(tmp_path):
    run = Run(tmp_path, ["site-1", "site-2", "site-3", "site-4"], num_stages=2, k_per_stage=2, schedule="sequential")
    act = honest({"site-1": 1.0, "site-2": 2.0, "site-3": 3.0, "site-4": 4.0})
    run.go(lambda s, t, m: _bad("head_key", m) if (s, t) == ("site-2", TASK_STAGE_FINETUNE) else act(s, t, m))
    s0, s1 = run.table()["stages"]
    assert s0["asked"] == ["site-1", "site-2", "site-3"] and s0["contributors"] == ["site-1", "site-3"]
    assert s0["close_reason"] == "k_reached" and s0["rejected"][0]["code"] == "unexpected_keys"
    order = [s for s, m in _sent(run, TASK_STAGE_FINETUNE) if m.current_round == 1]
    assert order == ["site-3", "site-4"] and s1["contributors"] == ["site-3", "site-4"]  # rotated by K


def test_a_site_with_an_invalid_task_report_takes_no_part(tmp_path):
    run = Run(tmp_path, ["site-1", "site-2", "site-3"], num_stages=1, k_per_stage=3)
    act = honest({"site-1": 1.0, "site-2": 2.0, "site-3": 3.0})

    def zero_classes(site: str, task: str, m: FLModel) -> Any:
        out = act(site, task, m)
        if site == "site-3" and task == TASK_REPORT_TASK:
            out.meta[META_NUM_CLASSES] = 0
        return out

    run.go(zero_classes)
    assert sorted(run.table()["tasks"]) == ["site-1", "site-2"]
    assert "site-3" not in {s for s, _ in _sent(run, TASK_STAGE_FINETUNE)}
    assert run.table()["stages"][0]["close_reason"] == "no_more_results"


def test_a_result_after_the_stage_closed_is_rejected(tmp_path, caplog):
    run = Run(tmp_path, ["site-1", "site-2"], num_stages=1, k_per_stage=2)
    run.go(honest({"site-1": 1.0, "site-2": 2.0}))
    late = FLModel(params={k: v + 1 for k, v in BASE.items()}, params_type=ParamsType.FULL, current_round=0,
                   meta={META_CLIENT_NAME: "site-2", META_NUM_STEPS: 10})
    with caplog.at_level(logging.WARNING, logger="fl_plugins.flare.stage_aggregator"):
        assert run.ctrl._on_stage_result(late) is False
    assert "stage_closed" in caplog.text and "site-2" in caplog.text


@pytest.mark.parametrize(("meta", "problem"), [
    ({META_NUM_CLASSES: 0, META_SPATIAL_DIMS: 2, META_N_SAMPLES: 5, META_TASK_NAME: "t"}, "num_classes=0"),
    ({META_NUM_CLASSES: 3, META_SPATIAL_DIMS: 4, META_N_SAMPLES: 5, META_TASK_NAME: "t"}, "spatial_dims=4"),
    ({META_NUM_CLASSES: 3, META_SPATIAL_DIMS: 3, META_N_SAMPLES: 0, META_TASK_NAME: "t"}, "n_samples=0"),
    ({META_NUM_CLASSES: 3, META_SPATIAL_DIMS: 3, META_N_SAMPLES: 5}, "task_name=None"),
    ({META_NUM_CLASSES: 5, META_SPATIAL_DIMS: 3, META_N_SAMPLES: 5, META_TASK_NAME: "t"}, None),
])
def test_report_problem(meta, problem):
    got = report_problem(meta)
    assert got == problem if problem is None else problem in got


@pytest.mark.parametrize(("kw", "match"), [
    ({"num_stages": 0}, "num_stages must be an int >= 1, got 0"),
    ({"k_per_stage": 0}, "k_per_stage must be an int >= 1, got 0"),
    ({"schedule": "random"}, "schedule must be one of"),
    ({"weighting": "loss"}, "weighting must be one of"),
    ({"damping": 0.0}, r"damping must be a number in \(0, 1\]"),
    ({"norm_bound": 0.5}, "norm_bound must be a number > 1"),
    ({"validate_every_stage": "yes"}, "validate_every_stage must be a bool"),
])
def test_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        StagewiseController(**kw)


def test_real_site_handlers_with_2_3_5_classes(tmp_path):
    """The same machinery with the package's site handlers (tiny ViT, synthetic 2/3/5-class tasks): two stages, every
    result accepted, the heads stay in the sites' workspaces and each base is the mean of the returned backbones."""
    from fl_plugins.data import generate_synthetic_multitask
    from fl_plugins.engine.stagewise import build_base_backbone
    from fl_plugins.flare.handler import SiteContext
    from fl_plugins.flare.stage_handler import HEAD_FILE, StagewiseHandler

    model = {"arch": "vit_classifier", "num_classes": 2, "head": "linear",
             "backbone": {"name": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4, "depth": 1}}
    paths = generate_synthetic_multitask(tmp_path / "data", class_counts=(2, 3, 5), images_per_site=36, size=16)
    handlers = {}
    for i, p in enumerate(paths):
        ws = tmp_path / f"ws{i}"
        ws.mkdir()
        handlers[f"site-{i + 1}"] = StagewiseHandler(SiteContext(f"site-{i + 1}", str(p), str(ws)), model,
                                                     {"lr": 1e-3, "batch_size": 8, "steps_per_stage": 1},
                                                     image_size=16)
    base = {k: v.numpy() for k, v in build_base_backbone(model).state_dict().items()}
    run = Run(tmp_path / "server", sorted(handlers), num_stages=2, k_per_stage=3)
    run.app.mkdir()
    run.ctrl.load_model = lambda: FLModel(params=dict(base), params_type=ParamsType.FULL)
    returned: dict[int, list[dict]] = {0: [], 1: []}

    def act(site: str, task: str, m: FLModel) -> FLModel:
        out = handlers[site].tasks()[task](m)
        if task == TASK_STAGE_FINETUNE:
            assert set(out.params) == set(base)  # the head stays on the site
            returned[m.current_round].append(out.params)
        return out

    run.go(act, timeout=120)
    assert [s["contributors"] for s in run.table()["stages"]] == [["site-1", "site-2", "site-3"]] * 2
    for b in (1, 2):
        want = np.mean([p["backbone.cls_token"].astype(np.float64) for p in returned[b - 1]], axis=0)
        np.testing.assert_allclose(run.base(b)["backbone.cls_token"], want, rtol=0, atol=1e-7)
    for i in range(3):
        assert (tmp_path / f"ws{i}" / HEAD_FILE).is_file()
    table = json.loads((run.app / "stage_metrics.json").read_text())["table"]
    assert len(table) == 3 and all(len(v) == 3 and None not in v for v in table.values())


@pytest.mark.parametrize("when", ["after_pickup", "before_pickup"])
def test_a_lost_site_no_longer_holds_the_stage(when, tmp_path):
    """A site FLARE deems disconnected, with the stage's task in hand or before it picked it up: the stage closes with
    the others' results instead of waiting for it."""
    run = Run(tmp_path, ["site-1", "site-2", "site-3"], num_stages=1, k_per_stage=3)
    act = honest({"site-1": 1.0, "site-2": 2.0, "site-3": 3.0})

    def lose_site_3(site: str, task: str, m: FLModel) -> Any:
        if task == TASK_STAGE_FINETUNE and site == ("site-3" if when == "after_pickup" else "site-1"):
            run.disconnect("site-3")
            if site == "site-3":
                return None
        return act(site, task, m)

    run.go(lose_site_3)
    (stage,) = run.table()["stages"]
    assert stage["close_reason"] == "no_more_results" and sorted(stage["contributors"]) == ["site-1", "site-2"]
    assert stage["lost"] == ["site-3"]
    assert ("site-3", TASK_VALIDATE) not in {(s, name) for s, name, _ in run.received}


def test_a_site_that_never_answers_its_stage_task_is_left_out_after_the_round_timeout(tmp_path, caplog):
    """A site that holds its stage task and never answers (a FLARE client restarted mid-job): after round_timeout
    the stage closes with the others' results, and the site is skipped in the validation and the next stage."""
    run = Run(tmp_path, ["site-1", "site-2", "site-3"], num_stages=2, k_per_stage=3, round_timeout=1)
    act = honest({"site-1": 1.0, "site-2": 2.0, "site-3": 3.0})

    def silent_site_3(site: str, task: str, m: FLModel) -> Any:
        if task == TASK_STAGE_FINETUNE and site == "site-3":
            return None
        return act(site, task, m)

    with caplog.at_level(logging.WARNING):
        run.go(silent_site_3, timeout=30)
    first, second = run.table()["stages"]
    assert sorted(first["contributors"]) == ["site-1", "site-2"]
    assert sorted(second["asked"]) == ["site-1", "site-2"]
    assert "stage 0: task 'stage_finetune' timed out after round_timeout=1s without a result from ['site-3']" in \
        caplog.text
    assert [s for s, name, _ in run.received if name == TASK_STAGE_FINETUNE].count("site-3") == 1
    np.testing.assert_array_equal(run.base(2)["backbone.blocks.0.w"], BASE["backbone.blocks.0.w"] + 2 * 1.5)


# ------------------------------------------------------------------------------------------------ resume


def test_a_crashed_stagewise_run_resumes_with_the_next_stage_and_ends_where_an_uninterrupted_one_ends(tmp_path):
    sites = ["site-1", "site-2", "site-3"]
    delta = {"site-1": 1.0, "site-2": 2.0, "site-3": 3.0}
    full = Run(tmp_path / "full", sites, num_stages=3, k_per_stage=3)
    full.go(honest(delta))

    crashed = Run(tmp_path / "crashed", sites, num_stages=3, k_per_stage=3)
    inner = honest(delta)

    def crash_in_stage_1(site: str, task: str, m: FLModel) -> Any:
        if task == TASK_STAGE_FINETUNE and m.current_round == 1:
            crashed.ctrl.abort_signal.trigger(True)
            return None
        return inner(site, task, m)

    crashed.go(crash_in_stage_1)
    ckpt = tmp_path / "crashed" / "round_checkpoint.pt"
    resumed = Run(tmp_path / "resumed", sites, num_stages=3, k_per_stage=3, resume_from=str(ckpt))
    resumed.go(honest(delta))
    assert sorted({int(m.current_round) for _, m in _sent(resumed, TASK_STAGE_FINETUNE)}) == [1, 2]
    assert all(m.meta["run_id"] == "job" for _, m in _sent(resumed, TASK_STAGE_FINETUNE))
    for k in BASE:  # the same base as the uninterrupted run, bit for bit
        np.testing.assert_array_equal(resumed.saved[-1].params[k], full.saved[-1].params[k])
    # the tables continue: base 0's scores came from the crashed job, bases 1-3 from the resumed one
    want = json.loads((tmp_path / "full" / "stage_metrics.json").read_text())["table"]
    assert json.loads((tmp_path / "resumed" / "stage_metrics.json").read_text())["table"] == want
    assert [b["base"] for b in resumed.table()["bases"]] == [0, 1, 2, 3]
    assert resumed.ctrl.resumed_from["round"] == 0
