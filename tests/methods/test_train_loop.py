"""Local training loop, backbone export (both loaders), k-NN monitor."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

from fl_plugins.engine.export import export_backbone
from fl_plugins.engine.knn import knn_accuracy, knn_predict
from fl_plugins.engine.train_loop import adamw_param_groups, build_optimizer, run_local_steps
from fl_plugins.methods import DINOMethod
from fl_plugins.models.backbone import BackboneCheckpointError, create_backbone, load_backbone_state

from .conftest import TINY_BACKBONE, tiny_config, tiny_views


class _CountingIterator:
    def __init__(self, batch, limit):
        self.batch, self.limit, self.n = batch, limit, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.n >= self.limit:
            raise StopIteration
        self.n += 1
        return self.batch


def test_exact_step_count_and_schedule_from_global_step():
    method = DINOMethod(tiny_config(total_steps=50))
    it = _CountingIterator(tiny_views(), limit=100)
    out = run_local_steps(method, it, build_optimizer(method), num_steps=3, global_step=10)
    assert it.n == 3 and out["num_steps"] == 3 and out["global_step"] == 13
    cfg = method.config
    assert out["lr"] == pytest.approx(cfg.lr_at(12))
    assert out["teacher_momentum"] == pytest.approx(cfg.teacher_momentum_at(12))
    assert out["weight_decay"] == pytest.approx(cfg.weight_decay_at(12))
    assert {"loss", "dino_loss", "teacher_temp", "teacher_entropy", "teacher_mean_entropy", "teacher_mi"} <= set(out)
    assert 0 <= out["teacher_entropy"] <= out["teacher_mean_entropy"] + 1e-6 <= math.log(cfg.out_dim) + 1e-5


def test_reiterable_loader_is_cycled_and_exhausted_iterator_raises():
    method = DINOMethod(tiny_config())
    opt = build_optimizer(method)
    assert run_local_steps(method, [tiny_views()], opt, num_steps=2, global_step=0)["num_steps"] == 2  # list cycled
    with pytest.raises(ValueError, match="ran out after 1 of num_steps=2"):
        run_local_steps(method, _CountingIterator(tiny_views(), limit=1), opt, num_steps=2, global_step=0)


def test_param_groups_no_weight_decay_on_bias_and_1d():
    method = DINOMethod(tiny_config("dinov2"))
    decay, no_decay = adamw_param_groups(method.student)
    names = {id(p): n for n, p in method.student.named_parameters()}
    assert all(p.ndim > 1 and not names[id(p)].endswith(".bias") for p in decay["params"])
    assert all(p.ndim <= 1 or names[id(p)].endswith(".bias") for p in no_decay["params"])
    n_trainable = sum(p.requires_grad for p in method.student.parameters())
    assert len(decay["params"]) + len(no_decay["params"]) == n_trainable
    assert not any(p.requires_grad for p in method.teacher.parameters())
    opt = build_optimizer(method)
    run_local_steps(method, [tiny_views()], opt, 1, 5)
    assert opt.param_groups[1]["weight_decay"] == 0.0
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(method.config.weight_decay_at(5))


@pytest.mark.parametrize("preset,which", [("dino", "teacher"), ("dinov2", "student")])
def test_export_loads_with_project_loader_and_timm(tmp_path, preset, which):
    method = DINOMethod(tiny_config(preset))
    with torch.no_grad():
        for p in method.teacher.parameters():
            p.add_(0.1)  # make teacher and student differ
    path = export_backbone(method, tmp_path / "backbone.pt", which=which)
    expected = {k: v for k, v in getattr(method, which)["backbone"].state_dict().items() if k != "mask_token"}

    ours = create_backbone(TINY_BACKBONE)
    load_backbone_state(ours, path)
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in expected.items())

    spec = TINY_BACKBONE
    model = timm.create_model(
        spec.name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **spec.timm_kwargs()
    )
    assert set(model.state_dict()) == set(expected)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(model.eval()(x), getattr(method, which)["backbone"].eval()(x))


def test_export_does_not_fit_another_architecture(tmp_path):
    path = export_backbone(DINOMethod(tiny_config()), tmp_path / "b.pt")
    with pytest.raises(BackboneCheckpointError, match="missing"):
        load_backbone_state(create_backbone(TINY_BACKBONE.__class__(img_size=32, patch_size=8, depth=3)), path)


def test_knn_predict_weighted_vote_by_hand():
    train = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), dim=1)
    labels = torch.tensor([0, 0, 1])
    query = torch.nn.functional.normalize(torch.tensor([[0.2, 1.0]]), dim=1)
    # k=1: the nearest is class 1; k=3 with T=1: two class-0 votes outweigh one class-1 vote
    assert knn_predict(train, labels, query, k=1).tolist() == [1]
    sims = query @ train.t()
    votes0, votes1 = sims[0, :2].exp().sum(), sims[0, 2].exp()
    assert knn_predict(train, labels, query, k=3, temperature=1.0).tolist() == [int(votes1 > votes0)]


class _MeanIntensity(nn.Module):
    """Feature = (mean, 1): separates bright from dark images by cosine angle."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([m, torch.ones_like(m)], dim=1)


def test_knn_accuracy_on_separable_items_and_real_backbone_runs():
    g = torch.Generator().manual_seed(0)

    def items(n):
        return [{"image": torch.rand(1, 32, 32, generator=g) + 3.0 * (i % 2), "label": i % 2} for i in range(n)]

    train, val = items(30), items(10)
    assert knn_accuracy(_MeanIntensity(), train, val, k=5) == 1.0
    backbone = create_backbone(TINY_BACKBONE).train()
    acc = knn_accuracy(backbone, train, val, batch_size=8)
    assert 0.0 <= acc <= 1.0 and backbone.training  # mode restored
    with pytest.raises(ValueError, match="labelled"):
        knn_accuracy(backbone, [{"image": torch.rand(1, 32, 32)}], val)
