"""What is derived from the JobSpecs (handlers, Recipes, data checks) and what a job does from ``--set`` alone:
iBOT-only and DINO-without-KoLeo are settings of the generic DINO jobs; SimCLR is one more JobSpec."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fl_plugins.flare.handlers import HANDLER_ALIASES, HANDLERS, handler_class
from fl_plugins.flare.jobs import JOBS, build_job, job_names, job_settings
from fl_plugins.flare.jobs.base import CONTROLLERS, DATA_KINDS


def test_every_registered_handler_runs_some_job_and_every_job_a_registered_handler():
    used = {spec.handler for spec in JOBS.values()}
    assert used == set(HANDLERS)  # "dino" is no longer a handler of its own: an alias of old job folders
    assert set(HANDLER_ALIASES) == {"dino"} and HANDLER_ALIASES["dino"][0] == "ssl"


@pytest.mark.parametrize("name", job_names())
def test_each_spec_declares_its_workflow_data_check_and_recipe(name):
    from fl_plugins.flare import recipes

    spec = JOBS[name]
    assert spec.workflow in {*CONTROLLERS, "stagewise"} and spec.data in DATA_KINDS
    assert (spec.dims is not None) == (spec.data == "pretrain")
    cls = getattr(recipes, spec.recipe)  # e.g. fl_plugins.flare.recipes.DinoRecipe
    assert cls is recipes.RECIPES[name] and cls.JOB == name and spec.description in cls.__doc__
    if spec.workflow in CONTROLLERS:
        assert job_settings(name)["fl"]["controller"] == spec.workflow
    if spec.handler == "ssl":
        assert spec.method and spec.section in spec.defaults
    handler_class(spec.handler)  # importable


def _site_handler(job: str, overrides: dict, datalist: Path, tmp: Path):
    """The job's site handler, built from the exported client config's class path and arguments (as a site)."""
    import importlib

    from fl_plugins.flare.handler import SiteContext

    build_job(job, overrides).export_job(str(tmp / "export"))
    cfg = json.loads(next((tmp / "export").rglob("config_fed_client.json")).read_text())
    (entry,) = cfg["executors"]
    mod, _, cls = entry["executor"]["path"].rpartition(".")
    executor = getattr(importlib.import_module(mod), cls)(**entry["executor"]["args"])
    (tmp / "site").mkdir()
    return executor.build_handler(SiteContext("site-1", str(datalist), str(tmp / "site")))


def _global_model(handler):
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

    params = {k: v.detach().numpy().copy() for k, v in handler.method.federated_state_dict().items()}
    return FLModel(params=params, params_type=ParamsType.FULL, current_round=0, total_rounds=2)


@pytest.mark.parametrize(("terms", "present", "absent"), [
    ({"dino_weight": 0.0, "koleo_weight": 0.0}, {"ibot_loss"}, {"dino_loss", "koleo_loss"}),  # iBOT only
    ({"koleo_weight": 0.0}, {"dino_loss", "ibot_loss"}, {"koleo_loss"}),  # DINOv2 without KoLeo
    ({"ibot_weight": 0.0, "koleo_weight": 0.0}, {"dino_loss"}, {"ibot_loss", "koleo_loss"}),  # DINO terms only
])
def test_dino_loss_terms_from_set_alone_train(synth_seg_data, tmp_path, terms, present, absent):
    """``--set dino.dino_weight=0`` etc. on the shipped dinov2 job: the site trains exactly those terms, the loss is
    finite, and the wire carries the iBOT state only when the iBOT term is on."""
    over = {"dino": {**terms, "batch_size": 4, "n_local_crops": 2}, "steps_per_round": 2, "knn_every": 0}
    h = _site_handler("dinov2_pretrain", over, synth_seg_data / "site-1" / "datalist.json", tmp_path)
    assert h.method.config.dino_weight == terms.get("dino_weight", 1.0)
    g = _global_model(h)
    res = h.train(g)
    assert math.isfinite(res.meta["ssl_loss"])
    stats = h.local_train(2)  # the next round's steps: the per-term losses of the last step
    assert present <= set(stats) and not (absent & set(stats)), stats
    keys = set(res.params)
    assert keys == set(g.params)  # every federated key comes back
    assert ("buffers.ibot_center" in keys) == ("ibot_loss" in present)
    assert any(not np.array_equal(res.params[k], g.params[k]) for k in keys if k.startswith("student."))


def test_simclr_job_trains_and_sends_exactly_its_federated_state(synth_seg_data, tmp_path):
    """The simclr_pretrain job (one JobSpec over the registered method): the site sends exactly the method's
    federated keys (encoder and projector; BatchNorm step counters stay), the loss is finite and weights move."""
    over = {"simclr": {"batch_size": 4, "image_size": 32}, "steps_per_round": 2, "knn_every": 0}
    h = _site_handler("simclr_pretrain", over, synth_seg_data / "site-1" / "datalist.json", tmp_path)
    tax = h.method.state_taxonomy()
    g = _global_model(h)
    assert set(g.params) == set(tax["federated"]) and tax["site"] and not set(tax["site"]) & set(g.params)
    assert all(k.startswith(("encoder.", "projector.")) for k in tax["federated"])
    assert all(k.endswith("num_batches_tracked") for k in tax["site"])
    res = h.train(g)
    assert set(res.params) == set(tax["federated"]) and math.isfinite(res.meta["ssl_loss"])
    assert any(not np.array_equal(res.params[k], g.params[k]) for k in res.params)
    server = json.loads(next((tmp_path / "export").rglob("config_fed_server.json")).read_text())
    persistor = next(c for c in server["components"] if c["id"] == "persistor")["args"]
    assert persistor["method"] == "simclr" and persistor["exclude_regex"]  # the server never stores the counters


def test_dino_variant_setting_still_works_as_an_alias_of_the_presets():
    """``--set dino.variant=...`` (settings of job folders before the loss weights) selects the preset over the
    job's defaults; the other given fields win; a bad variant is named."""
    from fl_plugins.methods.dino_config import DINO_PRESET, DINOV2_PRESET

    s = job_settings("dinov2_pretrain", {"dino": {"variant": "dino", "lr": 1e-3}})
    assert {k: s["dino"][k] for k in DINO_PRESET} == DINO_PRESET and s["dino"]["lr"] == 1e-3
    assert "variant" not in s["dino"] and s["dino"]["out_dim"] == 1024  # the job's other defaults stay
    s = job_settings("dino_pretrain", {"dino": {"variant": "dinov2", "koleo_weight": 0.0}})
    assert s["dino"]["ibot_weight"] == DINOV2_PRESET["ibot_weight"] and s["dino"]["koleo_weight"] == 0.0
    build_job("dino_pretrain", {"dino": {"variant": "dinov2"}, "steps_per_round": 1})
    with pytest.raises(ValueError, match=r"variant='dinov3' is not one of \['dino', 'dinov2'\]"):
        job_settings("dino_pretrain", {"dino": {"variant": "dinov3"}})
