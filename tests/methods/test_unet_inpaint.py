"""U-Net masked inpainting (fl_plugins.methods.unet_inpaint): gradients, the zero-fill baseline by hand, the exact
masked fraction, export into the segmentation U-Net, checkpoints of another architecture, 3D volumes, input errors.
Tiny U-Net: channels (4, 8, 16), strides (2, 2); 32 px images with 8 px patches (16 patches, 12 masked)."""

import pytest
import torch

from fl_plugins.engine.export import export_backbone
from fl_plugins.methods.unet_inpaint import InpaintConfig, UNetInpaintMethod
from fl_plugins.models.backbone import BackboneCheckpointError, BackboneSpec, create_backbone
from fl_plugins.models.factory import build_model
from fl_plugins.models.unet import OUTPUT_BLOCK_PREFIX

TINY_UNET = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}


def make(**overrides) -> UNetInpaintMethod:
    settings = {"unet": dict(TINY_UNET), "image_size": 32, "patch_size": 8, "batch_size": 2, **overrides}
    return UNetInpaintMethod(InpaintConfig.from_dict(settings))


def test_every_parameter_gets_a_gradient():
    method = make()
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    loss, _ = method.training_step({"image": x}, 0, torch.Generator().manual_seed(1))
    loss.backward()
    missing = [n for n, p in method.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, f"no gradient for {missing}"


def test_zero_fill_baseline_and_masked_fraction_by_hand():
    method = make(aug_flip=False, aug_rot90=False)
    x = torch.full((2, 1, 32, 32), 3.0)
    _, stats = method.training_step({"image": x}, 0, torch.Generator().manual_seed(1))
    masked = 2 * 0.75 * 32 * 32  # 12 of 16 patches of 64 pixels, 2 images = 1536 pixels
    assert stats["masked_fraction"] == 0.75
    # predicting the fill value 0 on every masked pixel of a constant-3 image: sum(9 * M) / (sum(M) + 1e-5) / C
    assert stats["zero_fill_loss"] == pytest.approx(9.0 * masked / (masked + 1e-5), rel=1e-6)


def test_zero_fill_baseline_matches_the_mask_on_random_images():
    method = make(aug_flip=False, aug_rot90=False)
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    _, stats = method.training_step({"image": x}, 0, torch.Generator().manual_seed(4))
    _, pix = method.mask_images(x, torch.Generator().manual_seed(4))  # the same draws as the step (no augmentation)
    assert pix.flatten(1).mean(1).tolist() == [0.75, 0.75]  # exact per image
    by_hand = float((x.pow(2) * pix).sum() / (pix.sum() + 1e-5))
    assert stats["zero_fill_loss"] == pytest.approx(by_hand, rel=1e-6)


def test_export_loads_into_the_segmentation_unet(tmp_path):
    method = make()
    with torch.no_grad():  # a state that no fresh U-Net has
        for p in method.net.parameters():
            p.add_(0.5)
    path = export_backbone(method, tmp_path / "unet.pt")
    exported = torch.load(path, weights_only=True)
    model = build_model({"arch": "unet", "num_classes": 4, **TINY_UNET, "pretrained": str(path)})
    own = model.state_dict()
    assert set(own) == set(exported)
    head = [k for k in own if k.startswith(OUTPUT_BLOCK_PREFIX)]
    assert head and any(own[k].shape != exported[k].shape for k in head)  # 4 classes vs 1 image channel
    body = [k for k in own if not k.startswith(OUTPUT_BLOCK_PREFIX)]
    assert body and all(torch.equal(own[k], exported[k]) for k in body)


def _save(sd, path):
    torch.save(sd, path)
    return str(path)


@pytest.mark.parametrize("other", ["vit", "unet_other_channels"])
def test_checkpoint_of_another_architecture_is_refused(other, tmp_path):
    if other == "vit":
        sd = create_backbone(BackboneSpec(img_size=32, patch_size=8, depth=1)).state_dict()
    else:
        sd = make(unet={**TINY_UNET, "channels": [8, 16, 32]}).net.state_dict()
    path = _save(sd, tmp_path / "other.pt")
    with pytest.raises(BackboneCheckpointError, match="model.pretrained"):
        build_model({"arch": "unet", "num_classes": 4, **TINY_UNET, "pretrained": path})


def test_3d_config_trains_on_volumes():
    method = make(unet={**TINY_UNET, "spatial_dims": 3}, image_size=16, patch_size=4)
    x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    loss, stats = method.training_step({"image": x}, 0, torch.Generator().manual_seed(1))
    loss.backward()
    assert torch.isfinite(loss) and stats["masked_fraction"] == 0.75  # 48 of 64 patches
    assert all(p.grad is not None for p in method.net.parameters())
    out = method.preview(x, torch.Generator().manual_seed(2))
    assert out["reconstruction"].shape == x.shape


@pytest.mark.parametrize("shape", [(2, 1, 32, 32, 32), (2, 1, 16, 16)])
def test_2d_method_refuses_other_inputs(shape):
    with pytest.raises(ValueError, match=r"unet_inpaint \(2D, image_size=32\) takes images \[B, C, 32, 32\]"):
        make().training_step({"image": torch.zeros(shape)}, 0, torch.Generator().manual_seed(0))


def test_config_is_strict_and_round_trips():
    with pytest.raises(ValueError, match=r"^unknown unet_inpaint setting\(s\) \['mask'\]; known: \['aug_flip', "):
        InpaintConfig.from_dict({"mask": 0.5})
    assert InpaintConfig.from_dict({"unet": None}).unet == {}  # null -> the fine-tuning U-Net defaults
    unet = dict(TINY_UNET)
    c = InpaintConfig.from_dict({"unet": unet, "mask_ratio": 0.5})
    unet["num_res_units"] = 2  # a copy: the job's dict is not aliased
    assert c.unet == TINY_UNET and InpaintConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match=r"unet_inpaint setting 'loss'='l2': must be 'mse' or 'l1'"):
        InpaintConfig.from_dict({"loss": "l2"})
