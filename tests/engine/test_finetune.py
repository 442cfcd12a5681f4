"""FinetuneTrainer / FinetuneConfig: learning, exact step counts, federated key set, strict state loading.

Datasets are tiny in-memory lists of contract items (dicts of tensors), independent of ``fl_plugins.data``.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from fl_plugins.engine.finetune import (
    FinetuneConfig,
    FinetuneTrainer,
    evaluate_checkpoint,
    federated_keys,
    non_federated_regex,
)
from fl_plugins.models import build_model

S = 32
SMALL_UNET = {"arch": "unet", "num_classes": 2, "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}
TINY_VIT = {"img_size": S, "patch_size": 8, "depth": 2}


def disk_slices(n_volumes: int = 2, n_slices: int = 4, seed: int = 0) -> list[dict]:
    """Bright disk (class 1) on noise; 2D slice items of the data contract."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    items = []
    for v in range(n_volumes):
        for s in range(n_slices):
            cy, cx = (torch.randint(10, S - 10, (2,), generator=g)).tolist()
            r = 4 + int(torch.randint(0, 5, (1,), generator=g))
            label = (((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r).long()
            image = (0.3 * torch.randn(S, S, generator=g) + label.float()).unsqueeze(0)
            items.append({"image": image, "label": label, "volume_id": f"vol{v}", "slice_index": s,
                          "num_slices": n_slices})
    return items


def class_images(n: int = 12, seed: int = 0) -> list[dict]:
    """Left-half vs right-half bright images (classification items)."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        img = 0.1 * torch.randn(1, S, S, generator=g)
        img[..., (i % 2) * (S // 2):(i % 2 + 1) * (S // 2)] += 1.0
        items.append({"image": img, "label": torch.tensor(i % 2)})
    return items


def seg_config(**kw) -> FinetuneConfig:
    d = {"model": SMALL_UNET, "task": "segmentation", "batch_size": 4, "lr": 3e-3, "seed": 0}
    d.update(kw)
    return FinetuneConfig.from_dict(d)


def test_unet_loss_goes_down_on_learnable_task() -> None:
    tr = FinetuneTrainer(seg_config(), disk_slices(), disk_slices(1, 4, seed=1))
    losses = [tr.train_steps(10, global_step=10 * r)["loss"] for r in range(3)]
    assert losses[2] < 0.8 * losses[0], losses
    assert tr.evaluate()["dice"] > 0.3


def test_train_steps_runs_exactly_n_optimizer_steps() -> None:
    tr = FinetuneTrainer(seg_config(batch_size=3), disk_slices(1, 4))  # 4 items, batch 3 -> cycles every step
    calls = []
    tr.optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append(1))
    out = tr.train_steps(7, global_step=0)
    assert len(calls) == 7 and out["steps"] == 7 and tr.total_local_steps == 7
    assert out["num_samples"] == 7 * 3 and math.isfinite(out["loss"])
    tr.train_steps(2, global_step=7)
    assert len(calls) == 9


def test_train_steps_uses_schedule_of_global_step() -> None:
    tr = FinetuneTrainer(seg_config(total_steps=10, lr=1e-3, min_lr_ratio=0.1), disk_slices(1, 4))
    lrs = []
    tr.optimizer.register_step_pre_hook(lambda opt, a, k: lrs.append(opt.param_groups[0]["lr"]))
    out = tr.train_steps(3, global_step=5)
    assert lrs == pytest.approx([tr.config.lr_at(s) for s in (5, 6, 7)]) and out["lr"] == lrs[-1]


def test_training_is_deterministic_per_seed_and_global_step() -> None:
    a = FinetuneTrainer(seg_config(), disk_slices(1, 4))
    b = FinetuneTrainer(seg_config(), disk_slices(1, 4))
    a.train_steps(3, global_step=4)
    b.train_steps(3, global_step=4)
    sa, sb = a.federated_state(), b.federated_state()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_unet_federated_key_set_is_exact() -> None:
    tr = FinetuneTrainer(seg_config(), disk_slices(1, 2))
    keys = list(tr.federated_state())
    params = [n for n, p in tr.model.named_parameters() if p.requires_grad]
    stats = [k for k in tr.model.state_dict() if k.endswith(("running_mean", "running_var"))]
    assert stats, "the U-Net has BatchNorm layers"
    assert set(keys) == set(params) | set(stats) and len(keys) == len(params) + len(stats)
    assert not any("num_batches_tracked" in k for k in keys)
    assert keys == [k for k in tr.model.state_dict() if k in set(keys)]  # state_dict order
    assert non_federated_regex(tr.model) == r"(^|\.)num_batches_tracked$"


def test_vit_seg_federated_keys_are_all_parameters() -> None:
    model = build_model({"arch": "vit_seg", "num_classes": 2, "backbone": TINY_VIT})
    keys = federated_keys(model)
    assert keys == list(model.state_dict()) == [n for n, _ in model.named_parameters()]
    assert non_federated_regex(model) is None


def test_frozen_backbone_is_not_federated() -> None:
    model = build_model({"arch": "vit_classifier", "num_classes": 2, "backbone": TINY_VIT, "freeze_backbone": True})
    assert federated_keys(model) == ["head.weight", "head.bias"]
    pattern = non_federated_regex(model)
    assert pattern == r"^backbone\."
    assert {k for k in model.state_dict() if re.search(pattern, k)} == {
        k for k in model.state_dict() if k.startswith("backbone.")
    }


def test_load_federated_state_round_trip_is_bit_identical_and_in_place() -> None:
    src = FinetuneTrainer(seg_config(seed=1), disk_slices(1, 4))
    src.train_steps(2, global_step=0)  # moves parameters and BN running stats
    dst = FinetuneTrainer(seg_config(seed=2), disk_slices(1, 4))
    params_before = [id(p) for g in dst.optimizer.param_groups for p in g["params"]]
    wire = {k: v.numpy().astype(np.float32) for k, v in src.federated_state().items()}  # as on the FLARE wire
    dst.load_federated_state(wire)
    got, want = dst.federated_state(), src.federated_state()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert [id(p) for p in dst.model.parameters() if p.requires_grad] == params_before  # optimizer still valid
    x = torch.stack([it["image"] for it in disk_slices(1, 2)])
    src.model.eval(), dst.model.eval()
    with torch.no_grad():
        assert torch.equal(src.model(x), dst.model(x))


def test_federated_state_is_a_copy() -> None:
    tr = FinetuneTrainer(seg_config(), disk_slices(1, 2))
    sd = tr.federated_state()
    k = next(iter(sd))
    sd[k].add_(1.0)
    assert not torch.equal(tr.federated_state()[k], sd[k])


@pytest.mark.parametrize("how", ["missing", "unexpected", "site_local", "shape", "nan"])
def test_load_federated_state_is_strict(how: str) -> None:
    tr = FinetuneTrainer(seg_config(), disk_slices(1, 2))
    sd = tr.federated_state()
    key = next(k for k in sd if k.endswith("running_mean"))
    if how == "missing":
        sd.pop(key)
        named = key
    elif how == "unexpected":
        sd["decoder.extra.weight"] = torch.zeros(1)
        named = "decoder.extra.weight"
    elif how == "site_local":
        named = key.replace("running_mean", "num_batches_tracked")
        sd[named] = torch.tensor(0)
    elif how == "shape":
        sd[key] = torch.zeros(sd[key].numel() + 1)
        named = key
    else:
        sd[key] = torch.full_like(sd[key], float("nan"))
        named = key
    before = tr.federated_state()
    with pytest.raises(ValueError) as e:
        tr.load_federated_state(sd)
    assert named in str(e.value)
    if how == "site_local":
        assert "exclude_vars" in str(e.value)
    after = tr.federated_state()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing half-loaded


def test_evaluate_checkpoint_matches_trainer(tmp_path) -> None:
    val = disk_slices(2, 3, seed=3)
    tr = FinetuneTrainer(seg_config(), disk_slices(1, 4), val)
    tr.train_steps(5, global_step=0)
    ref = tr.evaluate()
    path = tmp_path / "model.pt"
    torch.save({"model": tr.model.state_dict()}, path)  # full state_dict, as a server persistor stores it
    full = torch.load(path, weights_only=True)["model"]
    for state in (full, tr.federated_state()):
        res = evaluate_checkpoint(SMALL_UNET, state, val, "segmentation", batch_size=4)
        assert res["dice"] == pytest.approx(ref["dice"]) and res["num_volumes"] == 2
        assert set(res["per_volume"]) == {"vol0", "vol1"}
    bad = dict(full)
    bad.pop(next(iter(tr.federated_state())))
    with pytest.raises(ValueError, match="missing"):
        evaluate_checkpoint(SMALL_UNET, bad, val, "segmentation")


def test_vit_classification_train_and_evaluate() -> None:
    cfg = FinetuneConfig.from_dict({
        "model": {"arch": "vit_classifier", "num_classes": 2, "backbone": TINY_VIT},
        "task": "classification", "batch_size": 4, "lr": 1e-3,
    })
    tr = FinetuneTrainer(cfg, class_images(), class_images(6, seed=1))
    out = tr.train_steps(3, global_step=0)
    assert out["num_samples"] == 12 and math.isfinite(out["loss"])
    res = tr.evaluate()
    assert set(res) == {"accuracy", "balanced_accuracy", "auc"} and 0.0 <= res["accuracy"] <= 1.0


def test_vit_segmentation_smoke() -> None:
    cfg = seg_config(model={"arch": "vit_seg", "num_classes": 2, "backbone": TINY_VIT}, grad_clip=1.0)
    tr = FinetuneTrainer(cfg, disk_slices(1, 4), disk_slices(1, 2, seed=1))
    assert math.isfinite(tr.train_steps(2, global_step=0)["loss"])
    res = tr.evaluate()
    assert set(res) == {"dice", "dice_per_class"} and len(res["dice_per_class"]) == 1


def test_evaluate_without_data_returns_empty() -> None:
    assert FinetuneTrainer(seg_config(), disk_slices(1, 2)).evaluate() == {}


def test_training_items_need_labels() -> None:
    items = [{k: v for k, v in it.items() if k != "label"} for it in disk_slices(1, 4)]
    with pytest.raises(ValueError, match="label"):
        FinetuneTrainer(seg_config(), items).train_steps(1, global_step=0)


def test_out_of_range_labels_are_rejected() -> None:
    items = disk_slices(1, 4)
    items[0]["label"] = items[0]["label"] * 5
    tr = FinetuneTrainer(seg_config(batch_size=4), items)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tr.train_steps(1, global_step=0)


@pytest.mark.parametrize(
    ("d", "named"),
    [
        ({"model": SMALL_UNET, "learning_rate": 1e-3}, "learning_rate"),
        ({"model": SMALL_UNET, "lr": 1e-3, "epochs": 3, "bs": 2}, "bs"),
        ({"lr": 1e-3}, "model"),
        ({"model": SMALL_UNET, "task": "classification"}, "task"),
        ({"model": SMALL_UNET, "task": "detection"}, "task"),
        ({"model": SMALL_UNET, "batch_size": 0}, "batch_size"),
        ({"model": SMALL_UNET, "optimizer": "lamb"}, "optimizer"),
        ({"model": SMALL_UNET, "warmup_steps": 5, "total_steps": 3}, "total_steps"),
    ],
)
def test_config_from_dict_rejects_bad_settings(d: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        FinetuneConfig.from_dict(d)


def test_config_from_dict_names_missing_model_and_copies_it() -> None:
    with pytest.raises(ValueError, match=r"^fine-tuning settings need 'model' \(a build_model config dict\)$"):
        FinetuneConfig.from_dict({"lr": 1e-3})
    with pytest.raises(ValueError, match=r"^unknown fine-tuning setting\(s\) \['bs'\]; known: \['aug_flip', "):
        FinetuneConfig.from_dict({"bs": 2})  # unknown keys are named before a missing model
    model = {"arch": "unet", "num_classes": 3, "channels": [4, 8]}
    cfg = FinetuneConfig.from_dict({"model": model})
    model["channels"].append(16)  # the caller's (job's) dict is not aliased, nested lists included
    assert cfg.model == {"arch": "unet", "num_classes": 3, "channels": [4, 8]}


def test_config_round_trip() -> None:
    cfg = seg_config(total_steps=40, warmup_steps=2)
    assert FinetuneConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(AttributeError):
        cfg.lr = 1.0  # type: ignore[misc]  # frozen


def test_balanced_class_weights_by_hand_and_errors():
    from fl_plugins.engine.finetune import FinetuneConfig, balanced_class_weights

    w = balanced_class_weights([0, 0, 0, 1], 2)  # n=4, K=2: 4/(2*3), 4/(2*1)
    assert torch.allclose(w, torch.tensor([2 / 3, 2.0]))
    assert torch.allclose(balanced_class_weights([0, 0, 2], 3), torch.tensor([0.75, 0.0, 1.5]))  # absent class: 0
    with pytest.raises(ValueError, match="needs labelled training items"):
        balanced_class_weights([], 2)
    with pytest.raises(ValueError, match="class_weighting"):
        FinetuneConfig.from_dict({"task": "segmentation", "model": {"arch": "unet", "num_classes": 3},
                                  "class_weighting": "balanced"})
    with pytest.raises(ValueError, match="class_weighting"):
        FinetuneConfig.from_dict({"task": "classification", "model": {"arch": "cnn_classifier", "num_classes": 2},
                                  "class_weighting": "inverse"})
