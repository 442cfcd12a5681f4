"""A ready job's Recipe runs unchanged on a real POC system (the session fixture ``poc``, sites set up for
``fl_plugins``) through ``RunningPocEnv``, nvflare's ``PocEnv`` that submits to the running system instead of
re-provisioning it; ``Run.get_result`` leaves the system running."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from .conftest import record_timing
from .deploy_utils import data_generator_for

pytestmark = pytest.mark.slow


def test_recipe_runs_with_poc_env(poc, synthetic_data):
    from fl_plugins.flare.recipes import FinetuneSegUnetRecipe, RunningPocEnv

    name, fn, kwargs = data_generator_for("finetune_seg_unet")
    data = synthetic_data(name, fn, kwargs)
    poc.configure_data(str(data / "{site}" / "datalist.json"))
    recipe = FinetuneSegUnetRecipe({"fl": {"num_rounds": 2}, "trainer": {"steps_per_round": 2}})
    t0 = time.monotonic()
    run = recipe.execute(RunningPocEnv(str(poc.workspace), username=poc.admin))
    result = run.get_result(timeout=600)
    record_timing("recipe on POC (RunningPocEnv): submit -> result", time.monotonic() - t0)
    assert run.get_status() == "FINISHED:COMPLETED", run.get_status()
    assert result is not None and any(Path(result).rglob("FL_global_model.pt")), result
    assert poc.processes(), "RunningPocEnv must leave the POC system running"
