"""fl_plugins.settings: ``--set`` parsing (nested, JSON values) and merge_settings (unknown keys, open keys, types)."""

from __future__ import annotations

import pytest

from fl_plugins.settings import merge_settings, parse_set

BASE = {
    "fl": {"num_rounds": 2, "task_request_interval": 0.5, "key_metric": "val_dice", "quantization": None},
    "trainer": {"lr": 1e-3, "batch_size": 4, "augment": True, "crop": [64, 64]},
    "model": {"arch": "vit_seg", "backbone": {"depth": 6}, "pretrained": None},
    "dino": {"batch_size": 16, "backbone": {"depth": 6}},
    "views": {},
    "num_labelled_patients": None,
}
OPEN = {"dino": frozenset({"batch_size", "lr", "backbone", "total_steps"}), "views": frozenset({"blur_sigma"})}


# -- parse_set ---------------------------------------------------------------------------------------------------------
def test_parse_set_nested_json_values():
    assert parse_set(["a.b=1", "a.c=null", "d=x", "e=[1,2]", "f=1e-3", "g=true", 'h="7"', "i=a=b"]) == {
        "a": {"b": 1, "c": None}, "d": "x", "e": [1, 2], "f": 1e-3, "g": True, "h": "7", "i": "a=b"}


def test_parse_set_later_item_wins_and_empty_input():
    assert parse_set(["a.b=1", "a.b=2"]) == {"a": {"b": 2}}
    assert parse_set([]) == {} and parse_set(None) == {}


@pytest.mark.parametrize("item", ["novalue", "=1", "a..b=1", "a.=1"])
def test_parse_set_rejects_a_malformed_item(item):
    with pytest.raises(ValueError, match=r"--set expects key=value"):
        parse_set([item])


def test_parse_set_rejects_a_key_that_is_a_value_and_a_parent():
    with pytest.raises(ValueError, match=r"'a' is also set to a value"):
        parse_set(["a=1", "a.b=2"])
    with pytest.raises(ValueError, match=r"'a' also has sub-settings"):
        parse_set(["a.b=2", "a=1"])


# -- merge_settings ----------------------------------------------------------------------------------------------------
def test_merge_overrides_deep_and_leaves_base_alone():
    out = merge_settings(BASE, parse_set(["trainer.lr=5e-4", "model.backbone.depth=4", "fl.num_rounds=7"]), OPEN)
    assert out["trainer"] == {"lr": 5e-4, "batch_size": 4, "augment": True, "crop": [64, 64]}
    assert out["model"]["backbone"] == {"depth": 4} and out["fl"]["num_rounds"] == 7
    assert BASE["trainer"]["lr"] == 1e-3 and BASE["model"]["backbone"] == {"depth": 6}


def test_string_where_a_number_is_expected_names_setting_value_and_type():
    with pytest.raises(ValueError) as ei:
        merge_settings(BASE, parse_set(["trainer.lr=1e-3x"]), OPEN)
    assert str(ei.value) == "job setting 'trainer.lr' expects a number, got '1e-3x' (str)"


def test_unknown_key_is_named_with_the_known_ones():
    with pytest.raises(ValueError, match=r"^unknown job setting 'trainer\.lrr'; known: \['augment', 'batch_size', "
                                         r"'crop', 'lr'\]$"):
        merge_settings(BASE, {"trainer": {"lrr": 1e-3}}, OPEN)
    with pytest.raises(ValueError, match=r"^unknown job setting 'epochs'; known: \['dino', 'fl', "):
        merge_settings(BASE, {"epochs": 3}, OPEN)
    with pytest.raises(ValueError, match=r"unknown job setting 'dino\.lrr'; known: \[.*'lr'.*'total_steps'\]"):
        merge_settings(BASE, {"dino": {"lrr": 1}}, OPEN)


def test_open_keys_accept_keys_beyond_the_defaults_at_their_path_only():
    out = merge_settings(BASE, parse_set(["dino.lr=5e-4", "dino.total_steps=null", "views.blur_sigma=[0.1,0.5]"]),
                         OPEN)
    assert out["dino"] == {"batch_size": 16, "backbone": {"depth": 6}, "lr": 5e-4, "total_steps": None}
    assert out["views"] == {"blur_sigma": [0.1, 0.5]}
    with pytest.raises(ValueError, match=r"unknown job setting 'views\.lr'"):  # open under dino, not under views
        merge_settings(BASE, {"views": {"lr": 1}}, OPEN)
    with pytest.raises(ValueError, match=r"unknown job setting 'lr'"):  # nor at the top level
        merge_settings(BASE, {"lr": 1}, OPEN)


def test_nested_open_key_keeps_the_type_check_of_its_default_and_recurses():
    out = merge_settings(BASE, parse_set(["dino.backbone.depth=4"]), OPEN)
    assert out["dino"]["backbone"] == {"depth": 4}
    with pytest.raises(ValueError, match=r"^job setting 'dino\.batch_size' expects an integer, got '16x' \(str\)$"):
        merge_settings(BASE, parse_set(["dino.batch_size=16x"]), OPEN)
    with pytest.raises(ValueError, match=r"^job setting 'dino\.backbone\.depth' expects an integer, got 4\.5"):
        merge_settings(BASE, parse_set(["dino.backbone.depth=4.5"]), OPEN)
    with pytest.raises(ValueError, match=r"unknown job setting 'dino\.backbone\.dpth'"):  # no open keys there
        merge_settings(BASE, parse_set(["dino.backbone.dpth=4"]), OPEN)
    # an open key may be reset to None (its config class supplies the default)
    assert merge_settings(BASE, {"dino": {"batch_size": None}}, OPEN)["dino"]["batch_size"] is None


@pytest.mark.parametrize(("item", "message"), [
    ("trainer.augment=1", "job setting 'trainer.augment' expects a boolean (true/false), got 1 (int)"),
    ("trainer.batch_size=true", "job setting 'trainer.batch_size' expects an integer, got True (bool)"),
    ("trainer.lr=false", "job setting 'trainer.lr' expects a number, got False (bool)"),
    ("trainer.batch_size=4.0", "job setting 'trainer.batch_size' expects an integer, got 4.0 (float)"),
    ("fl.key_metric=3", "job setting 'fl.key_metric' expects a string, got 3 (int)"),
    ("trainer.crop=64", "job setting 'trainer.crop' expects a list, got 64 (int)"),
    ("model=unet", "job setting 'model' expects a mapping of settings, got 'unet' (str)"),
    ("trainer.lr=null", "job setting 'trainer.lr' expects a number, got None (NoneType)"),
])
def test_type_mismatches(item, message):
    with pytest.raises(ValueError) as ei:
        merge_settings(BASE, parse_set([item]), OPEN)
    assert str(ei.value) == message


def test_types_that_fit():
    out = merge_settings(BASE, parse_set(["trainer.lr=1", "trainer.augment=false", "fl.task_request_interval=2",
                                          "trainer.crop=[32,32]", "fl.key_metric=val_loss"]), OPEN)
    assert out["trainer"]["lr"] == 1 and out["trainer"]["augment"] is False and out["trainer"]["crop"] == [32, 32]
    assert out["fl"]["task_request_interval"] == 2 and out["fl"]["key_metric"] == "val_loss"
    assert merge_settings(BASE, {"trainer": {"crop": (16, 16)}}, OPEN)["trainer"]["crop"] == (16, 16)


def test_none_defaults_accept_any_value():
    assert merge_settings(BASE, parse_set(["num_labelled_patients=2"]), OPEN)["num_labelled_patients"] == 2
    assert merge_settings(BASE, parse_set(["model.pretrained=/x/dino.pt"]), OPEN)["model"]["pretrained"] == "/x/dino.pt"
    assert merge_settings(BASE, parse_set(["fl.quantization=float16"]), OPEN)["fl"]["quantization"] == "float16"
    assert merge_settings(BASE, {"num_labelled_patients": None}, OPEN)["num_labelled_patients"] is None


def test_where_prefixes_messages_and_selects_open_keys():
    with pytest.raises(ValueError, match=r"^job setting 'dino\.batch_size' expects an integer"):
        merge_settings(BASE["dino"], {"batch_size": "x"}, OPEN, where="dino.")
    assert merge_settings(BASE["dino"], {"lr": 1.0}, OPEN, where="dino")["lr"] == 1.0
