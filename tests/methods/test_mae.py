"""MAE (2D timm, 3D MONAI) and SimMIM (2D): overfitting, gradients, state taxonomy, wire round trip, export into the
fine-tuning models, previews, augmentation, and errors that name the setting. Tiny sizes: depth-2 ViT-tiny width,
32 px images with 8 px patches (16 patches), 16^3 volumes with 4^3 patches (64 patches)."""

import math

import pytest
import torch
from monai.networks.nets import ViT

from fl_plugins.core.mim import patch_mask_to_pixels, unpatchify
from fl_plugins.engine.export import export_backbone
from fl_plugins.engine.method import check_taxonomy
from fl_plugins.engine.train_loop import build_optimizer
from fl_plugins.methods import build as build_method
from fl_plugins.methods import get_spec
from fl_plugins.methods.mae import MAEConfig, MAEMethod, random_resized_crop_flip, vit3d_kwargs
from fl_plugins.models.backbone import BackboneSpec, create_backbone
from fl_plugins.models.factory import build_model

TINY_2D = {"img_size": 32, "patch_size": 8, "depth": 2}
TINY_3D = {"img_size": 16, "patch_size": 4, "depth": 2}
DECODER = {"decoder_dim": 48, "decoder_heads": 2, "decoder_depth": 1}

# case -> (config settings, top-level state prefixes (all federated), masked fraction of patches per sample)
CASES = {
    "mae2d": ({"variant": "mae", "backbone": TINY_2D}, {"encoder", "decoder_embed", "decoder", "decoder_pred"}, 0.75),
    # SimMIM: 2x2 mask patches of 2x2 model patches, round(0.6 * 4) = 2 of 4 masked
    "simmim2d": ({"variant": "simmim", "backbone": TINY_2D}, {"encoder", "mask_token", "decoder_pred"}, 0.5),
    # MONAI keeps int(0.25 * 64) = 16 of 64 patches
    "mae3d": ({"variant": "mae", "spatial_dims": 3, "backbone": TINY_3D}, {"mae"}, 0.75),
}


def make(case: str, **overrides) -> MAEMethod:
    settings, _, _ = CASES[case]
    return MAEMethod(MAEConfig.from_dict({**settings, **DECODER, "lr": 1e-3, "batch_size": 4, **overrides}))


def images(method: MAEMethod, batch: int = 4, seed: int = 0) -> torch.Tensor:
    c = method.config
    return torch.randn(batch, 1, *(c.image_size,) * c.spatial_dims, generator=torch.Generator().manual_seed(seed))


def step(method: MAEMethod, x: torch.Tensor, seed: int = 5, global_step: int = 0):
    return method.training_step({"image": x}, global_step, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", CASES)
def test_loss_finite_and_decreasing_on_a_fixed_batch(case):
    method = make(case, augment=False)
    opt = build_optimizer(method)
    x = images(method)
    pool = torch.nn.functional.avg_pool2d if x.dim() == 4 else torch.nn.functional.avg_pool3d
    x = pool(x, 3, 1, 1)  # smooth: image-like structure a masked patch can be predicted from (not white noise)
    losses = []
    for i in range(20):  # same generator seed each step: the same masks, so the batch can be memorised
        loss, stats = step(method, x, global_step=i)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(stats["loss"])
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.parametrize("case", CASES)
def test_every_trainable_parameter_gets_a_gradient(case):
    method = make(case)
    loss, _ = step(method, images(method))
    loss.backward()
    missing = [n for n, p in method.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, f"no gradient for {missing}"


@pytest.mark.parametrize("case", CASES)
def test_stats_masked_fraction_and_zero_fill_baseline(case):
    method = make(case, augment=False)
    x = torch.full_like(images(method), 2.0)  # constant 2: predicting 0 costs 4 (MSE) / 2 (L1) on any mask
    loss, stats = step(method, x)
    assert stats["loss"] == pytest.approx(float(loss.detach()))
    assert stats["masked_fraction"] == pytest.approx(CASES[case][2])
    expected = 2.0 if method.config.variant == "simmim" else 4.0
    assert stats["zero_fill_loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_same_generator_same_loss_and_global_stream_untouched(case):
    method = make(case)
    x = images(method)
    state = torch.get_rng_state()
    a, _ = step(method, x, seed=3)
    b, _ = step(method, x, seed=3)
    c, _ = step(method, x, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert float(a.detach()) == float(b.detach()) != float(c.detach())


@pytest.mark.parametrize("case", CASES)
def test_taxonomy_everything_federated(case):
    method = make(case)
    keys = list(method.state_dict())
    tax = method.state_taxonomy()
    check_taxonomy(tax, keys)
    assert tax["federated"] == sorted(keys) and tax["site"] == [] and tax["rebuilt"] == []
    assert {k.split(".")[0] for k in tax["federated"]} == CASES[case][1]


@pytest.mark.parametrize("case", CASES)
def test_federated_round_trip(case):
    a, b = make(case, seed=0), make(case, seed=1)
    sa, sb = a.state_dict(), b.state_dict()
    assert any(not torch.equal(sa[k], sb[k]) for k in sa)  # another seed, other weights
    b.load_federated_state_dict(a.federated_state_dict())
    sb = b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    x = images(a)
    assert float(step(a, x)[0].detach()) == pytest.approx(float(step(b, x)[0].detach()))


@pytest.mark.parametrize("case,arch", [("mae2d", "vit_classifier"), ("simmim2d", "vit_classifier"),
                                       ("mae2d", "vit_seg")])
def test_2d_export_loads_into_finetuning_models(case, arch, tmp_path):
    method = make(case)
    spec = method.config.backbone
    assert list(method.backbone().state_dict()) == list(create_backbone(spec).state_dict())
    path = export_backbone(method, tmp_path / "backbone.pt")
    model = build_model({"arch": arch, "num_classes": 2, "backbone": spec.to_dict(), "pretrained": str(path)})
    exported = torch.load(path, weights_only=True)
    loaded = model.backbone.state_dict()
    assert set(loaded) == set(exported) and all(torch.equal(loaded[k], exported[k]) for k in exported)


def test_3d_export_loads_into_monai_vit(tmp_path):
    method = make("mae3d")
    path = export_backbone(method, tmp_path / "backbone.pt")
    vit = ViT(**vit3d_kwargs(method.config))
    vit.load_state_dict(torch.load(path, weights_only=True), strict=True)
    trained = method.mae.state_dict()
    assert torch.equal(vit.blocks[1].mlp.linear1.weight, trained["blocks.1.mlp.linear1.weight"])
    assert torch.equal(vit.norm.weight, trained["blocks.2.weight"])  # MAE's final norm = ViT's norm
    assert method.backbone()(images(method, 2)).shape == (2, 192)  # k-NN monitor: [B, hidden]


def test_monai_token_order_matches_patchify():
    """Token i of MONAI's patch embedding sees exactly the pixels of patchify's patch i (grid row-major D, H, W)."""
    method = make("mae3d")
    embed = method.mae.patch_embedding
    zero = torch.zeros(1, 1, 16, 16, 16)
    base = embed(zero)
    for i in (0, 1, 5, 17, 63):
        patches = torch.zeros(1, 64, 64)
        patches[0, i] = 1.0
        delta = (embed(unpatchify(patches, 4, (4, 4, 4), 1)) - base).abs().sum(-1)[0]
        assert delta.nonzero().flatten().tolist() == [i]


@pytest.mark.parametrize("case", CASES)
def test_preview_pastes_the_prediction_into_masked_patches(case):
    method = make(case)
    x = images(method, 2)
    out = method.preview(x, torch.Generator().manual_seed(0))
    assert set(out) == {"input", "masked", "reconstruction"}
    assert all(v.shape == x.shape for v in out.values())
    hidden = out["masked"] == 0
    frac = hidden.float().flatten(1).mean(1)
    assert frac.tolist() == pytest.approx([CASES[case][2]] * 2)
    assert torch.equal(out["reconstruction"][~hidden], x[~hidden])  # visible pixels kept
    assert not torch.equal(out["reconstruction"][hidden], x[hidden])
    assert method.training  # back in training mode


def test_preview_with_norm_pix_loss_maps_back_to_pixels():
    method = make("mae2d", norm_pix_loss=True)
    x = 5.0 + images(method, 2)
    rec = method.preview(x, torch.Generator().manual_seed(0))["reconstruction"]
    assert abs(float(rec.mean()) - 5.0) < 0.5  # pixel units, not normalised units


@pytest.mark.parametrize("shape", [(3, 1, 8, 8), (2, 2, 4, 6, 6)])
def test_crop_of_the_full_image_is_identity_or_flip(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    same = random_resized_crop_flip(x, (1.0, 1.0), (1.0, 1.0), False, torch.Generator().manual_seed(1))
    assert torch.allclose(same, x, atol=1e-5)
    flipped = random_resized_crop_flip(x, (1.0, 1.0), (1.0, 1.0), True, torch.Generator().manual_seed(1))
    for i in range(shape[0]):
        assert torch.allclose(flipped[i], x[i], atol=1e-5) or torch.allclose(flipped[i], x[i].flip(-1), atol=1e-5)


def test_crop_is_seeded_and_zooms():
    x = torch.arange(64.0).reshape(1, 1, 8, 8).repeat(4, 1, 1, 1)
    a = random_resized_crop_flip(x, (0.2, 0.5), (0.75, 4 / 3), True, torch.Generator().manual_seed(2))
    b = random_resized_crop_flip(x, (0.2, 0.5), (0.75, 4 / 3), True, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and a.shape == x.shape
    assert float(a.amax() - a.amin()) < 63.0  # a crop of at most half the area spans fewer values


@pytest.mark.parametrize("variant,ratio,scale,betas,clip,lr", [
    ("mae", 0.75, (0.2, 1.0), (0.9, 0.95), 0.0, 1.5e-4 * 32 / 256),
    ("simmim", 0.6, (0.67, 1.0), (0.9, 0.999), 5.0, 1e-4 * 32 / 512),
])
def test_variant_defaults_resolved_and_round_trip(variant, ratio, scale, betas, clip, lr):
    c = MAEConfig(variant=variant)
    assert (c.mask_ratio, c.crop_scale, c.betas, c.clip_grad) == (ratio, scale, betas, clip)
    assert c.lr == pytest.approx(lr) and c.image_size == 64 and c.backbone == BackboneSpec()
    assert c.weight_decay == 0.05 and c.norm_pix_loss is False and c.warmup_steps == 0
    assert MAEConfig.from_dict(c.to_dict()) == c
    assert MAEConfig(variant=variant, total_steps=800).warmup_steps == (40 if variant == "mae" else 10)


def test_optimizer_gets_betas_and_weight_decay_groups():
    method = make("mae2d")
    opt = build_optimizer(method)
    assert [g["betas"] for g in opt.param_groups] == [(0.9, 0.95)] * 2
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert method.lr_at(0) == pytest.approx(1e-3) and method.clip_grad is None
    assert make("simmim2d").clip_grad == 5.0
    cos = make("mae2d", total_steps=100, warmup_steps=10)
    assert (cos.lr_at(0), cos.lr_at(10), cos.lr_at(100)) == pytest.approx((0.0, 1e-3, 0.0))


def test_registered_builder():
    assert "masked" in get_spec("mae").description.lower()
    method = build_method("mae", {"variant": "simmim", "backbone": TINY_2D})
    assert isinstance(method, MAEMethod) and method.config.variant == "simmim"
    with pytest.raises(ValueError, match=r"unknown mae setting\(s\) \['foo'\]"):
        build_method("mae", {"foo": 1})


@pytest.mark.parametrize("settings,match", [
    ({"mask_ratio": 1.0}, r"mae setting 'mask_ratio' must be a number in \(0, 1\), got 1.0"),
    ({"mask_ratio": 0}, r"'mask_ratio' .* got 0"),
    ({"mask_ratio": True}, r"'mask_ratio' .* got True"),
    ({"backbone": {"img_size": 30, "patch_size": 8}}, r"mae setting 'backbone': img_size=30 .* patch_size=8"),
    ({"backbone": TINY_2D, "image_size": 64}, r"'image_size'=64: differs from the backbone's img_size=32"),
    ({"backbone": TINY_2D, "variant": "simmim", "simmim_mask_patch": 3}, r"not divisible by mae setting "
                                                                         r"'simmim_mask_patch'=3"),
    ({"variant": "simmim", "spatial_dims": 3}, r"'spatial_dims'=3: 3D volumes need variant 'mae'"),
    ({"variant": "simmim", "norm_pix_loss": True}, r"'norm_pix_loss'=True: needs variant 'mae'"),
    ({"variant": "byol"}, r"'variant'='byol'"),
    ({"spatial_dims": 4}, r"'spatial_dims'=4"),
    ({"spatial_dims": 3, "backbone": TINY_3D, "decoder_dim": 64}, r"'decoder_dim'=64: must be a multiple of 6"),
    ({"decoder_dim": 50, "decoder_heads": 4}, r"'decoder_dim'=50: must be a multiple of decoder_heads=4"),
    ({"crop_scale": (0.5, 0.2)}, r"'crop_scale'=\(0.5, 0.2\)"),
    ({"total_steps": 10, "warmup_steps": 20}, r"'warmup_steps'=20"),
    ({"foo": 1, "bar": 2}, r"unknown mae setting\(s\) \['bar', 'foo'\]"),
])
def test_bad_settings_name_the_setting(settings, match):
    with pytest.raises(ValueError, match=match):
        MAEConfig.from_dict(settings)


@pytest.mark.parametrize("case,shape,match", [
    ("mae2d", (2, 1, 32, 32, 32), r"spatial_dims=2.*got \(2, 1, 32, 32, 32\); for 3D volumes .* set spatial_dims=3"),
    ("simmim2d", (2, 1, 16, 16), r"spatial_dims=2, image_size=32.*got \(2, 1, 16, 16\)"),
    ("mae3d", (2, 1, 16, 16), r"spatial_dims=3.*got \(2, 1, 16, 16\); for 2D images .* set spatial_dims=2"),
    ("mae2d", (2, 3, 32, 32), r"in_chans=1"),
])
def test_wrong_input_dims_name_spatial_dims(case, shape, match):
    method = make(case)
    with pytest.raises(ValueError, match=match):
        step(method, torch.zeros(shape))


def test_simmim_mask_is_blockwise():
    method = make("simmim2d")
    mask, keep = method._mask_2d(3, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert keep.shape == (3, 0)
    grid = mask.reshape(3, 4, 4)
    assert torch.equal(grid, grid[:, ::2, ::2].repeat_interleave(2, 1).repeat_interleave(2, 2))  # 2x2 blocks
    pix = patch_mask_to_pixels(mask, (4, 4), 8)
    assert pix.float().mean() == 0.5
