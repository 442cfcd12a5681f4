"""The ``ssl`` handler of method ``dino`` driven with FLModel objects: exact key sets and shapes each way per
federation mode, meta, the k-NN monitor, export to the fine-tuning job, bad inputs; the non-federated keys of each
mode from the method's taxonomy; the ``"dino"`` handler alias of old job folders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fl_plugins import methods
from fl_plugins.data import position_partition
from fl_plugins.flare.handler import SiteContext
from fl_plugins.flare.handlers import handler_class, handler_names
from fl_plugins.flare.jobs.base import non_federated_regex_of
from fl_plugins.flare.ssl_handler import SSLHandler
from fl_plugins.methods.dino_config import DINO_PRESET, DINOV2_PRESET, DINOConfig
from fl_plugins.models.factory import build_model

TINY = {"backbone": {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "depth": 2},
        "batch_size": 8, "out_dim": 64, "hidden_dim": 64, "bottleneck_dim": 32, "local_crop_size": 16,
        "n_local_crops": 2}
PRESETS = {"dino": DINO_PRESET, "dinov2": DINOV2_PRESET}
#: the persistor's exclusion per mode before the taxonomy had one home (MODE_EXCLUDE_REGEX of ssl_handler)
OLD_MODE_EXCLUDE_REGEX = {"A": None, "B": r"^(teacher\.|buffers\.)", "C": r"^(student\.|buffers\.)"}


def _dino_handler(site, config, **kwargs):
    """A dino job's site handler, as the job layer writes it: the generic one of method "dino" on 2D images."""
    return SSLHandler(site, method="dino", config={"total_steps": None, **config}, spatial_dims=2, **kwargs)


def _handler(datalist, tmp_path, logged=None, preset=None, **cfg):
    logged = [] if logged is None else logged
    site = SiteContext("site-1", str(datalist), str(tmp_path), lambda t, v, s: logged.append((t, v, s)))
    return _dino_handler(site, dict(TINY, **PRESETS.get(preset, {}), **cfg), steps_per_round=2, total_rounds=3,
                         knn_max_items=64)


def _global(cfg: dict, rnd: int = 0) -> FLModel:
    m = methods.build("dino", dict(TINY, total_steps=6, **cfg))
    return FLModel(params={k: v.numpy() for k, v in m.federated_state_dict().items()}, params_type=ParamsType.FULL,
                   current_round=rnd, total_rounds=3)


@pytest.mark.parametrize("preset,mode,prefixes", [
    ("dino", "A", {"student.", "teacher.", "buffers."}),
    ("dino", "B", {"student."}),
    ("dino", "C", {"teacher."}),
    ("dinov2", "A", {"student.", "teacher.", "buffers."}),
])
def test_wire_key_sets_per_mode(synth_seg_data, tmp_path, preset, mode, prefixes):
    logged: list = []
    h = _handler(synth_seg_data / "site-1" / "datalist.json", tmp_path, logged, preset=preset,
                 federation_mode=mode)
    g = _global({**PRESETS[preset], "federation_mode": mode})
    assert {k.split(".")[0] + "." for k in g.params} == prefixes  # server -> client
    out = h.train(g)
    assert set(out.params) == set(g.params)  # client -> server: exactly the same keys
    for k, v in out.params.items():
        assert v.shape == g.params[k].shape and v.dtype == np.float32, k
    # the persistor's exclude regex (from the method's taxonomy) removes exactly the non-federated keys
    full = methods.build("dino", dict(TINY, total_steps=6, **PRESETS[preset], federation_mode=mode))
    import re

    rx = non_federated_regex_of(full)
    kept = {k for k in full.state_dict() if not (rx and re.search(rx, k))}
    assert kept == set(g.params)
    assert out.meta["NUM_STEPS_CURRENT_ROUND"] == h.num_train_items
    assert set(out.metrics) == {"knn_accuracy"} and 0.0 <= out.metrics["knn_accuracy"] <= 1.0
    tags = {t for t, _, _ in logged}
    assert {"knn_accuracy", "ssl/loss", "ssl/dino_loss", "ssl/lr", "ssl/teacher_temp", "round_seconds"} <= tags
    if preset == "dinov2":
        assert {"ssl/ibot_loss", "ssl/koleo_loss"} <= tags


def test_round_uses_server_global_step(synth_seg_data, tmp_path):
    logged: list = []
    h = _handler(synth_seg_data / "site-1" / "datalist.json", tmp_path, logged)
    h.train(_global({}, rnd=2))
    steps = [v for t, v, _ in logged if t == "ssl/global_step"]
    assert steps == [6.0]  # rounds 0..1 were 2 steps each: this round ran global steps 4 and 5, next starts at 6


def test_validate_sends_no_weights(synth_seg_data, tmp_path):
    out = _handler(synth_seg_data / "site-1" / "datalist.json", tmp_path).validate(_global({}))
    assert out.params == {} and set(out.metrics) == {"knn_accuracy"}


@pytest.mark.parametrize("i,d,expected", [(0, 12, 0), (2, 12, 0), (3, 12, 1), (11, 12, 3), (5, 6, 2), (4, 6, 2), (8, 9, 3),
                                          (1, 6, 0), (17, 18, 3), (9, 18, 1)])
def test_position_partition_matches_spec_formula(i, d, expected):
    # part = round_half_up(D / 4); partition = min(i // part, 3)   (methods-spec 7.2)
    assert position_partition(i, d) == expected


@pytest.mark.parametrize("cfg,match", [
    ({"backbone": dict(TINY["backbone"], name="vit_unknown_model")}, "vit_unknown_model"),
    ({"local_crop_size": 12}, "local_crop_size=12"),
    ({"out_dim": 4}, "out_dim"),
    ({**DINOV2_PRESET, "batch_size": 1}, "batch_size"),
    ({"dino_weight": 0.0}, "dino_weight=0.0 and ibot_weight=0.0"),
    ({"no_such_knob": 1}, "no_such_knob"),
])
def test_bad_settings_are_named(synth_seg_data, tmp_path, cfg, match):
    with pytest.raises(ValueError, match=match):
        _handler(synth_seg_data / "site-1" / "datalist.json", tmp_path, **cfg)


def test_exported_teacher_backbone_feeds_vit_finetuning(synth_seg_data, tmp_path):
    from fl_plugins.engine.export import export_backbone

    h = _handler(synth_seg_data / "site-1" / "datalist.json", tmp_path)
    h.train(_global({}))
    path = export_backbone(h.method, tmp_path / "backbone.pt")
    seg = build_model({"arch": "vit_seg", "num_classes": 3, "backbone": TINY["backbone"], "pretrained": str(path)})
    teacher = h.method.teacher["backbone"].state_dict()
    for k, v in seg.backbone.state_dict().items():
        assert torch.equal(v, teacher[k]), k


def test_sites_draw_different_masks(synth_seg_data, tmp_path):
    a = _handler(synth_seg_data / "site-1" / "datalist.json", tmp_path, preset="dinov2")
    b = _dino_handler(SiteContext("site-2", str(synth_seg_data / "site-2" / "datalist.json"), str(tmp_path)),
                      dict(TINY, **DINOV2_PRESET), steps_per_round=2, total_rounds=3, knn_every=0)
    assert a.method.config.seed != b.method.config.seed
    assert not torch.equal(a.method.sample_masks(16, 5), b.method.sample_masks(16, 5))


def test_view_settings_shape_the_training_views(synth_seg_data, tmp_path):
    """The executor's ``views`` argument reaches the site's multi-crop transform; the crop sizes stay the method's."""
    site = SiteContext("site-1", str(synth_seg_data / "site-1" / "datalist.json"), str(tmp_path))
    h = _dino_handler(site, dict(TINY), steps_per_round=2, total_rounds=3, knn_every=0,
                      views={"intensity_prob": 0.0, "blur_sigma": [0.05, 0.6]})
    cfg = h.loader.dataset.transform.config
    assert (cfg.intensity_prob, cfg.blur_sigma) == (0.0, (0.05, 0.6))
    assert (cfg.global_crop_size, cfg.local_crop_size, cfg.n_local_crops, cfg.patch_size) == (32, 16, 2, 8)
    assert [tuple(v.shape[1:]) for v in next(iter(h.loader))] == [(1, 32, 32)] * 2 + [(1, 16, 16)] * 2
    with pytest.raises(ValueError, match=r"unknown view setting 'jitter'"):
        _dino_handler(site, dict(TINY), steps_per_round=2, total_rounds=3, knn_every=0, views={"jitter": 0.4})
    # the crop scales: the method's (its preset's), a view setting of the same name over them
    h2 = _dino_handler(site, dict(TINY, **DINOV2_PRESET), steps_per_round=2, total_rounds=3, knn_every=0)
    assert h2.loader.dataset.transform.config.global_crop_scale == (0.32, 1.0)
    h3 = _dino_handler(site, dict(TINY, **DINOV2_PRESET), steps_per_round=2, total_rounds=3, knn_every=0,
                       views={"global_crop_scale": [0.5, 1.0]})
    assert h3.loader.dataset.transform.config.global_crop_scale == (0.5, 1.0)


@pytest.mark.parametrize("mode,teacher_init", [("A", "copy_global"), ("B", "copy_global"), ("B", "keep_local"),
                                               ("C", "copy_global")])
@pytest.mark.parametrize("preset", ["default", "dino", "dinov2"])
def test_non_federated_keys_from_the_taxonomy_match_the_old_mode_regex(preset, mode, teacher_init):
    """The job layer's exclusion (the method's own taxonomy) is the one MODE_EXCLUDE_REGEX gave, per mode; the
    handler module no longer holds a copy of the taxonomy."""
    import re

    from fl_plugins.flare import ssl_handler

    full = methods.build("dino", dict(TINY, total_steps=6, **PRESETS.get(preset, {}), federation_mode=mode,
                                      teacher_init=teacher_init))
    keys = set(full.state_dict())

    def excluded(rx):
        return {k for k in keys if rx and re.search(rx, k)}

    old = excluded(OLD_MODE_EXCLUDE_REGEX[mode])
    assert (old == set()) is (mode == "A")
    assert excluded(non_federated_regex_of(full)) == old
    assert not hasattr(ssl_handler, "MODE_EXCLUDE_REGEX")


OLD_ARGS = {"dino": dict(TINY, variant="dinov2", federation_mode="B"), "steps_per_round": 2, "total_rounds": 3,
            "knn_every": 0, "knn_max_items": 64, "views": {"intensity_prob": 0.0}}


def test_old_dino_handler_args_build_the_ssl_handler_of_method_dino(synth_seg_data, tmp_path):
    """Compatibility path: an exported job folder naming handler "dino" with the old DinoHandler arguments runs the
    generic handler of method "dino" with the same config (the variant alias included), through the executor."""
    from fl_plugins.flare.executor import HandlerExecutor

    site = SiteContext("site-1", str(synth_seg_data / "site-1" / "datalist.json"), str(tmp_path))
    old = HandlerExecutor(handler="dino", handler_args=OLD_ARGS).build_handler(site)
    new = _dino_handler(site, dict(TINY, **DINOV2_PRESET, federation_mode="B"), steps_per_round=2, total_rounds=3,
                        knn_every=0, knn_max_items=64, views={"intensity_prob": 0.0})
    assert type(old) is SSLHandler and "dino" in handler_names()
    assert old.method.config == new.method.config
    assert old.method.config == DINOConfig.from_dict({**DINOV2_PRESET, **TINY, "federation_mode": "B",
                                                      "total_steps": 6, "seed": old.seed})
    assert old.loader.dataset.transform.config == new.loader.dataset.transform.config
    assert (old.steps_per_round, old.knn_every) == (2, 0)
    assert set(old.method.federated_state_dict()) == set(new.method.federated_state_dict())
    assert handler_class("dino").TASKS == SSLHandler.TASKS


@pytest.mark.parametrize("args,match", [
    ({**OLD_ARGS, "method": "mae"}, r"task handler 'dino' \(alias of 'ssl' with method 'dino'\): unknown "
                                    r"argument\(s\) \['method'\]"),
    ({k: v for k, v in OLD_ARGS.items() if k != "dino"}, "needs the argument 'dino'"),
    ({**OLD_ARGS, "dino": dict(TINY, variant="dinov3")}, "variant='dinov3' is not one of"),
])
def test_old_dino_handler_args_bad_inputs_are_named(synth_seg_data, tmp_path, args, match):
    site = SiteContext("site-1", str(synth_seg_data / "site-1" / "datalist.json"), str(tmp_path))
    with pytest.raises(ValueError, match=match):
        handler_class("dino")(site, **args)
