"""The FCL method (fl_plugins.methods.fcl): gradients, the state taxonomy (encoder + projector federated, momentum
rebuilt from them each round), the EMA, the export into the segmentation U-Net, the ViT option, setting errors.
Tiny U-Net encoder: channels (4, 8, 16), strides (2, 2); 32 px slices."""

from __future__ import annotations

import pytest
import torch

from fl_plugins.engine.export import export_backbone
from fl_plugins.methods import build
from fl_plugins.methods.fcl import FCLConfig, FCLMethod, augment_view
from fl_plugins.models.factory import build_model

TINY = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}


def make(**overrides) -> FCLMethod:
    return build("fcl", {"backbone": dict(TINY), "image_size": 32, "proj_dim": 8, "num_negatives": 6, **overrides})


def batch(n_vol: int = 2, s: int = 4) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"image": torch.randn(n_vol * s, 1, 32, 32, generator=g), "part": torch.arange(s).repeat(n_vol),
            "vol": torch.arange(n_vol).repeat_interleave(s)}


def with_bank(m: FCLMethod, n: int = 10) -> FCLMethod:
    g = torch.Generator().manual_seed(1)
    m.set_bank(torch.nn.functional.normalize(torch.randn(n, m.config.proj_dim, generator=g), dim=1),
               torch.arange(n) % 4, torch.arange(n) % 2 == 0)
    return m


def test_every_trainable_parameter_gets_a_gradient_and_the_momentum_none():
    m = with_bank(make())
    loss, stats = m.training_step(batch(), 0, torch.Generator().manual_seed(2))
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, f"no gradient for {missing}"
    assert all(p.grad is None and not p.requires_grad for p in m.momentum.parameters())
    assert set(stats) >= {"loss", "loss_local", "loss_remote", "remote_positive_fraction"}


def test_taxonomy_momentum_is_rebuilt_from_the_received_model_each_round():
    m = make()
    tax = m.state_taxonomy()
    assert tax["federated"] and all(k.startswith(("encoder.", "projector.")) for k in tax["federated"])
    assert tax["rebuilt"] == sorted(k for k in m.state_dict() if k.startswith("momentum."))
    assert tax["site"] == sorted(k for k in m.state_dict() if k.endswith("num_batches_tracked")
                                 and not k.startswith("momentum."))
    received = {k: v + 1.0 for k, v in m.federated_state_dict().items()}
    m.load_federated_state_dict(received)
    sd = m.state_dict()
    for k, v in received.items():  # momentum.<k> == the received <k>
        assert torch.equal(sd["momentum." + k], v.to(sd["momentum." + k].dtype)), k


def test_momentum_kept_on_the_site_with_momentum_reset_false():
    m = make(momentum_reset=False)
    tax = m.state_taxonomy()
    assert tax["rebuilt"] == [] and all(k in tax["site"] for k in m.state_dict() if k.startswith("momentum."))
    before = {k: v.clone() for k, v in m.momentum.state_dict().items()}
    m.load_federated_state_dict({k: v + 1.0 for k, v in m.federated_state_dict().items()})
    assert all(torch.equal(before[k], v) for k, v in m.momentum.state_dict().items())


def test_ema_after_a_step_by_hand():
    m = with_bank(make(momentum=0.9))
    opt = torch.optim.SGD([p for g in m.parameter_groups() for p in g["params"]], lr=0.1)
    k0 = {n: p.detach().clone() for n, p in m.momentum["projector"].named_parameters()}
    loss, _ = m.training_step(batch(), 0, torch.Generator().manual_seed(2))
    loss.backward()
    opt.step()
    m.after_step(0)
    for n, p in m.momentum["projector"].named_parameters():
        want = 0.9 * k0[n] + 0.1 * dict(m.projector.named_parameters())[n].detach()
        assert torch.allclose(p, want, atol=1e-6), n


def test_export_is_the_encoder_and_loads_into_the_segmentation_unet(tmp_path):
    m = make()
    with torch.no_grad():
        for p in m.encoder.parameters():
            p.add_(0.25)
    path = export_backbone(m, tmp_path / "fcl.pt")
    exported = torch.load(path, weights_only=True)
    unet = build_model({"arch": "unet", "num_classes": 4, **TINY, "pretrained": str(path)})
    own = unet.state_dict()
    assert exported and set(exported) < set(own)  # the contracting path only
    for k, v in exported.items():
        assert torch.equal(own[k], v), k


def test_vit_encoder_option_trains():
    m = with_bank(make(backbone={"kind": "vit", "img_size": 32, "patch_size": 8, "depth": 1, "in_chans": 1}))
    loss, _ = m.training_step(batch(), 0, torch.Generator().manual_seed(3))
    loss.backward()
    assert all(p.grad is not None for n, p in m.encoder.named_parameters() if p.requires_grad)


def test_views_keep_shape_and_follow_the_generator():
    x = torch.randn(3, 1, 32, 32)
    a = augment_view(x, torch.Generator().manual_seed(5), (0.5, 1.0), 0.2)
    b = augment_view(x, torch.Generator().manual_seed(5), (0.5, 1.0), 0.2)
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)
    assert torch.equal(augment_view(x, torch.Generator(), (1.0, 1.0), 0.0, flip=False), x)


@pytest.mark.parametrize(("settings", "match"), [
    ({"temperature": 0}, "'temperature'=0: must be > 0"),
    ({"volumes_per_batch": 1}, "'volumes_per_batch'=1"),
    ({"crop_scale": [0.9, 0.5]}, "'crop_scale'"),
    ({"momentum": 1.5}, "'momentum'=1.5"),
    ({"num_negatives": 0}, "'num_negatives'=0"),
    ({"temprature": 0.1}, r"unknown fcl setting\(s\) \['temprature'\]"),
])
def test_setting_errors_name_the_setting(settings, match):
    with pytest.raises(ValueError, match=match):
        FCLConfig.from_dict(settings)


#: the settings both slice-contrastive methods share (fields of SliceContrastSettings) and their defaults
SHARED = {"backbone": {"kind": "unet_encoder"}, "image_size": 64, "num_partitions": 4, "volumes_per_batch": 8,
          "crop_scale": [0.6, 1.0], "intensity": 0.2, "lr": 3e-4, "min_lr_ratio": 0.01, "warmup_steps": 0,
          "total_steps": None, "weight_decay": 1e-5, "seed": 0}


def test_default_settings_of_fcl_and_fclopt_are_pinned_and_share_the_base_fields():
    from fl_plugins.methods.fcl import SliceContrastSettings
    from fl_plugins.methods.fclopt import FCLOptConfig
    from fl_plugins.strict_config import config_fields

    assert config_fields(SliceContrastSettings) == list(SHARED)
    assert FCLConfig().to_dict() == {**SHARED, "proj_dim": 128, "temperature": 0.1, "num_negatives": 512,
                                     "momentum": 0.999, "momentum_reset": True, "batch_negatives": True}
    assert FCLOptConfig().to_dict() == {**SHARED, "proj_hidden_dim": 512, "proj_dim": 128, "pred_hidden_dim": 512,
                                        "target_momentum": 0.99, "target_mode": "fedavg", "local_predictor": False}
    for cls in (FCLConfig, FCLOptConfig):
        c = cls.from_dict({"backbone": {"channels": [4, 8]}, "crop_scale": [0.5, 1.0]})
        assert c.backbone == {"kind": "unet_encoder", "channels": [4, 8]} and c.crop_scale == (0.5, 1.0)
        assert cls.from_dict(c.to_dict()) == c
        assert cls.from_dict({"backbone": None}).backbone == {"kind": "unet_encoder"}
    with pytest.raises(ValueError, match=r"^unknown fclopt setting\(s\) \['temperature'\]"):
        FCLOptConfig.from_dict({"temperature": 0.1})
    with pytest.raises(ValueError, match=r"^fclopt setting 'intensity'=1.0: must be in \[0, 1\)"):
        FCLOptConfig.from_dict({"intensity": 1.0})


def test_step_without_bank_and_wrong_image_size_are_refused():
    m = make()
    with pytest.raises(RuntimeError, match="before set_bank"):
        m.training_step(batch(), 0, torch.Generator())
    with_bank(m)
    with pytest.raises(ValueError, match=r"image_size=32\) takes slices \[B, C, 32, 32\]"):
        m.training_step({**batch(), "image": torch.zeros(8, 1, 16, 16)}, 0, torch.Generator())
    with pytest.raises(ValueError, match=r"memory bank features must be \[M, 8\]"):
        m.set_bank(torch.zeros(3, 5), torch.zeros(3).long(), torch.zeros(3).bool())
    with pytest.raises(ValueError, match="memory bank is empty"):
        m.set_bank(torch.zeros(0, 8), torch.zeros(0).long(), torch.zeros(0).bool())


def test_every_step_enqueues_its_keys_into_the_local_bank_only():
    m = make()
    n_local, n_remote = 10, 5
    feat = torch.nn.functional.normalize(torch.randn(n_local + n_remote, 8), dim=1)
    remote = torch.arange(n_local + n_remote) >= n_local
    m.set_bank(feat, torch.zeros(n_local + n_remote).long(), remote)
    b = batch()  # 8 slices: keys replace local entries 0..7, then 8, 9, 0..5 (FIFO, wrapping)
    m.training_step(b, 0, torch.Generator().manual_seed(0))
    bank, part, _ = m._bank
    assert torch.equal(bank[n_local:], feat[n_local:])  # remote features stay for the round
    assert torch.equal(part[:8], b["part"]) and torch.equal(bank[8:n_local], feat[8:n_local])
    m.training_step(b, 1, torch.Generator().manual_seed(0))
    assert torch.equal(m._bank[1][8:10], b["part"][:2]) and torch.equal(m._bank[1][:6], b["part"][2:])
    assert m._ptr == 6
