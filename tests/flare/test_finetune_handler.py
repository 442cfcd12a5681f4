"""FinetuneHandler driven with FLModel objects (no FLARE runtime): wire key sets, shapes, meta, metrics, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fl_plugins.data import DataError
from fl_plugins.engine.finetune import federated_keys
from fl_plugins.flare.finetune_handler import FinetuneHandler, select_labelled
from fl_plugins.flare.handler import SiteContext
from fl_plugins.models.backbone import BackboneCheckpointError, BackboneSpec, create_backbone
from fl_plugins.models.factory import build_model
from fl_plugins.wire import META_NUM_STEPS as NUM_STEPS_KEY

UNET = {"arch": "unet", "num_classes": 3}
VIT_SEG = {"arch": "vit_seg", "num_classes": 3,
           "backbone": {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "depth": 2}}
TRAINER = {"task": "segmentation", "lr": 1e-3, "batch_size": 4, "steps_per_round": 2}


def _site(datalist: Path, tmp_path: Path, logged: list) -> SiteContext:
    return SiteContext("site-1", str(datalist), str(tmp_path), lambda t, v, s: logged.append((t, v, s)))


def _global(model_cfg: dict) -> FLModel:
    m = build_model(model_cfg)
    sd = m.state_dict()
    params = {k: sd[k].numpy().astype(np.float32) for k in federated_keys(m)}
    return FLModel(params=params, params_type=ParamsType.FULL, current_round=1, total_rounds=3)


@pytest.mark.parametrize("model_cfg,size", [(UNET, 32), (VIT_SEG, 32)])
def test_train_returns_exact_federated_keys_and_meta(synth_seg_data, tmp_path, model_cfg, size):
    logged: list = []
    h = FinetuneHandler(_site(synth_seg_data / "site-1" / "datalist.json", tmp_path, logged), model_cfg, TRAINER,
                        image_size=size, total_rounds=3)
    g = _global(model_cfg)
    out = h.train(g)
    assert set(out.params) == set(g.params)  # exactly the federated keys, nothing else crosses the wire
    assert not any(k.endswith("num_batches_tracked") for k in out.params)
    for k, v in out.params.items():
        assert v.dtype == np.float32 and v.shape == g.params[k].shape, k
    assert out.params_type == ParamsType.FULL
    assert out.meta[NUM_STEPS_KEY] == h.num_train_items > 0  # FedAvg weight = labelled samples n_c
    assert set(out.metrics) == {"val_dice"} and 0.0 <= out.metrics["val_dice"] <= 1.0
    assert any(not np.array_equal(out.params[k], g.params[k]) for k in out.params)  # it trained
    assert {t for t, _, _ in logged} == {"val_dice", "train_loss", "round_seconds"}
    assert all(step == 1 for _, _, step in logged)  # TensorBoard step = the server's round


def test_validate_sends_metrics_only(synth_seg_data, tmp_path):
    h = FinetuneHandler(_site(synth_seg_data / "site-1" / "datalist.json", tmp_path, []), UNET, TRAINER,
                        image_size=32)
    out = h.validate(_global(UNET))
    assert out.params == {} and set(out.metrics) == {"val_dice"}


def test_validation_uses_received_weights(synth_seg_data, tmp_path):
    """Validating the same global model twice gives the same Dice, whatever the site trained in between."""
    h = FinetuneHandler(_site(synth_seg_data / "site-1" / "datalist.json", tmp_path, []), UNET, TRAINER,
                        image_size=32)
    g = _global(UNET)
    first = h.validate(g).metrics["val_dice"]
    h.train(g)
    assert h.validate(g).metrics["val_dice"] == pytest.approx(first, abs=1e-6)


@pytest.mark.parametrize("n,expected_patients", [(None, None), (1, 1), (2, 2)])
def test_select_labelled(n, expected_patients):
    entries = [{"image": f"p{p}_f{f}", "label": "l", "patient": f"p{p}", "labelled": p != 9}
               for p in (3, 1, 2, 9) for f in (1, 2)]
    got = select_labelled(entries, n)
    patients = {e["patient"] for e in got}
    assert "p9" not in patients
    if expected_patients is None:
        assert patients == {"p1", "p2", "p3"}
    else:
        assert patients == {f"p{i}" for i in range(1, expected_patients + 1)}  # sorted, deterministic
        assert len(got) == 2 * expected_patients  # both frames of every chosen patient


def test_select_labelled_too_many():
    with pytest.raises(ValueError, match="num_labelled_patients=5 but the site has only 1"):
        select_labelled([{"image": "a", "label": "b", "patient": "p1"}], 5)


def _damaged(src: Path, tmp_path: Path, edit) -> Path:
    dl = json.loads(src.read_text())
    for sec in ("training", "validation", "test"):
        for e in dl[sec]:
            for k in ("image", "label"):
                if k in e:
                    e[k] = str((src.parent / e[k]).resolve())
    edit(dl, tmp_path)
    out = tmp_path / "datalist.json"
    out.write_text(json.dumps(dl))
    return out


def _label_out_of_range(dl, tmp_path):
    import nibabel as nib

    img = nib.load(dl["training"][0]["label"])
    arr = np.asarray(img.dataobj).copy()
    arr[0, 0, 0] = 7
    p = tmp_path / "bad_label.nii.gz"
    nib.save(nib.Nifti1Image(arr, img.affine), str(p))
    dl["training"][0]["label"] = str(p)


def _corrupt(dl, tmp_path):
    p = tmp_path / "corrupt.nii.gz"
    p.write_bytes(b"not a nifti file at all")
    dl["validation"][0]["image"] = str(p)


def _shape(dl, tmp_path):
    import nibabel as nib

    img = nib.load(dl["training"][0]["label"])
    arr = np.asarray(img.dataobj)[:-2]
    p = tmp_path / "short_label.nii.gz"
    nib.save(nib.Nifti1Image(arr, img.affine), str(p))
    dl["training"][0]["label"] = str(p)


@pytest.mark.parametrize("edit,match", [
    (lambda dl, t: dl["training"][0].update(image=str(t / "missing.nii.gz")), "missing.nii.gz"),
    (_corrupt, "corrupt.nii.gz"),
    (_label_out_of_range, "bad_label.nii.gz"),
    (_shape, "short_label.nii.gz"),
    (lambda dl, t: dl.update(validation=[]), "validation"),
])
def test_bad_site_data_is_stopped_before_training(synth_seg_data, tmp_path, edit, match):
    dl = _damaged(synth_seg_data / "site-1" / "datalist.json", tmp_path, edit)
    with pytest.raises((DataError, ValueError), match=match):
        FinetuneHandler(_site(dl, tmp_path, []), UNET, TRAINER, image_size=32)


def test_num_classes_mismatch_names_both(synth_seg_data, tmp_path):
    with pytest.raises(ValueError, match=r"num_classes=4 .*num_classes=3"):
        FinetuneHandler(_site(synth_seg_data / "site-1" / "datalist.json", tmp_path, []),
                        dict(UNET, num_classes=4), TRAINER, image_size=32)


def test_task_mismatch(synth_cls_data, tmp_path):
    with pytest.raises(ValueError, match="classification"):
        FinetuneHandler(_site(synth_cls_data / "site-1" / "datalist.json", tmp_path, []), dict(UNET, num_classes=2),
                        TRAINER, image_size=32)


def test_pretrained_checkpoint_that_does_not_fit_is_named(tmp_path):
    bad = BackboneSpec(name="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3)  # one block too many
    path = tmp_path / "wrong_backbone.pt"
    torch.save(create_backbone(bad).state_dict(), path)
    with pytest.raises(BackboneCheckpointError, match=r"wrong_backbone\.pt.*unexpected key"):
        build_model(dict(VIT_SEG, pretrained=str(path)))


def test_classification_handler(synth_cls_data, tmp_path):
    cfg = {"arch": "vit_classifier", "num_classes": 2, "head": "linear",
           "backbone": {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4, "depth": 1}}
    h = FinetuneHandler(_site(synth_cls_data / "site-1" / "datalist.json", tmp_path, []), cfg,
                        {"task": "classification", "lr": 1e-3, "batch_size": 8, "steps_per_round": 2},
                        image_size=32)
    out = h.train(_global(cfg))
    assert set(out.metrics) == {"val_accuracy", "val_balanced_accuracy", "val_auc"}
    assert set(out.params) == set(_global(cfg).params)


def _chain(h: FinetuneHandler, start: FLModel, rounds: range, run_id: str = "job-a") -> FLModel:
    """One site as its own server: each round's result is the next round's global model."""
    g = start
    for r in rounds:
        out = h.train(FLModel(params=g.params, params_type=ParamsType.FULL, current_round=r, meta={"run_id": run_id}))
        g = FLModel(params=out.params, params_type=ParamsType.FULL)
    h.wait_site_state()  # the state of the last round is written in the background
    return g


def test_a_resumed_run_continues_the_sites_optimiser_state_bit_for_bit(synth_seg_data, tmp_path, caplog):
    """Rounds 0-3 in one process == rounds 0-1, then a new handler (a resumed job: another process, another job
    folder) for rounds 2-3 that finds the site's state of round 1 under ``state_dir/<run id>/``."""
    dl = synth_seg_data / "site-1" / "datalist.json"
    trainer = {**TRAINER, "steps_per_round": 2}

    def handler(state_dir: Path | None) -> FinetuneHandler:
        site = SiteContext("site-1", str(dl), str(tmp_path / "job"), state_dir=str(state_dir) if state_dir else None)
        return FinetuneHandler(site, UNET, trainer, image_size=32, total_rounds=4)

    g0 = _global(UNET)
    full = _chain(handler(tmp_path / "state_full"), g0, range(4))
    first = _chain(handler(tmp_path / "state"), g0, range(2))
    saved = torch.load(tmp_path / "state" / "job-a" / "site-1.pt", weights_only=True)
    assert saved["round"] == 1 and saved["run_id"] == "job-a" and saved["state"]["optimizer"]["state"]
    with caplog.at_level("INFO"):
        resumed = _chain(handler(tmp_path / "state"), first, range(2, 4))
    assert "continued run job-a at round 2 with its saved site state" in caplog.text
    for k in full.params:
        np.testing.assert_array_equal(resumed.params[k], full.params[k], err_msg=k)

    # without the saved state (another run id): it warns and the optimiser starts fresh -> a different model
    caplog.clear()
    with caplog.at_level("WARNING"):
        fresh = _chain(handler(tmp_path / "state"), first, range(2, 4), run_id="job-b")
    assert "no saved site state of run job-b was found" in caplog.text
    assert any(not np.array_equal(fresh.params[k], full.params[k]) for k in full.params)
