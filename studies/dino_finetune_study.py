"""Few-label federated fine-tuning study: ViT from a federated-DINO backbone vs ViT from random init vs U-Net.

Runs the federated fine-tuning of the ``finetune_seg_vit`` / ``finetune_seg_unet`` jobs *in one process*: the same
``FinetuneHandler`` code the FLARE executor wraps, driven by ``fl_plugins.flare.inprocess.run_fedavg`` (FedAvg
weighted by ``NUM_STEPS_CURRENT_ROUND`` = labelled items per site, as nvflare's ``FedAvg``), sites trained one
after another. After the last round the final global model is evaluated on every site's ``test`` split with
``fl_plugins.engine.evaluation.evaluate_sites`` (per-volume Dice, mean over foreground classes).

Arms (same data, rounds, steps, seeds):

* ``dino``   -- ``finetune_seg_vit`` with ``model.pretrained`` = the exported DINO teacher backbone;
* ``random`` -- ``finetune_seg_vit`` from random init (same backbone spec);
* ``unet``   -- ``finetune_seg_unet`` from scratch.

Settings other than rounds/steps/seed/num_classes are the jobs' registered defaults (``JOBS`` in
``fl_plugins.flare.job_builder``). The ViT backbone spec is the ``dino_pretrain`` job's (must match the export).
A seed sets the initial global model (the server's init in a FLARE run), the sites' shuffling/augmentation and
dropout (``trainer.seed``).

Example::

    python studies/dino_finetune_study.py --data /work/runs/dino_study/acdc3_l1 \
        --backbone /work/runs/dino_study/dino_vit.pt --seeds 0 1 2 --rounds 10 --steps 20 \
        --out /work/runs/dino_study/ft_l1.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fl_plugins.atomic_io import atomic_write_json

ARMS = ("dino", "random", "unet")


def install_dataset_cache() -> None:
    """Reuse decoded datasets across the study's runs (one process, many runs over the same files).

    ``build_dataset`` is memoised on its arguments (the datasets are deterministic; augmentation happens in the
    trainer on copies) and the deep ``validate_datalist`` check runs once per (datalist, sections). Only decoding
    and checking of the same NIfTI files is skipped; what every run trains and evaluates on is unchanged.
    """
    import fl_plugins.data as data_pkg
    import fl_plugins.data.build as build_mod

    orig_build, orig_validate = build_mod.build_dataset, data_pkg.validate_datalist
    built: dict[str, Any] = {}
    validated: set[str] = set()

    def build_dataset(dl, entries, image_size=64, with_labels=True, cache=True):  # type: ignore[no-untyped-def]
        key = json.dumps([dl.get("format"), dl.get("task"), dl.get("modality_preset"), entries, image_size,
                          with_labels, cache], sort_keys=True, default=str)
        if key not in built:
            built[key] = orig_build(dl, entries, image_size=image_size, with_labels=with_labels, cache=cache)
        return built[key]

    def validate_datalist(dl, sections=("training", "validation"), deep=False):  # type: ignore[no-untyped-def]
        key = json.dumps([dl, list(sections), deep], sort_keys=True, default=str)
        if key not in validated:
            orig_validate(dl, sections=sections, deep=deep)
            validated.add(key)

    build_mod.build_dataset = build_dataset
    data_pkg.build_dataset = build_dataset
    data_pkg.validate_datalist = validate_datalist


def arm_settings(arm: str, backbone: str | None, num_classes: int, steps: int, seed: int,
                 lr: float | None, batch_size: int | None) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(model config, trainer config, image size) of an arm, from the registered job defaults."""
    from fl_plugins.flare.job_builder import JOBS

    job = "finetune_seg_unet" if arm == "unet" else "finetune_seg_vit"
    d = copy.deepcopy(JOBS[job].defaults)
    model = d["model"]
    model["num_classes"] = num_classes
    if arm != "unet":
        model["backbone"] = copy.deepcopy(JOBS["dino_pretrain"].defaults["dino"]["backbone"])
        model["pretrained"] = str(Path(backbone).resolve()) if arm == "dino" else None
    trainer = dict(d["trainer"], steps_per_round=steps, seed=seed)
    if lr is not None:
        trainer["lr"] = lr
    if batch_size is not None:
        trainer["batch_size"] = batch_size
    return model, trainer, int(d["image_size"])


def initial_global_params(model_cfg: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
    """What the server persistor sends in round 0: the built model's federated state (pretrained file loaded)."""
    from fl_plugins.engine.finetune import federated_keys
    from fl_plugins.models.factory import build_model

    torch.manual_seed(seed)
    model = build_model(model_cfg)
    sd = model.state_dict()
    return {k: sd[k].detach().cpu().numpy().astype(np.float32) for k in federated_keys(model)}


def run_one(arm: str, seed: int, a: argparse.Namespace, datalists: list[Path], num_classes: int) -> dict[str, Any]:
    from fl_plugins.engine.evaluation import evaluate_sites
    from fl_plugins.flare.finetune_handler import FinetuneHandler
    from fl_plugins.flare.handler import SiteContext
    from fl_plugins.flare.inprocess import run_fedavg

    t0 = time.perf_counter()
    model_cfg, trainer_cfg, image_size = arm_settings(arm, a.backbone, num_classes, a.steps, seed,
                                                      a.lr_unet if arm == "unet" else a.lr_vit, a.batch_size)
    logs: dict[str, list] = {}
    handlers = []
    tmp = tempfile.mkdtemp(prefix="ft_study_")
    for p in datalists:
        site = p.parent.name
        ctx = SiteContext(site_name=site, datalist_path=str(p), workspace_dir=tmp,
                          log_scalar=lambda tag, v, step, site=site: logs.setdefault(site, []).append((tag, step, v)))
        handlers.append(FinetuneHandler(ctx, model=model_cfg, trainer=trainer_cfg, image_size=image_size,
                                        num_labelled_patients=a.labelled, total_rounds=a.rounds))
    init = initial_global_params(model_cfg, seed)
    t_setup = time.perf_counter() - t0
    res = run_fedavg(handlers, init, rounds=a.rounds, final_validation=True)
    t_train = time.perf_counter() - t0 - t_setup
    eval_cfg = dict(model_cfg)
    if "pretrained" in eval_cfg:
        eval_cfg["pretrained"] = None  # every federated key comes from the final global state
    ev = evaluate_sites(eval_cfg, res["params"], datalists, split="test", image_size=image_size)
    wall = time.perf_counter() - t0
    val_curve = [float(np.mean([m.get("val_dice", float("nan")) for m in rnd])) for rnd in res["rounds"]]
    val_curve.append(float(np.mean([m.get("val_dice", float("nan")) for m in res["final"]])))
    train_loss = {s: [v for tag, _, v in L if tag == "train_loss"] for s, L in logs.items()}
    return {
        "arm": arm, "seed": seed,
        "test_dice": ev["overall"]["mean"], "test_dice_sd_over_volumes": ev["overall"]["std"],
        "test_volumes": ev["overall"]["n"],
        "test_sites": {s: {k: v for k, v in m.items()} for s, m in ev["sites"].items()},
        "val_dice_mean_over_sites_per_round": val_curve,  # round r = global model received at round r; last = final
        "train_loss_per_site": train_loss,
        "labelled_items_per_site": {h.site.site_name: h.num_train_items for h in handlers},
        "model": model_cfg, "trainer": trainer_cfg, "image_size": image_size,
        "seconds": {"setup": t_setup, "train": t_train, "total": wall},
    }


def t_ci(diffs: list[float]) -> dict[str, float]:
    """Mean, sd and a t-based 95 % CI of paired differences over seeds."""
    from scipy import stats

    d = np.asarray(diffs, dtype=np.float64)
    n = d.size
    if n == 0:
        return {"n": 0}
    mean = float(d.mean())
    if n < 2:
        return {"n": 1, "mean": mean}
    sd = float(d.std(ddof=1))
    h = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "ci95": [mean - h, mean + h]}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    by = {arm: {r["seed"]: r["test_dice"] for r in runs if r["arm"] == arm} for arm in ARMS}
    out: dict[str, Any] = {"arms": {}, "paired": {}}
    for arm, d in by.items():
        if d:
            v = np.array(list(d.values()))
            out["arms"][arm] = {"per_seed": {str(k): float(x) for k, x in sorted(d.items())}, "mean": float(v.mean()),
                                "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}
    for other in ("random", "unet"):
        seeds = sorted(set(by["dino"]) & set(by[other]))
        if seeds:
            out["paired"][f"dino-{other}"] = {**t_ci([by["dino"][s] - by[other][s] for s in seeds]), "seeds": seeds}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=False, help="folder of <site>/datalist.json (flssl split ... --labelled N)")
    p.add_argument("--backbone", required=False, help="exported DINO backbone (flssl export-backbone); arm 'dino'")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=20, help="local steps per round (trainer.steps_per_round)")
    p.add_argument("--labelled", type=int, default=None,
                   help="num_labelled_patients per site (default: the datalists' labelled flags)")
    p.add_argument("--lr-vit", type=float, default=None, help="override the finetune_seg_vit job's lr")
    p.add_argument("--lr-unet", type=float, default=None, help="override the finetune_seg_unet job's lr")
    p.add_argument("--batch-size", type=int, default=None, help="override the jobs' batch size")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--out", required=True, help="results JSON (rewritten after every run)")
    p.add_argument("--resume", action="store_true", help="keep (arm, seed) runs already in --out")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="only combine the runs of these result files (e.g. arms run in parallel processes) into --out")
    a = p.parse_args(argv)

    if a.merge:
        runs, parts = [], []
        for f in a.merge:
            r = json.loads(Path(f).read_text())
            runs += r["runs"]
            parts.append({"file": f, "settings": r["settings"], "torch_threads": r.get("torch_threads")})
        keys = [(r["arm"], r["seed"]) for r in runs]
        if len(set(keys)) != len(keys):
            p.error(f"duplicate (arm, seed) runs in {a.merge}")
        Path(a.out).write_text(json.dumps({"parts": parts, "runs": runs, "summary": summarize(runs)}, indent=1))
        print(json.dumps(summarize(runs), indent=1))
        print(f"wrote {a.out}")
        return 0
    torch.set_num_threads(a.threads)
    install_dataset_cache()
    if not a.data:
        p.error("--data is required")
    import logging
    logging.basicConfig(level=logging.WARNING)
    if "dino" in a.arms and not (a.backbone and Path(a.backbone).is_file()):
        p.error("arm 'dino' needs --backbone (an exported backbone file)")
    datalists = sorted(Path(a.data).glob("*/datalist.json"))
    if not datalists:
        p.error(f"no <site>/datalist.json under {a.data}")
    num_classes = {int(json.loads(d.read_text())["num_classes"]) for d in datalists}
    if len(num_classes) != 1:
        p.error(f"sites disagree on num_classes: {num_classes}")
    nc = num_classes.pop()
    out = Path(a.out)
    runs: list[dict[str, Any]] = []
    if a.resume and out.is_file():
        runs = json.loads(out.read_text()).get("runs", [])
    done = {(r["arm"], r["seed"]) for r in runs}
    settings = {k: v for k, v in vars(a).items() if k not in ("resume",)}
    settings["sites"] = [str(d) for d in datalists]
    t_all = time.perf_counter()
    for seed in a.seeds:  # seed-major: paired comparisons become available early
        for arm in a.arms:
            if (arm, seed) in done:
                continue
            print(f"[{time.perf_counter() - t_all:7.1f}s] arm={arm} seed={seed}: {a.rounds} rounds x {a.steps} steps "
                  f"x {len(datalists)} sites ...", flush=True)
            r = run_one(arm, seed, a, datalists, nc)
            runs.append(r)
            print(f"[{time.perf_counter() - t_all:7.1f}s]   test Dice {r['test_dice']:.4f} (n={r['test_volumes']}); "
                  f"val Dice per round {[round(x, 3) for x in r['val_dice_mean_over_sites_per_round']]}; "
                  f"{r['seconds']['total']:.0f}s", flush=True)
            result = {"settings": settings, "runs": runs, "summary": summarize(runs),
                      "torch_threads": torch.get_num_threads()}
            atomic_write_json(result, out, indent=1)
    s = summarize(runs)
    print(json.dumps(s, indent=1))
    print(f"total {time.perf_counter() - t_all:.0f}s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
