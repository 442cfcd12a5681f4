"""The variant alias reproduces the pre-change resolution: ``DINOConfig.from_dict({"variant": v, **x})`` resolves
every setting, the training views and the state taxonomy as the tree did when ``variant`` was a field.

``dino_variant_pins.json`` was written from that tree (its ``_source`` names the commit) for DINO and DINOv2 over
job-like, tiny, explicit-value, explicit-null and mode B/C configs; it must never change.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from fl_plugins.methods.dino_config import DINOConfig

PINS = json.loads(Path(__file__).with_name("dino_variant_pins.json").read_text())
CASES = sorted(PINS["cases"])
#: a dinov2 config with ibot_weight=0 had a mask token and an iBOT centre that nothing used; now iBOT state exists
#: iff ibot_weight > 0 (the only intended difference from the pinned tree)
IBOT_KEYS = {"student.backbone.mask_token", "teacher.backbone.mask_token", "buffers.ibot_center"}


@pytest.mark.parametrize("case", CASES)
def test_variant_alias_resolves_as_before(case):
    pin = PINS["cases"][case]
    variant = case.split("/")[0]
    cfg = DINOConfig.from_dict({"variant": variant, **pin["input"]})
    resolved = cfg.to_dict()
    assert {k: resolved[k] for k in pin["resolved"]} == pin["resolved"]
    for name, settings in PINS["views_settings"].items():
        assert json.loads(json.dumps(dataclasses.asdict(cfg.training_views(settings)))) == pin["views"][name], name
    if "taxonomy" in pin:
        from fl_plugins.methods.dino import DINOMethod

        expected = pin["taxonomy"]
        if variant == "dinov2" and cfg.ibot_weight == 0:
            expected = {k: [x for x in v if x not in IBOT_KEYS] for k, v in expected.items()}
        assert DINOMethod(cfg).state_taxonomy() == expected
