"""Pluggable backbones (timm ViT, MONAI U-Net encoder, whole MONAI U-Net), 2D and 3D where MONAI supports it:
output shapes, a gradient for every trainable parameter, an encoder that loads into the fine-tuning U-Net, and
errors that name the setting."""

from __future__ import annotations

import pytest
import torch

from fl_plugins.models.backbones import build_backbone
from fl_plugins.models.factory import build_model

UNET = {"channels": [4, 8, 16], "strides": [2, 2]}
VIT = {"kind": "vit", "name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "depth": 2}

CASES = [  # (config, input shape, output shape)
    (VIT, (2, 1, 32, 32), (2, 192)),
    ({"kind": "unet_encoder", **UNET}, (2, 1, 16, 16), (2, 16)),
    ({"kind": "unet_encoder", **UNET, "spatial_dims": 3}, (2, 1, 16, 16, 16), (2, 16)),
    ({"kind": "unet", **UNET, "out_channels": 1}, (2, 1, 16, 16), (2, 1, 16, 16)),
    ({"kind": "unet", **UNET, "out_channels": 1, "spatial_dims": 3}, (1, 1, 16, 16, 16), (1, 1, 16, 16, 16)),
]


@pytest.mark.parametrize("cfg,shape_in,shape_out", CASES, ids=[f"{c[0]['kind']}-{len(c[1]) - 2}d" for c in CASES])
def test_shapes_and_every_parameter_gets_a_gradient(cfg, shape_in, shape_out):
    torch.manual_seed(0)
    net = build_backbone(cfg)
    net.train()
    out = net(torch.randn(*shape_in))
    assert tuple(out.shape) == shape_out
    out.float().pow(2).mean().backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]


@pytest.mark.parametrize("dims", [2, 3])
def test_unet_encoder_loads_into_the_finetuning_unet(dims):
    enc = build_backbone({"kind": "unet_encoder", **UNET, "spatial_dims": dims})
    seg = build_model({"arch": "unet", "num_classes": 3, **UNET, "spatial_dims": dims})
    before = {k: v.clone() for k, v in seg.state_dict().items()}
    result = seg.load_state_dict(enc.state_dict(), strict=False)
    assert result.unexpected_keys == []  # every encoder key is a U-Net key
    for k, v in enc.state_dict().items():
        assert torch.equal(seg.state_dict()[k], v)
    untouched = [k for k in before if k not in enc.state_dict()]
    assert untouched and all(torch.equal(seg.state_dict()[k], before[k]) for k in untouched)  # the decoder


@pytest.mark.parametrize("cfg,match", [
    ({**VIT, "spatial_dims": 3}, r"backbone kind 'vit' \(timm\) is 2D only: spatial_dims must be 2, got 3"),
    ({"kind": "resnet"}, r"backbone setting 'kind' has unknown value 'resnet'; valid: \['unet', 'unet_encoder', 'vit'\]"),
    ({"kind": "unet_encoder", "width": 3}, r"unknown backbone setting\(s\) \['width'\] for kind 'unet_encoder'"),
    ({"kind": "unet_encoder", **UNET, "spatial_dims": 4}, r"spatial_dims must be 2 or 3, got 4"),
    ({"kind": "unet", **UNET, "out_channels": 0}, r"backbone setting 'out_channels' must be >= 1, got 0"),
])
def test_bad_backbone_settings_are_named(cfg, match):
    with pytest.raises(ValueError, match=match):
        build_backbone(cfg)


def test_encoder_rejects_input_of_the_other_dimensionality():
    enc = build_backbone({"kind": "unet_encoder", **UNET})
    with pytest.raises(ValueError, match=r"UNetEncoder\(spatial_dims=2\) takes \[B, C, H, W\] input, got shape"):
        enc(torch.randn(1, 1, 8, 16, 16))


@pytest.mark.parametrize("dims,shape", [(2, (3, 1, 28, 28)), (3, (2, 1, 16, 16, 16))])
def test_cnn_classifier_2d_and_3d_every_parameter_gets_a_gradient(dims, shape):
    torch.manual_seed(0)
    m = build_model({"arch": "cnn_classifier", "num_classes": 3, "spatial_dims": dims})
    out = m(torch.randn(*shape))
    assert tuple(out.shape) == (shape[0], 3)
    out.sum().backward()
    assert not [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]


@pytest.mark.parametrize("extra,match", [
    ({"spatial_dims": 4}, "model setting 'spatial_dims' must be 2 or 3, got 4"),
    ({"depth": 50}, r"model setting 'depth' must be one of \[10, 18\], got 50"),
    ({"widen_factor": 0}, "model setting 'widen_factor' must be > 0, got 0"),
])
def test_cnn_classifier_bad_settings_named(extra, match):
    with pytest.raises(ValueError, match=match):
        build_model({"arch": "cnn_classifier", "num_classes": 2, **extra})


@pytest.mark.parametrize("cfg,shape_in,shape_out", CASES, ids=[f"{c[0]['kind']}-{len(c[1]) - 2}d" for c in CASES])
def test_feature_dim_is_the_width_of_the_output_vector(cfg, shape_in, shape_out):
    from fl_plugins.models.backbones import feature_dim

    net = build_backbone(cfg)
    if len(shape_out) == 2:  # a vector per image: its width
        assert feature_dim(net) == shape_out[1]
    else:  # the whole U-Net outputs images, not a vector
        with pytest.raises(ValueError, match="declares no feature width"):
            feature_dim(net)
