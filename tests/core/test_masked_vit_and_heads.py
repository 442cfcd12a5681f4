"""Token forward with iBOT mask token (vs timm's own forward) and the DINO head helpers."""

import pytest
import torch

from fl_plugins.core.heads import build_dino_head, cancel_last_layer_gradients, copy_dino_head, last_layer_parameters
from fl_plugins.core.masked_vit import add_mask_token, forward_tokens
from fl_plugins.models.backbone import BackboneSpec, create_backbone

SPEC = BackboneSpec(img_size=32, patch_size=8, depth=2)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    model = create_backbone(SPEC).eval()
    add_mask_token(model)
    with torch.no_grad():
        model.mask_token.normal_()
    return model


@pytest.mark.parametrize("size", [32, 16])
def test_unmasked_forward_equals_timm(vit, size):
    x = torch.randn(2, 1, size, size)
    cls, patches = forward_tokens(vit, x)
    torch.testing.assert_close(cls, vit(x))
    assert patches.shape == (2, (size // 8) ** 2, vit.embed_dim)


def test_masking_replaces_patches_before_pos_embed(vit):
    x = torch.randn(2, 1, 32, 32)
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, 1, 2] = True
    cls, _ = forward_tokens(vit, x, masks)
    ref, _ = forward_tokens(vit, x)
    assert not torch.allclose(cls[0], ref[0])
    torch.testing.assert_close(cls[1], ref[1])  # unmasked image unchanged
    # a masked patch no longer depends on its pixels
    x2 = x.clone()
    x2[0, :, 8:16, 16:24] = 5.0
    torch.testing.assert_close(forward_tokens(vit, x2, masks)[0], cls)


def test_mask_errors(vit):
    with pytest.raises(ValueError, match="do not fit"):
        forward_tokens(vit, torch.randn(2, 1, 32, 32), torch.zeros(2, 3, 3, dtype=torch.bool))
    plain = create_backbone(SPEC)
    with pytest.raises(ValueError, match="mask_token"):
        forward_tokens(plain, torch.randn(1, 1, 32, 32), torch.zeros(1, 4, 4, dtype=torch.bool))


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_head_shapes_copy_and_norm_last_layer(norm_last_layer):
    head = build_dino_head(192, 64, hidden_dim=32, bottleneck_dim=16, norm_last_layer=norm_last_layer)
    assert head(torch.randn(3, 192)).shape == (3, 64)
    assert head.last_layer.weight_g.requires_grad is (not norm_last_layer)
    assert torch.all(head.last_layer.weight_g == 1)
    twin = copy_dino_head(head)
    assert twin is not head
    for (k, a), (k2, b) in zip(head.state_dict().items(), twin.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert twin.last_layer.weight_g.requires_grad is (not norm_last_layer)


def test_cancel_last_layer_gradients_by_global_step():
    head = build_dino_head(8, 16, hidden_dim=8, bottleneck_dim=4, norm_last_layer=False)
    for step, cancelled in [(0, True), (2, True), (3, False)]:
        head.zero_grad(set_to_none=False)
        head(torch.randn(2, 8)).sum().backward()
        assert cancel_last_layer_gradients(head, step, freeze_last_layer_steps=3) is cancelled
        assert all((p.grad is None) is cancelled for p in last_layer_parameters(head))
        assert head.layers[0].weight.grad is not None
