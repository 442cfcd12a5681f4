"""The wire contract of every ready job is pinned: exact key sets (and shapes) each way, meta keys, metric keys.

Each case builds the job as users get it (``build_job`` -> exported FLARE configs), instantiates the exported
client executor and server persistor *from their exported class paths and args* (as a site and the server do),
and drives one round of each task with ``FLModel`` objects. What crosses the wire must equal
``tests/flare/wire_pins.json``, which was written from the tree before the plugin-architecture refactor (issue 9)
and must never change by accident. Regenerate deliberately with ``python tests/flare/test_wire_pins.py --write``.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

PINS = Path(__file__).with_name("wire_pins.json")

#: (case id, job name, overrides, data fixture). Overrides only shrink the run; they do not change the wire.
CASES: list[tuple[str, str, dict[str, Any], str]] = [
    ("finetune_seg_unet", "finetune_seg_unet", {"trainer": {"steps_per_round": 1}}, "seg"),
    ("finetune_seg_vit", "finetune_seg_vit", {"trainer": {"steps_per_round": 1}}, "seg"),
    ("finetune_cls", "finetune_cls", {"trainer": {"steps_per_round": 1}}, "cls"),
    ("finetune_cls_cnn", "finetune_cls_cnn", {"trainer": {"steps_per_round": 1}}, "cls"),
    ("dino_pretrain", "dino_pretrain", {"steps_per_round": 1}, "seg"),
    ("dino_pretrain_mode_B", "dino_pretrain", {"steps_per_round": 1, "dino": {"federation_mode": "B"}}, "seg"),
    ("dino_pretrain_mode_C", "dino_pretrain", {"steps_per_round": 1, "dino": {"federation_mode": "C"}}, "seg"),
    ("dinov2_pretrain", "dinov2_pretrain", {"steps_per_round": 1}, "seg"),
    ("unet_inpaint_pretrain", "unet_inpaint_pretrain", {"steps_per_round": 1, "unet_inpaint": {"batch_size": 8}},
     "seg"),
    ("mae_vit_pretrain", "mae_vit_pretrain", {"steps_per_round": 1}, "seg"),
    ("mae3d_pretrain", "mae3d_pretrain", {"steps_per_round": 1}, "vol"),
    ("simclr_pretrain", "simclr_pretrain", {"steps_per_round": 1, "simclr": {"batch_size": 8}}, "seg"),  # added with it
]


def write_volumes(root: Path, n: int = 24) -> Path:
    """One site of 3D MedMNIST-format volumes ``[n, 28, 28, 28]`` (2 classes): ``<root>/site-1/datalist.json``."""
    site = root / "site-1"
    site.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, (n, 28, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 2).reshape(-1, 1)
    np.savez(site / "vol.npz", **{f"{s}_images": images for s in ("train", "val", "test")},
             **{f"{s}_labels": labels for s in ("train", "val", "test")})
    entries = lambda split, k: [{"npz": "vol.npz", "split": split, "index": i, "label": int(labels[i, 0])}  # noqa: E731
                                for i in range(k)]
    dl = {"format": "medmnist", "task": "classification", "num_classes": 2, "modality_preset": "unit",
          "training": entries("train", n), "validation": entries("val", 8), "test": entries("test", 4)}
    (site / "datalist.json").write_text(json.dumps(dl))
    return root


@pytest.fixture(scope="module")
def synth_vol_data(tmp_path_factory) -> Path:
    return write_volumes(tmp_path_factory.mktemp("synth_vol"))


def _load(path: str) -> Any:
    mod, _, cls = path.rpartition(".")
    return getattr(importlib.import_module(mod), cls)


def _shapes(params: dict) -> dict[str, list[int]]:
    return {k: list(np.asarray(v).shape) for k, v in sorted(params.items())}


def observe(job: str, overrides: dict[str, Any], datalist: Path, tmp: Path) -> dict[str, Any]:
    """One round of every task of ``job`` on one site, as seen on the wire."""
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

    from fl_plugins.flare.handler import SiteContext
    from fl_plugins.flare.job_builder import build_job

    build_job(job, overrides).export_job(str(tmp / "export"))
    cfg_dir = next((tmp / "export").glob("*/app/config"))
    client = json.loads((cfg_dir / "config_fed_client.json").read_text())
    server = json.loads((cfg_dir / "config_fed_server.json").read_text())
    (entry,) = client["executors"]
    executor = _load(entry["executor"]["path"])(**entry["executor"].get("args", {}))
    persistor_cfg = next(c for c in server["components"] if c["id"] == "persistor")
    persistor = _load(persistor_cfg["path"])(**persistor_cfg.get("args", {}))
    global_model = persistor.build_global_model() if hasattr(persistor, "build_global_model") else None
    if global_model is None:  # the pre-refactor persistor: model_config + exclude_regex
        from fl_plugins.models.factory import build_model

        global_model = build_model(persistor.model_config)
    rx = persistor.exclude_regex
    sent = {k: v.detach().numpy() for k, v in global_model.state_dict().items() if not (rx and re.search(rx, k))}
    site = SiteContext("site-1", str(datalist), str(tmp / "site"))
    (tmp / "site").mkdir()
    handler = executor.build_handler(site)
    g = FLModel(params=sent, params_type=ParamsType.FULL, current_round=0, total_rounds=2)
    out = {"tasks": sorted(entry["tasks"]), "server_to_client": _shapes(sent)}
    res = handler.tasks()["train"](g)
    out["train"] = {"params": _shapes(res.params), "meta": sorted(res.meta), "metrics": sorted(res.metrics or {}),
                    "params_type": str(res.params_type)}
    res = handler.tasks()["validate"](g)
    out["validate"] = {"params": _shapes(res.params or {}), "metrics": sorted(res.metrics or {})}
    res = handler.tasks()["submit_model"](g)
    out["submit_model"] = {"params": _shapes(res.params)}
    return out


def _datalist(kind: str, seg: Path, cls: Path, vol: Path | None = None) -> Path:
    return {"seg": seg, "cls": cls, "vol": vol}[kind] / "site-1" / "datalist.json"


@pytest.mark.parametrize("case,job,overrides,data", CASES, ids=[c[0] for c in CASES])
def test_wire_contract_pinned(case, job, overrides, data, synth_seg_data, synth_cls_data, request, tmp_path):
    pinned = json.loads(PINS.read_text())[case]
    vol = request.getfixturevalue("synth_vol_data") if data == "vol" else None
    seen = observe(job, overrides, _datalist(data, synth_seg_data, synth_cls_data, vol), tmp_path)
    for part in pinned:
        assert seen[part] == pinned[part], f"{case}: the wire contract of {part!r} changed"
    assert set(seen) == set(pinned)


if __name__ == "__main__":  # deliberate regeneration of the pins
    import tempfile

    if "--write" not in sys.argv:
        sys.exit("usage: python tests/flare/test_wire_pins.py --write")
    from fl_plugins.data import generate_synthetic_multitask, generate_synthetic_segmentation

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        generate_synthetic_segmentation(root / "seg", num_sites=2, volumes_per_site=4, num_slices=12, size=64,
                                        num_classes=3, seed=0)
        generate_synthetic_multitask(root / "cls", class_counts=(2, 2), images_per_site=60, size=28, seed=0)
        write_volumes(root / "vol")
        pins = {}
        for case, job, overrides, data in CASES:
            tmp = root / "run" / case
            tmp.mkdir(parents=True)
            pins[case] = observe(job, overrides, _datalist(data, root / "seg", root / "cls", root / "vol"), tmp)
            print(case, {k: len(v) if isinstance(v, dict) else v for k, v in pins[case]["train"].items()})
        PINS.write_text(json.dumps(pins, indent=1, sort_keys=True) + "\n")
