"""StagewiseHandler with FLModel objects: sites with 2, 3 and 5 classes (and a 3D site) answer the same base with
exactly its backbone keys, the head never leaves the site and survives a restart, and a site whose class count is 0,
1 or contradicts its labels gets an error naming the datalist and the value."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fl_plugins.engine.stagewise import build_base_backbone
from fl_plugins.flare.handler import SiteContext
from fl_plugins.flare.stage_handler import HEAD_FILE, StagewiseHandler
from fl_plugins.wire import META_HEAD_SHAPE, META_NUM_CLASSES, META_NUM_STEPS, META_SPATIAL_DIMS, META_STAGE

#: CPU-tiny backbone (16 px, patch 4, 1 block): the handler logic, not learning, is under test
MODEL = {"arch": "vit_classifier", "num_classes": 2, "head": "linear",
         "backbone": {"name": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4, "depth": 1}}
TRAINER = {"lr": 1e-3, "batch_size": 8, "steps_per_stage": 1}
EMBED = 192


def write_volume_site(root: Path, n: int = 8) -> Path:
    """One site of 3D MedMNIST-format volumes ``[n, 16, 16, 16]``, 2 classes; returns its datalist."""
    site = root / "site-vol"
    site.mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = (np.arange(n) % 2).reshape(-1, 1)
    np.savez(site / "vol.npz", **{f"{s}_images": rng.integers(0, 256, (n, 16, 16, 16), dtype=np.uint8)
                                  for s in ("train", "val", "test")},
             **{f"{s}_labels": labels for s in ("train", "val", "test")})
    rows = [{"npz": "vol.npz", "split": "train", "index": i, "label": int(labels[i, 0])} for i in range(n)]
    dl = {"format": "medmnist", "task": "classification", "num_classes": 2, "modality_preset": "unit",
          "dataset": "synthetic_volumes", "training": rows,
          "validation": [dict(r, split="val") for r in rows[:4]], "test": []}
    (site / "datalist.json").write_text(json.dumps(dl))
    return site / "datalist.json"


@pytest.fixture(scope="module")
def multitask(tmp_path_factory) -> dict[int, Path]:
    """Three synthetic sites with 2, 3 and 5 classes: class count -> datalist."""
    from fl_plugins.data import generate_synthetic_multitask

    paths = generate_synthetic_multitask(tmp_path_factory.mktemp("multitask"), class_counts=(2, 3, 5),
                                         images_per_site=36, size=16, seed=0)
    return dict(zip((2, 3, 5), paths))


@pytest.fixture(scope="module")
def base() -> dict[str, np.ndarray]:
    net = build_base_backbone(MODEL, seed=0)
    return {k: v.numpy() for k, v in net.state_dict().items()}


def _handler(datalist: Path, ws: Path, site: str = "site-1") -> StagewiseHandler:
    ws.mkdir(parents=True, exist_ok=True)
    return StagewiseHandler(SiteContext(site, str(datalist), str(ws)), MODEL, TRAINER, image_size=16, num_slices=4)


def _task(base, stage: int = 0, **meta) -> FLModel:
    return FLModel(params=dict(base), params_type=ParamsType.FULL, current_round=stage, meta={META_STAGE: stage,
                                                                                              **meta})


@pytest.mark.parametrize("classes", [2, 3, 5])
def test_sites_with_2_3_5_classes_return_exactly_the_backbone(classes, multitask, base, tmp_path):
    h = _handler(multitask[classes], tmp_path)
    report = h.report_task(FLModel(params={}))
    assert report.params == {} and report.meta[META_NUM_CLASSES] == classes and report.meta[META_SPATIAL_DIMS] == 2
    out = h.stage_finetune(_task(base, **{META_HEAD_SHAPE: [classes, EMBED]}))
    assert set(out.params) == set(base) and all(k.startswith("backbone.") for k in out.params)
    assert not any(k.startswith("head.") for k in out.params)  # the head never leaves the site
    assert all(out.params[k].shape == base[k].shape and out.params[k].dtype == np.float32 for k in base)
    assert out.params_type == ParamsType.FULL and out.current_round == 0
    assert out.meta[META_NUM_STEPS] == h.num_train_items and out.meta[META_NUM_CLASSES] == classes
    assert {"val_accuracy", "val_balanced_accuracy", "val_auc"} <= set(out.metrics)  # the received base, own head
    assert tuple(h.method.model.head.weight.shape) == (classes, EMBED)
    assert not np.array_equal(out.params["backbone.cls_token"], base["backbone.cls_token"])  # it fine-tuned


def test_a_3d_site_trains_the_same_2d_backbone_over_slices(base, tmp_path):
    h = _handler(write_volume_site(tmp_path / "data"), tmp_path / "ws")
    assert h.report_task(FLModel(params={})).meta[META_SPATIAL_DIMS] == 3
    out = h.stage_finetune(_task(base))
    assert set(out.params) == set(base) and all(out.params[k].shape == base[k].shape for k in base)
    assert h.validate(_task(base, stage=1)).metrics["val_accuracy"] >= 0


def test_head_key_in_the_received_base_and_a_wrong_head_shape_are_refused(multitask, base, tmp_path):
    h = _handler(multitask[3], tmp_path)
    with pytest.raises(ValueError, match=r"head key\(s\) \['head.weight'\].*never sent"):
        h.stage_finetune(_task({**base, "head.weight": np.zeros((3, EMBED), np.float32)}))
    with pytest.raises(ValueError, match=r"expects a head of shape \[5, 192\] but this site's head is \[3, 192\]"):
        h.stage_finetune(_task(base, **{META_HEAD_SHAPE: [5, EMBED]}))


def test_validate_scores_the_base_with_the_own_head_and_sends_no_params(multitask, base, tmp_path):
    h = _handler(multitask[2], tmp_path)
    out = h.validate(_task(base, stage=2))
    assert out.params == {} and out.current_round == 2
    assert set(out.metrics) == {"val_accuracy", "val_balanced_accuracy", "val_auc"}  # binary: the AUC too


def test_head_persists_across_a_restart(multitask, base, tmp_path):
    first = _handler(multitask[5], tmp_path)
    first.stage_finetune(_task(base))
    head = {k: v.clone() for k, v in first.trainer.head_state().items()}
    assert (tmp_path / HEAD_FILE).is_file() and not list(tmp_path.glob(f".{HEAD_FILE}.*"))
    saved = torch.load(tmp_path / HEAD_FILE, weights_only=True)
    assert saved["num_classes"] == 5 and saved["stage"] == 0 and set(saved["head"]) == {"head.weight", "head.bias"}

    restarted = _handler(multitask[5], tmp_path)  # a new handler object, the same workspace
    assert restarted.head_stage == 0
    for k, v in restarted.trainer.head_state().items():
        assert torch.equal(v, head[k]), k
    fresh = _handler(multitask[5], tmp_path / "other")  # another workspace: a fresh head (same seed, same site)
    assert fresh.head_stage is None and not torch.equal(fresh.trainer.head_state()["head.weight"], head["head.weight"])


def test_a_saved_head_of_another_task_is_not_loaded(multitask, base, tmp_path, caplog):
    _handler(multitask[5], tmp_path).stage_finetune(_task(base))
    with caplog.at_level(logging.WARNING, logger="fl_plugins.flare.stage_handler"):
        h = _handler(multitask[3], tmp_path)
    assert h.head_stage is None and "starting a fresh head" in caplog.text


def _edited(src: Path, dst: Path, **changes) -> Path:
    dl = json.loads(src.read_text())
    dl.update(changes)
    for sec in ("training", "validation", "test"):  # keep the .npz where it is
        for e in dl[sec]:
            e["npz"] = str((src.parent / e["npz"]).resolve())
            if dl["num_classes"] == 1:
                e["label"] = 0  # one class, consistently labelled
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "datalist.json").write_text(json.dumps(dl))
    return dst / "datalist.json"


@pytest.mark.parametrize(("classes", "changes", "message"), [
    (2, {"num_classes": 0}, r"field 'num_classes' must be an integer >= 1, got 0"),
    (2, {"num_classes": 1}, r"declares num_classes=1; a stage-wise site needs .* >= 2 classes"),
    (5, {"num_classes": 3}, r"field 'label' = [34] is not a class id in range\(num_classes=3\)"),
    (2, {"task": "segmentation", "format": "decathlon"}, r"(task 'segmentation'|required field 'image')"),
])
def test_bad_class_count_is_a_clear_error_naming_the_datalist(classes, changes, message, multitask, tmp_path):
    dl = _edited(multitask[classes], tmp_path / "bad", **changes)
    with pytest.raises(ValueError, match=message) as err:
        _handler(dl, tmp_path / "ws", site="site-9")
    assert str(dl) in str(err.value) and "site-9" in str(err.value)


def test_a_resumed_job_finds_the_head_of_its_run(multitask, base, tmp_path):
    """A resumed job runs in another job folder; its first stage task names the run, and the head saved under the
    site's per-run state folder continues."""
    state = tmp_path / "fl_plugins_state"

    def handler(ws: Path) -> StagewiseHandler:
        ws.mkdir(parents=True, exist_ok=True)
        return StagewiseHandler(SiteContext("site-1", str(multitask[3]), str(ws), state_dir=str(state)), MODEL,
                                TRAINER, image_size=16, num_slices=4)

    first = handler(tmp_path / "job-a")
    first.stage_finetune(_task(base, 0, run_id="job-a"))
    head = {k: v.clone() for k, v in first.trainer.head_state().items()}
    assert (state / "job-a" / f"site-1_{HEAD_FILE}").is_file()

    resumed = handler(tmp_path / "job-b")  # the resumed job: a new job folder, the same run
    assert resumed.head_stage is None
    resumed.validate(_task(base, 1, run_id="job-a"))
    assert resumed.head_stage == 0
    for k, v in resumed.trainer.head_state().items():
        assert torch.equal(v, head[k]), k
    other = handler(tmp_path / "job-c")
    other.validate(_task(base, 1, run_id="job-c"))  # another run: a fresh head
    assert other.head_stage is None


class _Recording:
    """A handler wrapper that keeps every result it answers (optionally spoiling one key with NaN)."""

    def __init__(self, inner: StagewiseHandler, spoil: bool = False) -> None:
        self.inner, self.spoil, self.answers = inner, spoil, []
        self.site, self.num_classes, self.LOSS_META_KEY = inner.site, inner.num_classes, inner.LOSS_META_KEY

    def stage_finetune(self, task: FLModel) -> FLModel:
        assert task.meta[META_HEAD_SHAPE] == [self.num_classes, EMBED] and not any(k.startswith("head.")
                                                                                    for k in task.params)
        out = self.inner.stage_finetune(task)
        if self.spoil:
            k = sorted(out.params)[0]
            out.params[k] = np.full_like(out.params[k], np.nan)
        self.answers.append({k: v.copy() for k, v in out.params.items()})
        return out


def test_run_stages_in_process_averages_the_accepted_backbones_and_leaves_out_a_bad_one(multitask, base, tmp_path):
    from fl_plugins.flare.inprocess import run_stages

    hs = [_Recording(_handler(multitask[c], tmp_path / f"ws{c}", site=f"site-{c}")) for c in (2, 3, 5)]
    hs[2].spoil = True  # site-5 answers NaN: rejected by the StageAggregator, absent from the average
    seen, staged = [], []
    out = run_stages(hs, base, num_stages=2, on_result=lambda h, s: seen.append((h.site.site_name, s)),
                     on_stage=lambda s, b: staged.append((s, b)))
    assert seen == [(f"site-{c}", s) for s in (0, 1) for c in (2, 3, 5)]
    assert [s for s, _ in staged] == [0, 1] and all(b is out["bases"][s + 1] for s, b in staged)
    assert len(out["bases"]) == 3 and [r["stage"] for r in out["stages"]] == [0, 1]
    for s, rec in enumerate(out["stages"]):
        assert rec["contributors"] == ["site-2", "site-3"] and rec["rejected"] == {"site-5": "non_finite"}
        assert rec["weights"] == {"site-2": 0.5, "site-3": 0.5}
        want = {k: (hs[0].answers[s][k].astype(np.float64) + hs[1].answers[s][k]) / 2 for k in base}
        got = out["bases"][s + 1]
        assert set(got) == set(base)
        for k in base:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7)
    assert not np.allclose(out["bases"][2]["backbone.cls_token"], base["backbone.cls_token"])
    with pytest.raises(ValueError, match="num_stages"):
        run_stages(hs, base, num_stages=0)
