"""The FCL jobs as exported: the FCL workflow with its exchange settings, the fcl handler answering the extraction
task, one method config on both sides, the baseline's exchange off, and settings errors named when the job is built."""

from __future__ import annotations

import json

import pytest

from fl_plugins.flare.job_builder import build_job, non_federated_regex_of
from fl_plugins.flare.recipes import recipe_for
from fl_plugins.methods import build


@pytest.mark.parametrize(("name", "enabled"), [("fcl_pretrain", True), ("fcl_noexchange_pretrain", False)])
def test_fcl_job_config(tmp_path, name, enabled):
    recipe_for(name, {"exchange": {"max_features": 256, "feature_dtype": "float16"}}).export(str(tmp_path))
    app = tmp_path / name / "app" / "config"
    server, client = (json.loads((app / f"config_fed_{s}.json").read_text()) for s in ("server", "client"))
    (wf,) = server["workflows"]
    assert wf["path"] == "fl_plugins.flare.fcl_controller.FCLController"
    # nvflare writes only the arguments that differ from the defaults (128, 4, true, 0)
    defaults = {"feature_dim": 128, "num_partitions": 4, "exchange": True, "exchange_timeout": 0}
    assert {k: wf["args"].get(k, d) for k, d in defaults.items()} == {**defaults, "exchange": enabled}
    assert wf["args"]["max_features_per_site"] == 256
    persistor = next(c for c in server["components"] if c["id"] == "persistor")["args"]
    assert persistor["method"] == "fcl"
    assert persistor["exclude_regex"] == non_federated_regex_of(build("fcl", persistor["method_config"]))
    (ex,) = client["executors"]
    assert ex["tasks"] == ["train", "validate", "submit_model", "extract_features"]
    args = ex["executor"]["args"]
    assert args["handler"] == "fcl" and args["handler_args"]["config"] == persistor["method_config"]
    assert args["handler_args"]["max_features"] == 256 and args["handler_args"]["feature_dtype"] == "float16"


@pytest.mark.parametrize(("overrides", "match"), [
    ({"fcl": {"temperature": -1.0}}, "fcl setting 'temperature'=-1.0: must be > 0"),
    ({"exchange": {"feature_dtype": "int8"}}, "exchange.feature_dtype must be one of"),
    ({"exchange": {"max_features": 0}}, "max_features_per_site must be an int >= 1"),
    ({"fl": {"controller": "fedavg"}}, "needs fl.controller='fcl'"),
])
def test_bad_settings_are_named_when_the_job_is_built(overrides, match):
    with pytest.raises(ValueError, match=match):
        build_job("fcl_pretrain", overrides)
