"""A method defined outside the package (tests/plugins/rotation_method.py) runs through the public registry, the
one executor and the shared handler base, with its state taxonomy on the wire: only ``encoder.*`` leaves the site,
the per-site ``head.*`` stays."""

from __future__ import annotations

import numpy as np
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fl_plugins.engine.method import check_taxonomy
from fl_plugins.flare.executor import HandlerExecutor
from fl_plugins.flare.handler import SiteContext
from fl_plugins.methods import build, method_names

PLUGIN = "tests.plugins.rotation_method"
ARGS = {"method": "rotation", "config": {"image_size": 32, "batch_size": 8}, "steps_per_round": 3, "knn_every": 0}


def test_plugin_registers_and_declares_a_partition():
    import tests.plugins.rotation_method  # noqa: F401

    assert "rotation" in method_names()
    m = build("rotation", {"image_size": 32})
    tax = m.state_taxonomy()
    check_taxonomy(tax, list(m.state_dict()))
    assert tax["site"] == ["head.bias", "head.weight"] and all(k.startswith("encoder.") for k in tax["federated"])


def test_plugin_trains_through_the_executor_and_only_federated_keys_cross(synth_seg_data, tmp_path):
    executor = HandlerExecutor(handler="ssl", handler_args=ARGS, imports=[PLUGIN])
    handler = executor.build_handler(SiteContext("site-1", str(synth_seg_data / "site-1" / "datalist.json"),
                                                 str(tmp_path)))
    assert set(handler.tasks()) == {"train", "validate", "submit_model"}
    fed = {k: v.numpy() for k, v in build("rotation", {"image_size": 32}).federated_state_dict().items()}
    head_before = handler.method.head.weight.detach().clone()
    out = handler.train(FLModel(params=fed, params_type=ParamsType.FULL, current_round=0, total_rounds=2))
    assert set(out.params) == set(fed) and not any(k.startswith("head.") for k in out.params)
    assert all(out.params[k].dtype == np.float32 and out.params[k].shape == fed[k].shape for k in fed)
    assert out.meta["NUM_STEPS_CURRENT_ROUND"] == handler.num_train_items and "ssl_loss" in out.meta
    assert any(not np.array_equal(out.params[k], fed[k]) for k in fed)  # the encoder trained
    assert not np.array_equal(handler.method.head.weight.detach().numpy(), head_before.numpy())  # head trained...
    head_after = handler.method.head.weight.detach().clone()
    # ...and is kept on the site between rounds: loading the next round's global state leaves it as it was
    handler.load_global(FLModel(params=fed, params_type=ParamsType.FULL, current_round=1, total_rounds=2))
    assert np.array_equal(handler.method.head.weight.detach().numpy(), head_after.numpy())
    assert np.array_equal(handler.method.encoder[0].weight.detach().numpy(), fed["encoder.0.weight"])
