"""Round timeout (a site that does not answer is left out and skipped until heard of again) and resume from a round
checkpoint, on nvflare's real task machinery (ControllerHarness) with FedAvgWithFinalValidation."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from fl_plugins.flare.controllers import DEFAULT_ROUND_TIMEOUT, FedAvgWithFinalValidation
from fl_plugins.flare.fclopt_controller import FCLOptController
from fl_plugins.flare.resume import (
    CHECKPOINT_FILE,
    CHECKPOINT_FORMAT,
    ResumeError,
    load_round_checkpoint,
    save_round_checkpoint,
)
from fl_plugins.wire import META_NUM_STEPS, TASK_TRAIN, TASK_VALIDATE
from tests.flare.fake_engine import Behaviour, ControllerHarness

SITES = ["site-1", "site-2", "site-3"]
INIT = {"w": np.zeros((2, 3), np.float32), "b": np.arange(3, dtype=np.float32)}


def initial() -> FLModel:
    return FLModel(params={k: v.copy() for k, v in INIT.items()}, params_type=ParamsType.FULL)


def honest(silent: dict[str, int] | None = None, stop_at: int | None = None,
           h: list[ControllerHarness] | None = None) -> Behaviour:
    """Site i adds (i + 1) * (round + 1) to every weight (a different, deterministic update per site and round) and
    reports ``acc`` = the received ``b[0]`` (so the best model is the last one); ``silent[site] = r``: that site
    holds its round-r training task and never answers; ``stop_at``: the server crashes (abort) when round
    ``stop_at`` is handed out."""
    silent = silent or {}

    def act(site: str, task: str, m: FLModel):
        rnd = int(m.current_round or 0)
        if task == TASK_VALIDATE:
            return FLModel(params={}, metrics={"acc": float(np.asarray(m.params["b"])[0])})
        assert task == TASK_TRAIN, task
        if stop_at is not None and rnd >= stop_at:
            h[0].ctrl.abort_signal.trigger(True)
            return None
        if silent.get(site) == rnd:
            return None
        step = (SITES.index(site) + 1) * (rnd + 1)
        return FLModel(params={k: np.asarray(v) + step for k, v in m.params.items()}, params_type=ParamsType.FULL,
                       current_round=rnd, metrics={"acc": float(np.asarray(m.params["b"])[0])},
                       meta={META_NUM_STEPS: 10})

    return act


def harness(app, rounds: int = 4, **kwargs) -> ControllerHarness:
    os.makedirs(app, exist_ok=True)
    kwargs.setdefault("num_clients", 2)
    ctrl = FedAvgWithFinalValidation(num_rounds=rounds, task_check_period=0.005, key_metric="acc", **kwargs)
    return ControllerHarness(ctrl, SITES, app, initial)


def expected_after(rounds: range, start: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Every site answers every round, equal weights: the mean update of round r is 2 * (r + 1)."""
    params = {k: v.copy() for k, v in (start or INIT).items()}
    for r in rounds:
        params = {k: v + 2.0 * (r + 1) for k, v in params.items()}
    return params


def sent_rounds(h: ControllerHarness, task: str = TASK_TRAIN) -> list[int]:
    return sorted({int(m.current_round) for _, t, m in h.received if t == task})


# ------------------------------------------------------------------------------------------------------ round timeout


def test_default_round_timeout_and_bad_values():
    assert FedAvgWithFinalValidation(num_rounds=1).round_timeout == DEFAULT_ROUND_TIMEOUT == 3600
    for bad in (-1, 1.5, "60", True):
        with pytest.raises(ValueError, match="round_timeout"):
            FedAvgWithFinalValidation(num_rounds=1, round_timeout=bad)


def test_a_site_that_never_answers_is_left_out_after_the_timeout_and_skipped_later(tmp_path, caplog):
    h = harness(tmp_path, rounds=3, round_timeout=1)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING):
        h.go(honest(silent={"site-3": 1}), timeout=20)
    took = time.monotonic() - t0
    assert took < 6, f"the round waited {took:.1f} s for a 1 s timeout"
    # round 0: all three; round 1: site-3 silent -> the mean of site-1 (+2) and site-2 (+4); round 2: without site-3
    trained = {r: sorted(s for s, t, m in h.received if t == TASK_TRAIN and m.current_round == r) for r in range(3)}
    assert trained == {0: SITES, 1: SITES, 2: ["site-1", "site-2"]}
    final = h.saved[-1].params
    want = INIT["b"] + (1 + 2 + 3) / 3 * 1 + (1 + 2) / 2 * 2 + (1 + 2) / 2 * 3
    np.testing.assert_allclose(final["b"], want, rtol=0, atol=1e-5)
    assert h.ctrl.unresponsive == {"site-3": "round 1 (task 'train')"}
    text = caplog.text
    assert ("round 1: task 'train' timed out after round_timeout=1s without a result from ['site-3']: the round goes "
            "on with the results it has; 2 site(s) remain: ['site-1', 'site-2']") in text
    assert "round 2: skipping site-3: it did not answer round 1 (task 'train') within round_timeout=1s" in text
    assert "final validation: skipping disconnected site(s) ['site-3']" in text
    assert sorted(s for s, t, _ in h.received if t == TASK_VALIDATE) == ["site-1", "site-2"]


def test_a_late_result_or_a_reconnect_brings_the_site_back(tmp_path, caplog):
    h = harness(tmp_path, rounds=2, round_timeout=1)
    h.go(honest(silent={"site-3": 1}), timeout=20)
    assert "site-3" in h.ctrl.unresponsive
    late = FLModelUtils.to_shareable(FLModel(params={k: v + 1 for k, v in INIT.items()}, current_round=1))
    with caplog.at_level(logging.WARNING), h.engine.new_context() as ctx:
        h.comm.process_submission(h.engine.client("site-3"), TASK_TRAIN, "an-ended-task", late, ctx)
    assert "site-3" not in h.ctrl.unresponsive
    assert "late result of site-3 for task 'train' discarded" in caplog.text
    assert h.ctrl.sample_clients() == SITES

    h.ctrl.unresponsive["site-2"] = "round 1 (task 'train')"
    assert h.ctrl.connected_sites() == (["site-1", "site-3"], ["site-2"])
    with h.engine.new_context() as ctx:
        ctx.set_prop(FLContextKey.RECONNECTED_CLIENT_NAME, "site-2")
        h.ctrl.handle_event(EventType.CLIENT_RECONNECTED, ctx)
    assert h.ctrl.unresponsive == {}


def test_a_task_with_its_own_timeout_keeps_it(tmp_path):
    h = harness(tmp_path, rounds=1, round_timeout=1, validation_timeout=7)
    h.go(honest(), timeout=20)
    validate = [t for t in h.ctrl._own_tasks if t.name == TASK_VALIDATE]
    assert validate and validate[-1].timeout == 7
    train = [t for t in h.ctrl._own_tasks if t.name == TASK_TRAIN]
    assert not train or train[-1].timeout == 1


# ------------------------------------------------------------------------------------------------------------ resume


def test_a_crashed_job_resumes_after_its_last_completed_round_and_ends_where_an_uninterrupted_run_ends(tmp_path):
    full = harness(tmp_path / "full")
    full.go(honest(), timeout=20)
    assert sent_rounds(full) == [0, 1, 2, 3]

    crashed: list[ControllerHarness] = []
    crashed.append(harness(tmp_path / "crashed"))
    crashed[0].go(honest(stop_at=2, h=crashed), timeout=20)
    ckpt_path = tmp_path / "crashed" / CHECKPOINT_FILE
    ckpt = load_round_checkpoint(ckpt_path)
    assert ckpt["round"] == 1 and ckpt["total_rounds"] == 4 and ckpt["workflow"] == "FedAvgWithFinalValidation"
    for k, v in expected_after(range(2)).items():  # float32 weighted mean: within rounding of the hand value
        np.testing.assert_allclose(ckpt["params"][k], v, rtol=0, atol=1e-5)
        assert isinstance(ckpt["params"][k], np.ndarray)
    assert ckpt["best"]["aggregate"] == 0  # round 1's sites scored the aggregate of round 0

    resumed = harness(tmp_path / "resumed", resume_from=str(ckpt_path))
    resumed.go(honest(), timeout=20)
    assert sent_rounds(resumed) == [2, 3], "rounds 3 and 4 (0-based 2, 3) only"
    assert sent_rounds(resumed, TASK_VALIDATE) == [4]
    for k in INIT:  # bit for bit: the same arithmetic from the same checkpointed float32 values
        np.testing.assert_array_equal(resumed.saved[-1].params[k], full.saved[-1].params[k])
    assert resumed.ctrl.best["aggregate"] == full.ctrl.best["aggregate"] == 3
    assert resumed.ctrl.resumed_from == {"round": 1, "total_rounds": 4, "job_id": "job", "run_id": "job",
                                        "workflow": "FedAvgWithFinalValidation"}
    assert all(m.meta["run_id"] == "job" for _, t, m in resumed.received if t == TASK_TRAIN)  # the sites' state key
    assert load_round_checkpoint(tmp_path / "resumed" / CHECKPOINT_FILE)["round"] == 3


def test_a_relative_resume_path_is_read_from_the_apps_config_folder(tmp_path):
    done = harness(tmp_path / "a", rounds=2)
    done.go(honest(), timeout=20)
    (tmp_path / "b" / "config").mkdir(parents=True)
    ckpt = load_round_checkpoint(tmp_path / "a" / CHECKPOINT_FILE)
    save_round_checkpoint(tmp_path / "b" / "config" / "resume.pt", workflow=ckpt["workflow"], completed_round=0,
                          total_rounds=2, params=expected_after(range(1)), params_type=ParamsType.FULL)
    h = harness(tmp_path / "b", rounds=2, resume_from="resume.pt")
    h.go(honest(), timeout=20)
    assert sent_rounds(h) == [1]
    np.testing.assert_array_equal(h.saved[-1].params["b"], done.saved[-1].params["b"])


def _ckpt(path, **changes):
    args = dict(workflow="FedAvgWithFinalValidation", completed_round=1, total_rounds=4, params=dict(INIT),
                params_type=ParamsType.FULL)
    args.update(changes)
    save_round_checkpoint(path, **args)
    return str(path)


@pytest.mark.parametrize("make, message", [
    (lambda p: str(p / "nope.pt"), "resume_from: no round checkpoint at"),
    (lambda p: (p.joinpath("x.pt").write_text("not a checkpoint"), str(p / "x.pt"))[1], "not a readable"),
    (lambda p: (torch.save({"format": "other/9"}, p / "f.pt"), str(p / "f.pt"))[1], "has format 'other/9'"),
    (lambda p: _ckpt(p / "w.pt", workflow="StagewiseController"), "written by workflow 'StagewiseController'"),
    (lambda p: _ckpt(p / "n.pt", completed_round=3), "is after round 3; this job has 4 round"),
    (lambda p: _ckpt(p / "k.pt", params={"w": INIT["w"]}), "does not match this job's model"),
    (lambda p: _ckpt(p / "s.pt", params={"w": np.zeros((3, 2), np.float32), "b": INIT["b"]}),
     "does not match this job's model"),
])
def test_a_checkpoint_that_cannot_start_the_job_is_refused_naming_the_setting(tmp_path, make, message):
    h = harness(tmp_path / "app", resume_from=make(tmp_path))
    with pytest.raises(ResumeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        h.ctrl.read_resume_checkpoint(4, initial())


def test_bad_resume_from_setting():
    with pytest.raises(ValueError, match="resume_from must be the path"):
        FedAvgWithFinalValidation(num_rounds=1, resume_from="  ")
    assert CHECKPOINT_FORMAT.startswith("fl_plugins.round_checkpoint/")


def test_fclopt_keeps_its_predicted_target_and_byte_counts_across_a_resume(tmp_path):
    a = FCLOptController(num_rounds=3, ptnu=True, dp=True)
    a.xi_hat = {"target.encoder.w": np.full((2, 2), 0.5, np.float32)}
    a._correction = True
    a.comm = [{"round": 0, "down": {"site-1": {"online": 10, "predictor": 2, "target": 0}}, "up": {},
               "target_uploads": ["site-1"]}]
    save_round_checkpoint(tmp_path / "c.pt", workflow="FCLOptController", completed_round=0, total_rounds=3,
                          params=dict(INIT), params_type=ParamsType.FULL, extra=a.resume_state())
    b = FCLOptController(num_rounds=3, ptnu=True, dp=True)
    b.restore_resume_state(load_round_checkpoint(tmp_path / "c.pt", workflow="FCLOptController")["extra"])
    np.testing.assert_array_equal(b.xi_hat["target.encoder.w"], a.xi_hat["target.encoder.w"])
    assert isinstance(b.xi_hat["target.encoder.w"], np.ndarray)
    assert b._correction is True and b.comm == a.comm


# ------------------------------------------------------------------------------------------------- flssl resume

REPO_JOB = Path(__file__).resolve().parents[2] / "jobs" / "finetune_seg_unet"


def test_flssl_resume_writes_a_job_that_carries_the_checkpoint(tmp_path, capsys):
    import json

    from fl_plugins.cli import main as flssl

    ckpt = _ckpt(tmp_path / "round_checkpoint.pt", completed_round=0, total_rounds=2)
    out = tmp_path / "resumed"
    assert flssl(["resume", "--checkpoint", ckpt, "--job", str(REPO_JOB), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "resumes run None of job None after its round 0, runs rounds 1..1" in printed
    assert f"nvflare job submit -j {out}" in printed
    cfg = json.loads((out / "app" / "config" / "config_fed_server.json").read_text())
    (wf,) = cfg["workflows"]
    assert wf["args"]["resume_from"] == "resume_checkpoint.pt"
    assert (out / "app" / "config" / "resume_checkpoint.pt").read_bytes() == Path(ckpt).read_bytes()
    assert json.loads((out / "meta.json").read_text())["name"] == "finetune_seg_unet_resume1"
    # the original job folder is untouched
    assert "resume_from" not in json.loads((REPO_JOB / "app" / "config" / "config_fed_server.json").read_text()
                                           )["workflows"][0]["args"]


@pytest.mark.parametrize("make, message", [
    (lambda p: _ckpt(p / "a.pt", completed_round=1, total_rounds=2), "after round 1, the last of 2"),
    (lambda p: _ckpt(p / "b.pt", workflow="StagewiseController", total_rounds=2), "written by 'StagewiseController'"),
    (lambda p: _ckpt(p / "c.pt", completed_round=0, total_rounds=5), "has 2 round(s); the checkpoint's job had 5"),
    (lambda p: str(p / "missing.pt"), "--checkpoint: no round checkpoint at"),
])
def test_flssl_resume_refuses_what_cannot_resume_naming_the_option(tmp_path, capsys, make, message):
    from fl_plugins.cli import main as flssl

    assert flssl(["resume", "--checkpoint", make(tmp_path), "--job", str(REPO_JOB), "--out",
                  str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_flssl_resume_refuses_an_existing_out_folder_and_a_non_job(tmp_path, capsys):
    from fl_plugins.cli import main as flssl

    ckpt = _ckpt(tmp_path / "c.pt", completed_round=0, total_rounds=2)
    (tmp_path / "out").mkdir()
    assert flssl(["resume", "--checkpoint", ckpt, "--job", str(REPO_JOB), "--out", str(tmp_path / "out")]) == 2
    assert "--out:" in capsys.readouterr().err
    assert flssl(["resume", "--checkpoint", ckpt, "--job", str(tmp_path), "--out", str(tmp_path / "o2")]) == 2
    assert "is not a FLARE job folder (no meta.json)" in capsys.readouterr().err
