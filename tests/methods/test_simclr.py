"""SimCLR (fl_plugins.methods.simclr) and its two-view augmentation (fl_plugins.data.pair_views): the loss against
lightly's NTXentLoss and the paper's NT-Xent, gradients, training, the state taxonomy, the export into the
finetune_seg_unet U-Net, the ViT option, the views, setting errors. Tiny U-Net encoder / ViT at 32 px unless the
default network is the point."""

from __future__ import annotations

import math

import pytest
import torch
from lightly.loss import NTXentLoss

from fl_plugins.core.schedules import cosine_with_warmup
from fl_plugins.data.pair_views import PairViewTransform, pair_collate, pair_view_config
from fl_plugins.engine.export import export_backbone
from fl_plugins.engine.method import check_taxonomy
from fl_plugins.methods import build, get_spec
from fl_plugins.methods.simclr import SimCLRConfig, SimCLRMethod
from fl_plugins.models.factory import build_model

TINY_UNET = {"kind": "unet_encoder", "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}
TINY_VIT = {"kind": "vit", "img_size": 32, "patch_size": 8, "depth": 1, "in_chans": 1}
BACKBONES = {"unet_encoder": TINY_UNET, "vit": TINY_VIT}


def make(kind: str = "unet_encoder", **overrides) -> SimCLRMethod:
    return build("simclr", {"backbone": dict(BACKBONES[kind]), "image_size": 32, "proj_hidden_dim": 16,
                            "proj_dim": 8, **overrides})


def pair_batch(b: int = 6, size: int = 32, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 1, size, size, generator=g)
    return {"view1": x + 0.1 * torch.randn(x.shape, generator=g), "view2": x + 0.1 * torch.randn(x.shape, generator=g)}


def nt_xent_by_hand(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """The SimCLR paper's eq. (1) averaged over all 2N anchors, as a loop: -log exp(s_ij/t) / sum_{k != i} exp(s_ik/t)."""
    z = torch.nn.functional.normalize(torch.cat([z1, z2]).double(), dim=1)
    n = z1.shape[0]
    terms = []
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        sims = [float(z[i] @ z[k]) / tau for k in range(2 * n) if k != i]
        terms.append(-float(z[i] @ z[j]) / tau + math.log(sum(math.exp(s) for s in sims)))
    return torch.tensor(sum(terms) / (2 * n))


@pytest.mark.parametrize("kind", ["unet_encoder", "vit"])
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_loss_is_lightly_ntxent_of_the_two_views_projections_and_the_papers_formula(kind, tau):
    m = make(kind, temperature=tau)
    b = pair_batch()
    loss, stats = m.training_step(b, 0, torch.Generator())
    loss = loss.detach()
    with torch.no_grad():  # train mode, batch statistics: the same projections again
        z1, z2 = m.projections(b["view1"], b["view2"])
        want = NTXentLoss(temperature=tau, gather_distributed=False)(z1, z2)
    assert abs(float(loss) - float(want)) < 1e-6
    assert abs(float(loss) - float(nt_xent_by_hand(z1, z2, tau))) < 1e-5
    assert stats["loss"] == pytest.approx(float(loss))
    cos = torch.nn.functional.cosine_similarity(z1, z2).mean()
    assert stats["positive_cosine"] == pytest.approx(float(cos), abs=1e-6)


@pytest.mark.parametrize("kind", ["unet_encoder", "vit"])
def test_every_trainable_parameter_gets_a_gradient(kind):
    m = make(kind)
    loss, _ = m.training_step(pair_batch(), 0, torch.Generator())
    loss.backward()
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and any(n.startswith("encoder.") for n in trainable) and any(
        n.startswith("projector.") for n in trainable)
    missing = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, f"no gradient for {missing}"


@pytest.mark.parametrize("kind", ["unet_encoder", "vit"])
def test_loss_goes_down_on_a_fixed_batch_with_adamw(kind):
    torch.manual_seed(0)
    m = make(kind, lr=1e-3)
    opt = torch.optim.AdamW(m.parameter_groups(), lr=m.lr_at(0))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 32, 32, generator=g)  # hard pairs: heavy noise, one view mirrored
    b = {"view1": x + torch.randn(x.shape, generator=g), "view2": x.flip(-1) + torch.randn(x.shape, generator=g)}
    losses = []
    for step in range(20):
        loss, _ = m.training_step(b, step, torch.Generator())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    chance = math.log(2 * 8 - 1)  # uniform over the 15 other views
    assert losses[0] > chance and sum(losses[-3:]) / 3 < min(0.2 * sum(losses[:3]) / 3, 0.5 * chance), losses


@pytest.mark.parametrize("kind", ["unet_encoder", "vit"])
def test_taxonomy_partitions_the_state_and_federated_is_what_is_sent(kind):
    m = make(kind)
    keys = list(m.state_module().state_dict())
    tax = m.state_taxonomy()
    check_taxonomy(tax, keys)
    assert tax["site"] == sorted(k for k in keys if k.endswith("num_batches_tracked")) and tax["site"]
    assert tax["rebuilt"] == []
    assert all(k.startswith(("encoder.", "projector.")) for k in tax["federated"])
    assert any("running_mean" in k for k in tax["federated"])  # BatchNorm statistics are averaged
    fed = m.federated_state_dict()
    assert sorted(fed) == tax["federated"]
    received = {k: v + 1 if v.is_floating_point() else v for k, v in fed.items()}
    m.load_federated_state_dict(received)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in received.items())
    with pytest.raises(ValueError, match="missing"):
        m.load_federated_state_dict({k: v for k, v in fed.items() if k != tax["federated"][0]})


def test_default_encoder_export_loads_into_the_finetune_seg_unet_model(tmp_path):
    m = build("simclr", {})  # the default backbone: finetune_seg_unet's U-Net encoder
    with torch.no_grad():  # away from any fresh initialisation
        for p in m.encoder.parameters():
            p.add_(0.25)
    assert m.backbone() is m.encoder
    path = export_backbone(m, tmp_path / "simclr.pt")
    exported = torch.load(path, weights_only=True)
    assert sorted(exported) == sorted(m.encoder.state_dict())
    unet = build_model({"arch": "unet", "num_classes": 3, "pretrained": str(path)})
    own = unet.state_dict()
    assert exported and set(exported) < set(own)  # the contracting path only: the decoder starts fresh
    for k, v in exported.items():  # every encoder tensor (parameters and BatchNorm statistics) loaded
        assert torch.equal(own[k], v), k


def test_views_are_two_different_augmentations_batched_and_reproducible():
    transform, collate = get_spec("simclr").views(SimCLRConfig(image_size=32), {})
    images = [torch.randn(1, 40, 40, generator=torch.Generator().manual_seed(i)) for i in range(4)]

    def draw(seed: int) -> dict:
        torch.manual_seed(seed)
        return collate([transform(x) for x in images])

    a, b, c = draw(7), draw(7), draw(8)
    assert set(a) == {"view1", "view2"}
    assert a["view1"].shape == a["view2"].shape == (4, 1, 32, 32)
    assert a["view1"].dtype == torch.float32
    assert not torch.equal(a["view1"], a["view2"])
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["view1"], c["view1"])
    loss, _ = make().training_step(a, 0, torch.Generator())  # the method takes the views' batches
    assert math.isfinite(float(loss.detach()))


def test_view_values_come_from_the_config_and_the_jobs_view_settings_override_them():
    cfg = SimCLRConfig(image_size=32, crop_scale=(0.5, 1.0), hflip_prob=0.0, blur_prob=0.25)
    v = cfg.training_views()
    assert (v.global_crop_size, v.n_local_crops, v.global_crop_scale) == (32, 0, (0.5, 1.0))
    assert (v.hflip_prob, v.blur_probs, v.noise_prob, v.solarize_prob) == (0.0, (0.25, 0.25, 0.0), 0.0, 0.0)
    assert cfg.training_views({"noise_prob": 0.3, "global_crop_scale": [0.8, 1.0]}).global_crop_scale == (0.8, 1.0)
    with pytest.raises(ValueError, match="'local_crop_scale'=.*no local crops"):
        cfg.training_views({"local_crop_scale": [0.1, 0.3]})
    with pytest.raises(ValueError, match="'global_crop_size' is not a view setting"):
        cfg.training_views({"global_crop_size": 48})
    with pytest.raises(ValueError, match="n_local_crops=2 must be 0"):
        from dataclasses import replace

        PairViewTransform(replace(pair_view_config(32), n_local_crops=2))
    with pytest.raises(ValueError, match="sample 1 has 3 views"):
        pair_collate([(torch.zeros(1, 2, 2),) * 2, (torch.zeros(1, 2, 2),) * 3])
    x = torch.randn(1, 32, 32)  # no crop, flip, jitter, blur: the image itself
    off = pair_view_config(32, {"global_crop_scale": (1.0, 1.0), "hflip_prob": 0.0, "intensity_prob": 0.0,
                                "blur_probs": (0.0, 0.0, 0.0), "noise_prob": 0.0})
    v1, v2 = PairViewTransform(off)(x)
    assert torch.allclose(v1, x, atol=1e-5) and torch.allclose(v2, x, atol=1e-5)


def test_default_settings_are_pinned_and_round_trip():
    assert SimCLRConfig().to_dict() == {
        "backbone": {"kind": "unet_encoder"}, "image_size": 64, "batch_size": 16, "proj_hidden_dim": 512,
        "proj_dim": 128, "temperature": 0.1, "lr": 3e-4, "weight_decay": 1e-6, "warmup_steps": 0,
        "total_steps": None, "min_lr": 0.0, "seed": 0, "crop_scale": [0.2, 1.0], "hflip_prob": 0.5,
        "intensity_prob": 0.8, "blur_prob": 0.5}
    c = SimCLRConfig.from_dict({"backbone": {"channels": [4, 8]}, "crop_scale": [0.5, 1.0]})
    assert c.backbone == {"kind": "unet_encoder", "channels": [4, 8]} and c.crop_scale == (0.5, 1.0)
    assert SimCLRConfig.from_dict(c.to_dict()) == c
    assert SimCLRConfig.from_dict({"backbone": None}).backbone == {"kind": "unet_encoder"}
    assert SimCLRConfig().backbone_settings()["channels"] == (16, 32, 64, 128, 256)  # finetune_seg_unet's U-Net


def test_lr_schedule_is_warmup_cosine_of_the_global_step_and_decay_skips_1d_tensors():
    m = make(lr=1e-3, min_lr=1e-5, warmup_steps=5, total_steps=50, weight_decay=0.01)
    for s in (0, 3, 5, 20, 50, 99):
        assert m.lr_at(s) == cosine_with_warmup(s, 50, 5, 1e-3, 1e-5)
    assert make(lr=1e-3, warmup_steps=4).lr_at(2) == pytest.approx(5e-4) and make(lr=1e-3).lr_at(10 ** 6) == 1e-3
    decay, no_decay = m.parameter_groups()
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0 and m.weight_decay_at(7) == 0.01
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])


@pytest.mark.parametrize(("settings", "match"), [
    ({"temperature": 0}, r"^simclr setting 'temperature'=0: must be a finite number > 0"),
    ({"temperature": -0.1}, r"'temperature'=-0.1"),
    ({"batch_size": 1}, r"'batch_size'=1: must be an int >= 2"),
    ({"image_size": 0}, r"'image_size'=0"),
    ({"proj_dim": 2.5}, r"'proj_dim'=2.5"),
    ({"proj_hidden_dim": True}, r"'proj_hidden_dim'=True"),
    ({"lr": 0.0}, r"'lr'=0.0"),
    ({"min_lr": 1.0}, r"'min_lr'=1.0: must be in \[0, lr=0.0003\]"),
    ({"weight_decay": -1e-4}, r"'weight_decay'=-0.0001"),
    ({"warmup_steps": -1}, r"'warmup_steps'=-1"),
    ({"warmup_steps": 10, "total_steps": 5}, r"'warmup_steps'=10: must be <= total_steps=5"),
    ({"total_steps": 0}, r"'total_steps'=0"),
    ({"crop_scale": [0.9, 0.5]}, r"'crop_scale'=\(0.9, 0.5\)"),
    ({"crop_scale": [0.0, 1.0]}, r"'crop_scale'"),
    ({"hflip_prob": 1.5}, r"'hflip_prob'=1.5: must be a probability"),
    ({"intensity_prob": -0.1}, r"'intensity_prob'=-0.1"),
    ({"blur_prob": 2}, r"'blur_prob'=2"),
    ({"backbone": {"kind": "unet"}}, r"'backbone.kind'='unet': must be one of \['unet_encoder', 'vit'\]"),
    ({"backbone": {"spatial_dims": 3}}, r"'backbone.spatial_dims'=3: must be 2"),
    ({"backbone": {"chanels": [4, 8]}}, r"unknown unet_encoder setting\(s\) \['chanels'\]"),
    ({"backbone": {"kind": "vit", "img_size": 32}}, r"'backbone.img_size'=32: must equal image_size=64"),
    ({"backbone": {"kind": "vit", "patch_size": 7}}, r"'backbone' \(kind 'vit'\)"),
    ({"backbone": [1, 2]}, r"'backbone'=\[1, 2\]: must be a dict"),
    ({"temprature": 0.1}, r"^unknown simclr setting\(s\) \['temprature'\]"),
])
def test_setting_errors_name_the_setting_and_value(settings, match):
    with pytest.raises(ValueError, match=match):
        SimCLRConfig.from_dict(settings)


@pytest.mark.parametrize(("batch", "match"), [
    ({"image": torch.zeros(4, 1, 32, 32)}, r"takes batches \{'view1', 'view2'\}.*got \['image'\]"),
    ({"view1": torch.zeros(4, 1, 16, 16), "view2": torch.zeros(4, 1, 16, 16)},
     r"image_size=32\) takes view1 \[B, C, 32, 32\], got \(4, 1, 16, 16\)"),
    ({"view1": torch.zeros(4, 1, 32, 32), "view2": torch.zeros(3, 1, 32, 32)}, "must have one shape"),
    ({"view1": torch.zeros(1, 1, 32, 32), "view2": torch.zeros(1, 1, 32, 32)}, "needs >= 2 images"),
])
def test_bad_batches_are_refused(batch, match):
    with pytest.raises(ValueError, match=match):
        make().training_step(batch, 0, torch.Generator())
