"""Model shapes, gradients, pretrained-backbone loading and factory validation (tiny sizes: CPU, seconds)."""

from __future__ import annotations

import pytest
import torch

from fl_plugins.models import (
    BackboneCheckpointError,
    BackboneSpec,
    ViTClassifier,
    ViTSegmenter,
    build_model,
    create_backbone,
    evenly_spaced_blocks,
    model_summary,
)


def _spec(img: int = 32, patch: int = 8, depth: int = 2) -> dict:
    return {"img_size": img, "patch_size": patch, "depth": depth}


def _cfg(arch: str, img: int = 32, patch: int = 8, **kw) -> dict:
    if arch == "unet":
        return {"arch": "unet", "num_classes": 3, **kw}
    return {"arch": arch, "num_classes": 3, "backbone": _spec(img, patch), **kw}


SHAPE_CASES = [(a, img, p) for a in ("vit_seg", "vit_classifier") for img in (32, 64) for p in (8, 16)] + [
    ("unet", img, None) for img in (32, 64)
]


@pytest.mark.parametrize(("arch", "img", "patch"), SHAPE_CASES)
def test_output_shape(arch: str, img: int, patch: int | None) -> None:
    model = build_model(_cfg(arch, img, patch)).eval()
    with torch.no_grad():
        y = model(torch.randn(2, 1, img, img))
    assert y.shape == ((2, 3, img, img) if arch != "vit_classifier" else (2, 3))


@pytest.mark.parametrize("img", [32, 48])
def test_vit_seg_other_input_size_than_spec(img: int) -> None:
    model = build_model(_cfg("vit_seg", 32, 8)).eval()  # pos-embed interpolated (dynamic_img_size)
    with torch.no_grad():
        assert model(torch.randn(1, 1, img, 32)).shape == (1, 3, img, 32)


def test_vit_seg_rejects_non_multiple_of_patch() -> None:
    model = build_model(_cfg("vit_seg", 32, 8))
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        model(torch.randn(1, 1, 36, 36))


def test_vit_seg_rejects_unsupported_patch_size() -> None:
    with pytest.raises(ValueError, match="patch sizes"):
        ViTSegmenter(BackboneSpec(img_size=30, patch_size=6, depth=1), num_classes=2)


@pytest.mark.parametrize(
    ("depth", "expected"), [(12, [2, 5, 8, 11]), (6, [1, 2, 4, 5]), (2, [0, 0, 1, 1]), (1, [0, 0, 0, 0])]
)
def test_evenly_spaced_blocks(depth: int, expected: list[int]) -> None:
    assert evenly_spaced_blocks(depth) == expected


GRAD_CASES = [
    {"arch": "unet", "num_classes": 3, "channels": [8, 16, 32], "strides": [2, 2]},
    {"arch": "vit_seg", "num_classes": 3, "backbone": _spec(32, 8)},
    {"arch": "vit_seg", "num_classes": 3, "backbone": _spec(32, 16)},
    {"arch": "vit_classifier", "num_classes": 3, "head": "mlp", "backbone": _spec(32, 8)},
    {"arch": "vit_classifier", "num_classes": 3, "head": "linear", "backbone": _spec(32, 16)},
]


@pytest.mark.parametrize("cfg", GRAD_CASES, ids=lambda c: f"{c['arch']}-p{c.get('backbone', {}).get('patch_size')}")
def test_every_trainable_parameter_gets_a_finite_gradient(cfg: dict) -> None:
    torch.manual_seed(0)
    model = build_model(cfg).train()
    out = model(torch.randn(2, 1, 32, 32))
    assert torch.isfinite(out).all()
    out.float().pow(2).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing}"
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradient for {bad}"


@pytest.mark.parametrize("arch", ["vit_seg", "vit_classifier"])
def test_parameter_prefixes(arch: str) -> None:
    model = build_model(_cfg(arch))
    second = {"vit_seg": "decoder.", "vit_classifier": "head."}[arch]
    prefixes = {n.split(".", 1)[0] + "." for n in model.state_dict()}
    assert prefixes == {"backbone.", second}


def test_frozen_backbone_linear_probe() -> None:
    model = build_model(_cfg("vit_classifier", freeze_backbone=True)).train()
    assert not model.backbone.training  # stays in eval mode
    assert all(not p.requires_grad for p in model.backbone.parameters())
    model(torch.randn(2, 1, 32, 32)).sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.head.parameters())


@pytest.mark.parametrize("arch", ["vit_seg", "vit_classifier"])
def test_pretrained_backbone_round_trip(tmp_path, arch: str) -> None:
    spec = BackboneSpec(**_spec())
    torch.manual_seed(1)
    src = create_backbone(spec)
    path = tmp_path / "backbone.pt"
    torch.save(src.state_dict(), path)
    if arch == "vit_seg":
        model = ViTSegmenter(spec, num_classes=3, pretrained=str(path))
    else:
        model = ViTClassifier(spec, num_classes=3, pretrained=path)
    for k, v in src.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v), k
    via_factory = build_model(_cfg(arch, pretrained=str(path)))
    for k, v in src.state_dict().items():
        assert torch.equal(via_factory.backbone.state_dict()[k], v), k


def _corrupt(sd: dict, how: str) -> tuple[dict, str]:
    sd = dict(sd)
    if how == "missing":
        sd.pop("blocks.1.mlp.fc2.bias")
        return sd, "blocks.1.mlp.fc2.bias"
    if how == "extra":
        sd["decoder.stray.weight"] = torch.zeros(3)
        return sd, "decoder.stray.weight"
    sd["patch_embed.proj.weight"] = torch.zeros(192, 3, 8, 8)  # 3 input channels instead of 1
    return sd, "patch_embed.proj.weight"


@pytest.mark.parametrize("how", ["missing", "extra", "shape"])
def test_bad_pretrained_checkpoint_names_file_and_key(tmp_path, how: str) -> None:
    spec = BackboneSpec(**_spec())
    sd, key = _corrupt(create_backbone(spec).state_dict(), how)
    path = tmp_path / f"bad_{how}.pt"
    torch.save(sd, path)
    with pytest.raises(BackboneCheckpointError) as e:
        ViTSegmenter(spec, num_classes=3, pretrained=path)
    assert str(path) in str(e.value) and key in str(e.value)


def test_missing_pretrained_file(tmp_path) -> None:
    with pytest.raises(BackboneCheckpointError, match="does not exist"):
        build_model(_cfg("vit_classifier", pretrained=str(tmp_path / "nope.pt")))


@pytest.mark.parametrize(
    ("cfg", "named"),
    [
        ({"arch": "resnet", "num_classes": 2}, "'arch'"),
        ({"num_classes": 2}, "'arch'"),
        ({"arch": "unet", "num_classes": 2, "chanels": [8, 16]}, "chanels"),
        ({"arch": "vit_seg", "num_classes": 2, "head": "mlp"}, "head"),
        ({"arch": "vit_classifier", "num_classes": 2, "backbone": {"patch": 8}}, "patch"),
        ({"arch": "unet"}, "num_classes"),
        ({"arch": "unet", "num_classes": 1}, "num_classes"),
        ({"arch": "vit_classifier", "num_classes": 2, "head": "transformer", "backbone": _spec()}, "transformer"),
    ],
)
def test_build_model_errors_name_the_bad_key(cfg: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        build_model(cfg)


def test_build_model_error_lists_valid_keys() -> None:
    with pytest.raises(ValueError) as e:
        build_model({"arch": "unet", "num_classes": 2, "bogus": 1})
    assert "bogus" in str(e.value) and "num_res_units" in str(e.value)
    with pytest.raises(ValueError) as e:
        build_model({"arch": "vitseg", "num_classes": 2})
    assert "vit_seg" in str(e.value) and "unet" in str(e.value)


def test_model_summary_mentions_parts() -> None:
    s = model_summary(build_model(_cfg("vit_seg")))
    assert "backbone" in s and "decoder" in s and "ViTSegmenter" in s


VIT_CLS = {"arch": "vit_classifier", "num_classes": 3,
           "backbone": {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "in_chans": 1, "depth": 2}}


def test_vit_classifier_of_volumes_runs_the_2d_backbone_over_slices() -> None:
    """``spatial_dims=3``: the same state keys and shapes as the 2D classifier (a 2D export loads, the export is 2D),
    logits [B, num_classes] for volumes, every trainable parameter gets a finite gradient, and the volume's logits
    are the head of the mean of its selected slices' embeddings."""
    m2, m3 = build_model(VIT_CLS), build_model({**VIT_CLS, "spatial_dims": 3, "num_slices": 4})
    assert {k: v.shape for k, v in m2.state_dict().items()} == {k: v.shape for k, v in m3.state_dict().items()}
    m3.load_state_dict(m2.state_dict())
    x = torch.randn(2, 1, 16, 32, 32)
    out = m3(x)
    assert out.shape == (2, 3)
    out.sum().backward()
    for name, p in m3.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    m2.eval(), m3.eval()
    with torch.no_grad():
        idx = [0, 5, 10, 15]  # 4 evenly spaced slices of 16, first and last included
        emb = torch.stack([m2.backbone(x[:, :, i]) for i in idx], dim=1).mean(dim=1)
        torch.testing.assert_close(m3(x), m2.head(emb))


@pytest.mark.parametrize("cfg, named", [
    ({**VIT_CLS, "spatial_dims": 4}, "spatial_dims"),
    ({**VIT_CLS, "num_slices": 4}, "num_slices"),
    ({**VIT_CLS, "spatial_dims": 3, "num_slices": 0}, "num_slices"),
])
def test_vit_classifier_dims_settings_are_checked(cfg: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        build_model(cfg)


def test_backbone_spec_is_strict_and_round_trips() -> None:
    from fl_plugins.models.backbone import BackboneSpec

    with pytest.raises(ValueError, match=r"^unknown backbone setting\(s\) \['width'\]; known: \['depth', "):
        BackboneSpec.from_dict({"width": 3})
    spec = BackboneSpec.from_dict({"img_size": 32, "depth": 2})
    assert (spec.img_size, spec.depth, spec.patch_size) == (32, 2, 8)
    assert BackboneSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match=r"img_size=30 must be a positive multiple of patch_size=8"):
        BackboneSpec.from_dict({"img_size": 30})
