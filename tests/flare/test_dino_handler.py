"""DinoHandler driven with FLModel objects: exact key sets and shapes each way per federation mode, meta, the
k-NN monitor, export to the fine-tuning job, and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fl_plugins import methods
from fl_plugins.data import position_partition
from fl_plugins.flare.handler import SiteContext
from fl_plugins.flare.ssl_handler import MODE_EXCLUDE_REGEX, DinoHandler
from fl_plugins.models.factory import build_model

TINY = {"backbone": {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "depth": 2},
        "batch_size": 8, "out_dim": 64, "hidden_dim": 64, "bottleneck_dim": 32, "local_crop_size": 16,
        "n_local_crops": 2}


def _handler(datalist, tmp_path, logged=None, **cfg):
    logged = [] if logged is None else logged
    site = SiteContext("site-1", str(datalist), str(tmp_path), lambda t, v, s: logged.append((t, v, s)))
    return DinoHandler(site, dict(TINY, **cfg), steps_per_round=2, total_rounds=3, knn_max_items=64)


def _global(cfg: dict, rnd: int = 0) -> FLModel:
    m = methods.build("dino", dict(TINY, total_steps=6, **cfg))
    return FLModel(params={k: v.numpy() for k, v in m.federated_state_dict().items()}, params_type=ParamsType.FULL,
                   current_round=rnd, total_rounds=3)


@pytest.mark.parametrize("variant,mode,prefixes", [
    ("dino", "A", {"student.", "teacher.", "buffers."}),
    ("dino", "B", {"student."}),
    ("dino", "C", {"teacher."}),
    ("dinov2", "A", {"student.", "teacher.", "buffers."}),
])
def test_wire_key_sets_per_mode(synth_seg_data, tmp_path, variant, mode, prefixes):
    logged: list = []
    h = _handler(synth_seg_data / "site-1" / "datalist.json", tmp_path, logged, variant=variant,
                 federation_mode=mode)
    g = _global({"variant": variant, "federation_mode": mode})
    assert {k.split(".")[0] + "." for k in g.params} == prefixes  # server -> client
    out = h.train(g)
    assert set(out.params) == set(g.params)  # client -> server: exactly the same keys
    for k, v in out.params.items():
        assert v.shape == g.params[k].shape and v.dtype == np.float32, k
    # the persistor's exclude regex for this mode removes exactly the non-federated keys of the full model
    full = methods.build("dino", dict(TINY, total_steps=6, variant=variant, federation_mode=mode))
    import re

    rx = MODE_EXCLUDE_REGEX[mode]
    kept = {k for k in full.state_dict() if not (rx and re.search(rx, k))}
    assert kept == set(g.params)
    assert out.meta["NUM_STEPS_CURRENT_ROUND"] == h.num_train_items
    assert set(out.metrics) == {"knn_accuracy"} and 0.0 <= out.metrics["knn_accuracy"] <= 1.0
    tags = {t for t, _, _ in logged}
    assert {"knn_accuracy", "ssl/loss", "ssl/dino_loss", "ssl/lr", "ssl/teacher_temp", "round_seconds"} <= tags
    if variant == "dinov2":
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
    ({"variant": "dinov2", "batch_size": 1}, "batch_size"),
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
    a = _handler(synth_seg_data / "site-1" / "datalist.json", tmp_path, variant="dinov2")
    b = DinoHandler(SiteContext("site-2", str(synth_seg_data / "site-2" / "datalist.json"), str(tmp_path)),
                    dict(TINY, variant="dinov2"), steps_per_round=2, total_rounds=3, knn_every=0)
    assert a.config.seed != b.config.seed
    assert not torch.equal(a.method.sample_masks(16, 5), b.method.sample_masks(16, 5))


def test_view_settings_shape_the_training_views(synth_seg_data, tmp_path):
    """The executor's ``views`` argument reaches the site's multi-crop transform; the crop sizes stay the method's."""
    site = SiteContext("site-1", str(synth_seg_data / "site-1" / "datalist.json"), str(tmp_path))
    h = DinoHandler(site, dict(TINY), steps_per_round=2, total_rounds=3, knn_every=0,
                    views={"intensity_prob": 0.0, "blur_sigma": [0.05, 0.6]})
    cfg = h.loader.dataset.transform.config
    assert (cfg.intensity_prob, cfg.blur_sigma) == (0.0, (0.05, 0.6))
    assert (cfg.global_crop_size, cfg.local_crop_size, cfg.n_local_crops, cfg.patch_size) == (32, 16, 2, 8)
    assert [tuple(v.shape[1:]) for v in next(iter(h.loader))] == [(1, 32, 32)] * 2 + [(1, 16, 16)] * 2
    with pytest.raises(ValueError, match=r"unknown view setting views\.jitter"):
        DinoHandler(site, dict(TINY), steps_per_round=2, total_rounds=3, knn_every=0, views={"jitter": 0.4})
