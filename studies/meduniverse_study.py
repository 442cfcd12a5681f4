"""MedUniverse stage-wise fine-tuning on real data: does the shared base improve, stage by stage, for every task?

Four sites, one task each, built from ``../shared/data`` (``prepare``):

======  ==========================  =========  ====================================================================
site    task                        classes    data
======  ==========================  =========  ====================================================================
site-1  ``breastmnist``             2          breast ultrasound, 28 px (MedMNIST v2)
site-2  ``pneumoniamnist_recon..``  2          chest X-ray, 28 px (MedMNIST v2, rebuilt copy)
site-3  ``adrenalmnist3d``          2          adrenal CT volumes, 28^3 (3D: the 2D backbone over 8 slices)
site-4  ``acdc_position``           3          ACDC cine-MRI short-axis slices: basal / mid / apical third of the
                                               slices that hold the left ventricle (derived here), 64 px
======  ==========================  =========  ====================================================================

Each dataset's own train / validation / test splits (ACDC: its own training, validation and test patients).

``run`` (one arm, one seed): the package's ``StagewiseHandler`` s (the ``meduniverse_stagewise`` job's site code) and
its ``StageAggregator`` in one process (:func:`fl_plugins.flare.inprocess.run_stages`): ``--stages`` stages, every
participating site fine-tunes backbone + its own head for ``--steps-per-stage`` steps on ``--labelled`` labelled
items (drawn with the seed, the same in every arm), the server averages the backbones (uniform). The base of stage 0
is the masked-image-modelling export (arm ``mim``, ``--base``) or a random ViT (arm ``random``, the seed's).

Scoring a base ``B_b`` for a task (every base, every task, held-out tasks included): fine-tune ``B_b`` + a fresh head
on the task's labelled items (the stage trainer, AdamW, cosine over ``--probe-max-steps``), validate every
``--probe-every`` steps, stop after ``--probe-patience`` checks without a better validation AUC (never before
``--probe-min-steps``), test the best model
on the task's test split (accuracy, balanced accuracy, AUC; macro one-vs-rest AUC for 3 classes). Base 0 of the
random arm is plain fine-tuning from random init: the baseline every other cell is compared with.

``table`` prints the Markdown tables of ``docs/results/meduniverse_real_data.md`` from the result files.

Commands: see ``docs/results/meduniverse_real_data.md``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dino_finetune_study import install_dataset_cache, t_ci  # noqa: E402
from pretrain_finetune_study import labelled_datalists  # noqa: E402

from fl_plugins.atomic_io import atomic_write, atomic_write_json  # noqa: E402

MEDMNIST = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "medmnist"
#: site -> (task, source file name); acdc_position.npz is written by ``prepare``
TASKS = {"site-1": ("breastmnist", "breastmnist.npz"),
         "site-2": ("pneumoniamnist_reconstructed", "pneumoniamnist_reconstructed.npz"),
         "site-3": ("adrenalmnist3d", "adrenalmnist3d.npz"),
         "site-4": ("acdc_position", None)}
ARMS = ("mim", "random")
PROBE_SETTINGS = ("labelled", "probe_every", "probe_patience", "probe_max_steps")  # what a cached probe depends on
#: the study's ViT: timm ViT-tiny width, 6 blocks, 32 px, 4 px patches = 64 tokens (the finetune_cls / MAE study one)
BACKBONE = {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4, "in_chans": 1, "depth": 6}
IMAGE_SIZE = 32
KEY = "auc"  # model selection of the probes (validation); macro one-vs-rest for 3 classes


# -- data ----------------------------------------------------------------------------------------------------------


def acdc_position_npz(dataset_json: Path, out: Path, side: int = 64) -> dict[str, Any]:
    """Write ACDC as a 3-class slice task in MedMNIST layout: every short-axis slice that holds left-ventricle
    (label 3) pixels, labelled by its third of those slices (0 basal, 1 mid, 2 apical: ACDC stacks run base to
    apex); centre square crop, ``side`` px, uint8. ``train``/``val``/``test`` = ACDC's training / validation / test
    patients (ED and ES frames)."""
    import torch.nn.functional as F

    from fl_plugins.data.nifti import read_image, read_label

    ds = json.loads(dataset_json.read_text())
    root = dataset_json.parent
    arrays: dict[str, np.ndarray] = {}
    counts: dict[str, list[int]] = {}
    for split, section in (("train", "training"), ("val", "validation"), ("test", "test")):
        imgs, labs = [], []
        for e in ds[section]:
            img = read_image(root / e["image"]).astype(np.float32)
            seg = read_label(root / e["label"])
            z = [k for k in range(img.shape[-1]) if (seg[..., k] == 3).any()]
            for j, k in enumerate(z):
                sl = img[..., k]
                h, w = sl.shape
                m = min(h, w)
                sl = sl[(h - m) // 2:(h - m) // 2 + m, (w - m) // 2:(w - m) // 2 + m]
                lo, hi = float(sl.min()), float(sl.max())
                sl = (sl - lo) / (hi - lo) if hi > lo else np.zeros_like(sl)
                t = F.interpolate(torch.from_numpy(sl)[None, None], size=(side, side), mode="area")[0, 0]
                imgs.append(np.clip(np.round(t.numpy() * 255), 0, 255).astype(np.uint8))
                labs.append(min(2, 3 * j // len(z)))
        arrays[f"{split}_images"] = np.stack(imgs)
        arrays[f"{split}_labels"] = np.asarray(labs, dtype=np.int64)[:, None]
        counts[split] = np.bincount(labs, minlength=3).tolist()
    atomic_write(lambda f: np.savez_compressed(f, **arrays), out)
    return counts


def prepare(a: argparse.Namespace) -> int:
    from fl_plugins.data.split import split_medmnist

    out = Path(a.out)
    acdc = out / "acdc_position.npz"
    if not acdc.is_file():
        print(f"acdc_position: {acdc_position_npz(Path(a.acdc), acdc)} slices per class (train/val/test)")
    src = Path(a.medmnist)
    for site, (task, fname) in TASKS.items():
        npz = acdc if fname is None else src / fname
        with tempfile.TemporaryDirectory() as tmp:
            [dl] = split_medmnist(npz, tmp, num_sites=1, seed=0)
            d = json.loads(Path(dl).read_text())
        d["site"] = site
        (out / "sites" / site).mkdir(parents=True, exist_ok=True)
        atomic_write_json(d, out / "sites" / site / "datalist.json", indent=1)
        print(f"{site}: {task}: {d['num_classes']} classes, "
              f"{ {s: len(d[s]) for s in ('training', 'validation', 'test')} }")
    return 0


# -- one arm, one seed ---------------------------------------------------------------------------------------------


def model_cfg() -> dict[str, Any]:
    return {"arch": "vit_classifier", "num_classes": 2, "head": "linear", "backbone": dict(BACKBONE)}


def trainer_cfg(a: argparse.Namespace, seed: int) -> dict[str, Any]:
    """The ``meduniverse_stagewise`` job's trainer (lr, batch) with the study's steps and the seed."""
    from fl_plugins.flare import job_builder

    t = dict(job_builder.job_settings("meduniverse_stagewise", {})["trainer"])
    t.update(seed=seed, steps_per_stage=a.steps_per_stage)
    return t


def _digest(params: dict[str, np.ndarray]) -> str:
    h = hashlib.sha1()
    for k in sorted(params):
        h.update(k.encode())
        h.update(np.ascontiguousarray(params[k], dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def probe(a: argparse.Namespace, base: dict[str, np.ndarray], datalist: Path, seed: int) -> dict[str, Any]:
    """Fine-tune ``base`` + a fresh head on the datalist's labelled items with early stopping on validation AUC;
    the best model's test metrics (module docstring)."""
    from fl_plugins.data import build_split_datasets, labelled_entries, load_datalist
    from fl_plugins.engine.finetune import FinetuneConfig
    from fl_plugins.engine.stagewise import StageTrainer
    from fl_plugins.flare.handler import to_torch
    from fl_plugins.flare.ssl_handler import site_seed

    dl = load_datalist(datalist)
    train_ds, val_ds = build_split_datasets(dl, labelled_entries(dl["training"]), dl["validation"],
                                            image_size=IMAGE_SIZE)
    test_ds = _test_set(datalist)
    t = trainer_cfg(a, seed)
    t.pop("steps_per_stage")
    cfg = FinetuneConfig.from_dict({**t, "seed": site_seed(seed, datalist.parent.name) + 1, "task": "classification",
                                    "steps_per_round": a.probe_every, "total_steps": a.probe_max_steps,
                                    "model": {**model_cfg(), "num_classes": int(dl["num_classes"])}})
    tr = StageTrainer(cfg, train_ds, val_ds, num_slices=8)
    tr.method.load_federated_state_dict(to_torch(base))
    best, best_state, best_step, since, curve = -np.inf, None, 0, 0, []
    step = 0
    while step < a.probe_max_steps and (since < a.probe_patience or step < a.probe_min_steps):
        tr.train_steps(a.probe_every, global_step=step)
        step += a.probe_every
        score = float(tr.evaluate()[KEY])
        curve.append(round(score, 4))
        if score > best:
            best, best_state, best_step, since = score, copy.deepcopy(tr.model.state_dict()), step, 0
        else:
            since += 1
    if best_state is None:
        raise SystemExit(f"{datalist}: validation {KEY} was never finite ({curve}): does the validation split "
                         "hold every class?")
    tr.model.load_state_dict(best_state)
    test = tr.evaluate(test_ds)
    return {"test": {k: float(v) for k, v in test.items()}, "best_val_auc": best, "best_step": best_step,
            "steps_run": step, "val_curve": curve, "n_train": len(train_ds), "n_val": len(val_ds),
            "n_test": len(test_ds)}


def _test_set(datalist: Path) -> Any:
    from fl_plugins.data import build_dataset, load_datalist

    dl = load_datalist(datalist)
    return build_dataset(dl, dl["test"], image_size=IMAGE_SIZE, with_labels=True)


def run(a: argparse.Namespace) -> int:
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

    from fl_plugins.engine.stagewise import build_base_backbone
    from fl_plugins.flare.handler import SiteContext, to_numpy
    from fl_plugins.flare.inprocess import run_stages
    from fl_plugins.flare.stage_handler import StagewiseHandler

    install_dataset_cache()
    if a.arm == "mim" and not (a.base and Path(a.base).is_file()):
        raise SystemExit(f"--base {a.base!r} does not exist (the arm mim starts from the masked-image-modelling export)")
    out = Path(a.out)
    res = json.loads(out.read_text()) if out.is_file() else {}
    cache: dict[str, Any] = res.get("probes", {})
    for k in PROBE_SETTINGS:  # the cache key is base|site|seed: a probe made under other settings must not be reused
        if cache and res["settings"].get(k) != getattr(a, k):
            raise SystemExit(f"--out {out} holds probes made with --{k.replace('_', '-')} {res['settings'].get(k)}, "
                             f"not {getattr(a, k)}: give another --out")
    if cache and res["settings"].get("probe_min_steps", 0) > a.probe_min_steps:
        raise SystemExit(f"--out {out} holds probes made with --probe-min-steps {res['settings']['probe_min_steps']}, "
                         f"more than {a.probe_min_steps}: give another --out")
    # a raised minimum leaves every probe that ran at least that long where it stopped (training is seeded): only
    # the ones that stopped earlier run again
    cache = {k: v for k, v in cache.items() if v["steps_run"] >= a.probe_min_steps}
    sites = sorted(Path(a.data).glob("site-*/datalist.json"))
    if a.hold_out and a.hold_out not in {p.parent.name for p in sites}:
        raise SystemExit(f"--hold-out {a.hold_out!r} is not a site under {a.data}")
    tmp = Path(tempfile.mkdtemp(prefix="mu_study_"))
    dls, chosen = labelled_datalists(sites, a.labelled, a.seed, tmp / "labelled")
    t0 = time.perf_counter()
    torch.set_num_threads(a.threads)
    taking_part = [p for p in dls if p.parent.name != a.hold_out]
    handlers = [StagewiseHandler(SiteContext(site_name=p.parent.name, datalist_path=str(p),
                                             workspace_dir=str(tmp / "ws" / p.parent.name)),
                                 model=model_cfg(), trainer=trainer_cfg(a, a.seed), image_size=IMAGE_SIZE,
                                 num_slices=8, num_stages=a.stages) for p in taking_part]
    base0 = build_base_backbone({**model_cfg(), "pretrained": a.base if a.arm == "mim" else None}, seed=a.seed)
    base0 = to_numpy(base0.state_dict())
    print(f"[{time.perf_counter() - t0:6.0f}s] arm {a.arm} seed {a.seed}: sites {[h.site.site_name for h in handlers]}"
          f" (held out: {a.hold_out}); labelled {[h.num_train_items for h in handlers]}", flush=True)
    tests = {h.site.site_name: _test_set(Path(h.datalist)) for h in handlers}
    task_models: dict[str, dict[str, Any]] = {}

    def local_model(h: Any, s: int) -> None:  # the site's own fine-tuned backbone + head, after stage s
        task_models.setdefault(str(s + 1), {}).setdefault(h.site.site_name, {})["local_test"] = \
            h.trainer.evaluate(tests[h.site.site_name])

    def base_and_head(s: int, base: dict[str, np.ndarray]) -> None:  # the next base + each site's head
        for h in handlers:
            h.load_global(FLModel(params=base, params_type=ParamsType.FULL, current_round=s + 1))
            m = task_models[str(s + 1)][h.site.site_name]
            m["test"], m["val"] = h.trainer.evaluate(tests[h.site.site_name]), h.trainer.evaluate()
            print(f"[{time.perf_counter() - t0:6.0f}s] after stage {s}: {h.site.site_name} base {s + 1} + own head: "
                  f"test acc {m['test']['accuracy']:.3f} bal {m['test']['balanced_accuracy']:.3f} auc "
                  f"{m['test']['auc']:.3f} (local model: acc {m['local_test']['accuracy']:.3f})", flush=True)

    st = (run_stages(handlers, base0, a.stages, on_result=local_model, on_stage=base_and_head) if a.stages
          else {"bases": [base0], "stages": []})
    print(f"[{time.perf_counter() - t0:6.0f}s] {a.stages} stages done; losses "
          f"{[{k: round(v['train_loss'], 3) for k, v in r['sites'].items()} for r in st['stages']]}", flush=True)
    record = {"arm": a.arm, "seed": a.seed, "hold_out": a.hold_out, "labelled": chosen if a.labelled else "all",
              "settings": {k: v for k, v in vars(a).items() if k != "func"},
              "stages": st["stages"], "task_models": task_models, "probes": cache, "scores": {}}
    atomic_write_json(record, out, indent=1)
    for b, base in enumerate(st["bases"]):
        if a.probe_bases is not None and b not in a.probe_bases:
            continue
        d = _digest(base)
        for p in dls:
            if a.probe_sites and p.parent.name not in a.probe_sites:
                continue
            key = f"{d}|{p.parent.name}|{a.seed}"
            if key not in cache:
                cache[key] = probe(a, base, p, a.seed)
            record["scores"].setdefault(str(b), {})[p.parent.name] = cache[key]
            m = cache[key]
            print(f"[{time.perf_counter() - t0:6.0f}s] base {b} {p.parent.name}: test acc {m['test']['accuracy']:.3f} "
                  f"bal {m['test']['balanced_accuracy']:.3f} auc {m['test']['auc']:.3f} (best step {m['best_step']} "
                  f"of {m['steps_run']})", flush=True)
            record["seconds"] = time.perf_counter() - t0
            atomic_write_json(record, out, indent=1)
    return 0


# -- tables --------------------------------------------------------------------------------------------------------


def _cell(values: list[float], diffs: list[float] | None = None) -> str:
    """``mean (sd)`` [+ `` [paired mean, 95 % CI]``] of per-seed values."""
    if not values:
        return "-"
    c = f"{np.mean(values):.3f} ({np.std(values, ddof=1) if len(values) > 1 else 0:.3f})"
    ci = t_ci(diffs or [])
    if ci.get("n", 0) >= 2:
        c += f" [{ci['mean']:+.3f}, {ci['ci95'][0]:+.3f}..{ci['ci95'][1]:+.3f}]"
    return c


def _paired(a_by_seed: dict[int, float], b_by_seed: dict[int, float]) -> list[float]:
    return [a_by_seed[s] - b_by_seed[s] for s in sorted(set(a_by_seed) & set(b_by_seed))]


def _capped(r: dict, b: int, s: str) -> bool | None:
    """Whether a record's probe of base ``b`` on site ``s`` ended at the step cap instead of on patience
    (validation still improved within the last ``probe_patience`` checks); None when not probed."""
    v, st = r["scores"].get(str(b), {}).get(s), r["settings"]
    if v is None:
        return None
    return v["steps_run"] - v["best_step"] < st["probe_patience"] * st["probe_every"]


def _cap_line(recs: list[dict], b: int, sites: list[str]) -> str:
    got = [c for r in recs for s in sites if (c := _capped(r, b, s)) is not None]
    caps = sorted({r["settings"]["probe_max_steps"] for r in recs})
    return f"{sum(got)} of {len(got)} ended at the step cap ({'/'.join(map(str, caps))}) instead of on patience"


def table(a: argparse.Namespace) -> int:
    """Three Markdown tables (test ``--metric``, mean (sd) over seeds, [paired difference, 95 % CI]):
    1. every task fine-tuned to convergence from base 0: random init vs the MIM base;
    2. stage-wise: each task's model (the stage's aggregate + the site's own head) after every stage, MIM base vs
       random base, and the site's own fine-tuned model before averaging;
    3. leave-one-task-out: the held-out task fine-tuned from every base, against base 0."""
    recs = [json.loads(Path(f).read_text()) for f in a.inputs]
    m = a.metric
    main = {arm: {r["seed"]: r for r in recs if r["arm"] == arm and not r["hold_out"]} for arm in ARMS}
    sites = sorted({s for r in recs for b in r["scores"].values() for s in b} | {s for r in recs for st in
                   r.get("task_models", {}).values() for s in st})
    name = {s: f"{s} {TASKS.get(s, ('?',))[0]}" for s in sites}

    def probe_of(r: dict, b: int, s: str) -> float | None:
        v = r["scores"].get(str(b), {}).get(s)
        return None if v is None else float(v["test"][m])

    lines = [f"**1. Fine-tuned to convergence from base 0** (test {m}; paired difference MIM - random)\n",
             "| task | random init | MIM base [paired difference, 95 % CI] |", "|---|---|---|"]
    for s in sites:
        vals = {arm: {k: probe_of(r, 0, s) for k, r in main[arm].items() if probe_of(r, 0, s) is not None}
                for arm in ARMS}
        lines.append(f"| {name[s]} | {_cell(list(vals['random'].values()))} | "
                     f"{_cell(list(vals['mim'].values()), _paired(vals['mim'], vals['random']))} |")
    lines.append("\nConvergence: " + "; ".join(f"{arm}: {_cap_line(list(main[arm].values()), 0, sites)}"
                                            for arm in ARMS if main[arm]))
    nst = max([len(r.get("task_models", {})) for arm in ARMS for r in main[arm].values()] + [0])
    if nst:
        lines += [f"\n**2. Stage-wise: the stage's aggregate + the site's own head** (test {m}; per cell MIM base / "
                  "random base [paired difference MIM - random]; in brackets below: the site's own fine-tuned model "
                  "before averaging)\n", "| task | " + " | ".join(f"base {k + 1} (after stage {k})" for k in range(nst)) + " |",
                  "|---|" + "---|" * nst]
        for s in sites:
            cells, local = [], []
            for k in range(1, nst + 1):
                got = {arm: {sd: float(r["task_models"][str(k)][s]["test"][m]) for sd, r in main[arm].items()
                             if s in r.get("task_models", {}).get(str(k), {})} for arm in ARMS}
                loc = {arm: [float(r["task_models"][str(k)][s]["local_test"][m]) for r in main[arm].values()
                             if s in r.get("task_models", {}).get(str(k), {})] for arm in ARMS}
                cells.append(f"{_cell(list(got['mim'].values()))} / {_cell(list(got['random'].values()))}"
                             + (f" [{np.mean(_paired(got['mim'], got['random'])):+.3f}]"
                                if _paired(got['mim'], got['random']) else ""))
                local.append(" / ".join(f"{np.mean(loc[arm]):.3f}" if loc[arm] else "-" for arm in ARMS))
            lines.append(f"| {name[s]} | " + " | ".join(cells) + " |")
            lines.append("| (own model) | " + " | ".join(f"({c})" for c in local) + " |")
    loto = [r for r in recs if r["hold_out"]]
    for hold in sorted({r["hold_out"] for r in loto}):
        rs = [r for r in loto if r["hold_out"] == hold]
        nb = max(len(r["scores"]) for r in rs)
        lines += [f"\n**3. Leave-one-task-out: {name.get(hold, hold)} never takes part** ({len(rs)} seeds), "
                  f"fine-tuned to convergence from each base (test {m}; [paired difference to base 0, 95 % CI])\n",
                  "| base 0 (MIM) | " + " | ".join(f"base {b} (after stage {b - 1})" for b in range(1, nb)) + " |",
                  "|---|" + "---|" * (nb - 1)]
        b0 = {r["seed"]: probe_of(r, 0, hold) for r in rs}
        cells = [_cell(list(b0.values()))]
        for b in range(1, nb):
            vb = {r["seed"]: probe_of(r, b, hold) for r in rs if probe_of(r, b, hold) is not None}
            cells.append(_cell(list(vb.values()), _paired(vb, b0)))
        lines.append("| " + " | ".join(cells) + " |")
        lines.append("\nConvergence: " + "; ".join(f"base {b}: {_cap_line(rs, b, [hold])}" for b in range(nb)))
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="write the four sites' datalists (and the ACDC position task)")
    pp.add_argument("--out", required=True)
    pp.add_argument("--medmnist", default=str(MEDMNIST.resolve()))
    pp.add_argument("--acdc", default=str((MEDMNIST / ".." / "acdc" / "dataset.json").resolve()))
    pp.set_defaults(func=prepare)
    pr = sub.add_parser("run", help="stage-wise fine-tuning of one arm and seed, then every base scored")
    pr.add_argument("--data", required=True, help="folder of site-*/datalist.json (prepare's <out>/sites)")
    pr.add_argument("--arm", required=True, choices=ARMS)
    pr.add_argument("--base", help="the masked-image-modelling backbone export (arm mim)")
    pr.add_argument("--seed", type=int, required=True)
    pr.add_argument("--labelled", type=int, default=100, help="labelled training items per site, drawn per seed")
    pr.add_argument("--stages", type=int, default=3, help="0: score the initial base only (the baseline)")
    pr.add_argument("--steps-per-stage", type=int, default=50)
    pr.add_argument("--hold-out", help="a site that never takes part (leave-one-task-out); still scored")
    pr.add_argument("--probe-sites", nargs="*", help="score only these sites (default: every site)")
    pr.add_argument("--probe-bases", type=int, nargs="*", help="score only these bases (default: every base)")
    pr.add_argument("--probe-every", type=int, default=25)
    pr.add_argument("--probe-patience", type=int, default=3)
    pr.add_argument("--probe-max-steps", type=int, default=300)
    pr.add_argument("--probe-min-steps", type=int, default=0, help="no early stop before this step")
    pr.add_argument("--threads", type=int, default=1)
    pr.add_argument("--out", required=True, help="result JSON (rewritten after every probe; rerun to reuse probes)")
    pr.set_defaults(func=run)
    pt = sub.add_parser("table", help="Markdown tables from result files")
    pt.add_argument("inputs", nargs="+")
    pt.add_argument("--metric", default="accuracy", choices=("accuracy", "balanced_accuracy", "auc"))
    pt.set_defaults(func=table)
    a = p.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    return int(a.func(a))


if __name__ == "__main__":
    sys.exit(main())
