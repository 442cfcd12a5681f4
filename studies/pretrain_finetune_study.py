"""Does federated pretraining save labels? Pretrain once, then fine-tune from it and from random init, paired seeds.

Two sub-commands, both running the package's own task handlers in one process (``fl_plugins.flare.inprocess``:
the FLARE jobs' handler code and aggregator, sites one after another, no FLARE processes):

``pretrain``
    federated pretraining of a registered method (``SSLHandler``) on every training image of every site, labels
    never read; the global state is checkpointed atomically after every round (``--out``.state.pt; rerun the same
    command to resume) and the backbone exported to ``--out`` (what ``flssl export-backbone`` writes).

``finetune``
    for each seed, the same labelled patients in both arms: ``--labelled`` patients per site drawn with the seed
    (``random.Random(seed)`` over the site's sorted labelled patients), then federated fine-tuning of a ready job
    (``JOBS[--job]`` defaults plus ``--set``) from ``--pretrained`` (arm ``pretrained``) and from random init (arm
    ``random``), the same initial weights of every non-pretrained tensor in both arms (same seed). Each arm runs
    until the mean validation metric of the global model over sites (``fl.key_metric``) has not improved for
    ``--patience`` rounds, at most ``--max-rounds`` (the LR schedule spans the maximum); the best global model is
    tested on every site's ``test`` split (the dataset's own test patients). Paired differences per seed with a
    t-based 95 % interval.

Example (the ACDC result in ``docs/results/mim_real_data.md``)::

    flssl split --dataset ../shared/data/acdc/dataset.json --out runs/acdc3 --sites 3 --seed 0
    python studies/pretrain_finetune_study.py pretrain --method unet_inpaint --data runs/acdc3 \
        --rounds 30 --steps 60 --out runs/mim/unet_inpaint.pt
    python studies/pretrain_finetune_study.py finetune --job finetune_seg_unet --data runs/acdc3 \
        --pretrained runs/mim/unet_inpaint.pt --labelled 1 --seeds 0 1 2 3 4 --steps 25 --max-rounds 40 \
        --patience 5 --set model.num_classes=4 --out runs/mim/ft_unet_l1.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dino_finetune_study import install_dataset_cache, t_ci  # noqa: E402

from fl_plugins.atomic_io import atomic_write_json  # noqa: E402

ARMS = ("pretrained", "random")


def _sites(data: str) -> list[Path]:
    dls = sorted(Path(data).glob("*/datalist.json"))
    if not dls:
        raise SystemExit(f"no <site>/datalist.json under {data}")
    return dls


# -- pretraining ---------------------------------------------------------------------------------------------------


def pretrain(a: argparse.Namespace) -> int:
    from fl_plugins.atomic_io import atomic_write_json as write_json
    from fl_plugins.engine.checkpoint import atomic_torch_save
    from fl_plugins.engine.export import export_backbone
    from fl_plugins.flare.handler import SiteContext, to_numpy, to_torch
    from fl_plugins.flare.inprocess import run_fedavg
    from fl_plugins.flare.ssl_handler import SSLHandler
    from fl_plugins.methods import build
    from fl_plugins.settings import parse_set

    cfg = {"seed": a.seed, "total_steps": a.rounds * a.steps, **parse_set(a.set)}  # the method validates the keys
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state_file, log_file = out.with_suffix(".state.pt"), out.with_suffix(".log.json")
    logs: dict[str, list] = {}
    def ctx(p: Path) -> SiteContext:
        return SiteContext(site_name=p.parent.name, datalist_path=str(p), workspace_dir=str(out.parent),
                           log_scalar=lambda t, v, s, n=p.parent.name: logs.setdefault(n, []).append((t, s, v)))

    exchange = None
    if a.method == "fcl":  # its own handler: partition batches, the extraction task
        from fl_plugins.flare.fcl_handler import FCLHandler

        handlers = [FCLHandler(ctx(p), dict(cfg), steps_per_round=a.steps, total_rounds=a.rounds)
                    for p in _sites(a.data)]
        mc = handlers[0].method.config
        exchange = None if a.no_exchange else {"feature_dim": mc.proj_dim, "num_partitions": mc.num_partitions}
        loss_tag = "ssl_loss"
    else:
        handlers = [SSLHandler(ctx(p), a.method, dict(cfg), steps_per_round=a.steps, total_rounds=a.rounds,
                               knn_every=0) for p in _sites(a.data)]
        loss_tag = "ssl/loss"
    torch.manual_seed(a.seed)
    method = build(a.method, dict(cfg))
    params = to_numpy(method.federated_state_dict())
    start, history = 0, []
    if state_file.is_file():  # resume after a crash: the last completed round's global state
        st = torch.load(state_file, weights_only=False)
        start, params, history = st["round"], st["params"], st["history"]
        print(f"resuming after round {start} from {state_file}", flush=True)
    print(f"{a.method}: {len(handlers)} sites, {[h.num_train_items for h in handlers]} images, "
          f"{a.rounds} rounds x {a.steps} steps", flush=True)
    t0 = time.perf_counter()
    for r in range(start, a.rounds):
        res = run_fedavg(handlers, params, rounds=1, start_round=r, total_rounds=a.rounds, final_validation=False,
                         exchange=exchange)
        params = res["params"]
        losses = {h.site.site_name: [v for t, s, v in logs.get(h.site.site_name, []) if t == loss_tag and s == r]
                  for h in handlers}
        history.append({"round": r, "loss": {k: v[-1] if v else None for k, v in losses.items()},
                        "seconds": time.perf_counter() - t0})
        if exchange is not None:
            history[-1]["exchange"] = res["exchange"][-1]
            history[-1]["loss_remote"] = {h.site.site_name: [v for t, s, v in logs.get(h.site.site_name, [])
                                                             if t == "fcl/loss_remote" and s == r][-1:]
                                          for h in handlers}
        atomic_torch_save({"round": r + 1, "params": params, "history": history}, state_file)
        print(f"[{time.perf_counter() - t0:7.1f}s] round {r + 1}/{a.rounds} loss "
              f"{ {k: round(v, 4) for k, v in history[-1]['loss'].items() if v is not None} }", flush=True)
    method.load_federated_state_dict(to_torch(params))
    export_backbone(method, out)
    zero = [v for h in handlers for t, s, v in logs.get(h.site.site_name, []) if t == "ssl/zero_fill_loss"]
    write_json({"method": a.method, "config": method.config.to_dict() if hasattr(method.config, "to_dict") else cfg,
                "rounds": a.rounds, "steps_per_round": a.steps, "sites": [str(p) for p in _sites(a.data)],
                "images_per_site": [h.num_train_items for h in handlers], "history": history,
                "zero_fill_loss_last_round": zero[-len(handlers):] if zero else None,
                "torch_threads": torch.get_num_threads()}, log_file, indent=1)
    print(f"exported {out}; log {log_file}")
    return 0


# -- fine-tuning ---------------------------------------------------------------------------------------------------


def labelled_datalists(datalists: list[Path], k: int, seed: int, folder: Path) -> tuple[list[Path], dict[str, list]]:
    """Copies of the datalists in which only ``k`` patients per site (drawn with ``seed``) are labelled."""
    out, chosen = [], {}
    for p in datalists:
        dl = json.loads(p.read_text())
        pats = sorted({str(e.get("patient", e.get("image", e.get("index")))) for e in dl["training"]
                       if e.get("labelled", True) and e.get("label") is not None})
        if k > len(pats):
            raise SystemExit(f"--labelled {k} but {p} has {len(pats)} labelled patients")
        keep = set(random.Random(f"{seed}-{p.parent.name}").sample(pats, k))
        for e in dl["training"]:
            e["labelled"] = str(e.get("patient", e.get("image", e.get("index")))) in keep and e.get("label") is not None
        site_dir = folder / p.parent.name
        site_dir.mkdir(parents=True, exist_ok=True)
        (site_dir / "datalist.json").write_text(json.dumps(dl))
        out.append(site_dir / "datalist.json")
        chosen[p.parent.name] = sorted(keep)
    return out, chosen


def job_settings(a: argparse.Namespace, arm: str, seed: int) -> dict[str, Any]:
    from fl_plugins.flare import job_builder
    from fl_plugins.settings import parse_set

    # the CLI's own parsing and merge: the job's defaults and open keys (e.g. model.spatial_dims), unknown keys refused
    d = job_builder.job_settings(a.job, parse_set(a.set))
    d["model"]["pretrained"] = str(Path(a.pretrained).resolve()) if arm == "pretrained" else None
    d["trainer"] = dict(d["trainer"], steps_per_round=a.steps, seed=seed)
    return d


def run_arm(a: argparse.Namespace, arm: str, seed: int, datalists: list[Path]) -> dict[str, Any]:
    from fl_plugins.engine.evaluation import evaluate_sites
    from fl_plugins.engine.finetune import federated_keys
    from fl_plugins.flare.finetune_handler import FinetuneHandler
    from fl_plugins.flare.handler import SiteContext
    from fl_plugins.flare.inprocess import run_fedavg
    from fl_plugins.models.factory import build_model

    LOSS = FinetuneHandler.LOSS_META_KEY  # noqa: N806
    t0 = time.perf_counter()
    d = job_settings(a, arm, seed)
    key = d["fl"]["key_metric"]
    handlers = [FinetuneHandler(SiteContext(site_name=p.parent.name, datalist_path=str(p), workspace_dir=a.tmp),
                                model=d["model"], trainer=d["trainer"], image_size=int(d["image_size"]),
                                total_rounds=a.max_rounds) for p in datalists]
    torch.manual_seed(seed)  # the server's initial model: same random tensors in both arms, then the file
    model = build_model(d["model"])
    sd = model.state_dict()
    init = {k: sd[k].detach().numpy().astype(np.float32) for k in federated_keys(model)}
    eval_cfg = dict(d["model"], pretrained=None)

    def train_and_test(group: list[Any]) -> dict[str, Any]:
        """FedAvg over ``group`` (one site: local training) with early stopping; the best model on every test split."""
        def progress(r: int, results: list[Any], score: float) -> None:
            loss = np.mean([x.meta[LOSS] for x in results if LOSS in (x.meta or {})] or [np.nan])
            print(f"[{time.perf_counter() - t0:7.1f}s]   round {r + 1}/{a.max_rounds}: {key} {score:.4f} (of the model "
                  f"received), train loss {loss:.4f}", flush=True)

        res = run_fedavg(group, init, rounds=a.max_rounds, key_metric=key, patience=a.patience, on_round=progress)
        ev = evaluate_sites(eval_cfg, res["best"]["params"], datalists, split="test", image_size=int(d["image_size"]))
        curve = [float(np.mean([m[key] for m in rnd if key in m])) for rnd in res["rounds"]]
        curve.append(float(np.mean([m[key] for m in res["final"] if key in m])))
        if a.score == "overall":  # Dice over all test volumes / accuracy over all test images
            score = float(ev["overall"]["mean"])
        else:  # classification: the mean over sites of each site's balanced accuracy or AUC
            score = float(np.mean([m[a.score] for m in ev["sites"].values()]))
        return {"test": ev["overall"], "test_score": score, "test_sites": ev["sites"],
                "best_round": res["best"]["round"], "best_val": res["best"]["score"], "rounds_run": res["rounds_run"],
                "steps_per_site": res["rounds_run"] * a.steps, "val_curve": curve}

    out: dict[str, Any] = {"arm": arm, "seed": seed, "score": a.score, "mode": "local" if a.local else "federated",
                           "labelled_items_per_site": {h.site.site_name: h.num_train_items for h in handlers}}
    if a.local:  # the paper's Table 1: every site fine-tunes alone; the arm's score is the mean over sites
        local = {h.site.site_name: train_and_test([h]) for h in handlers}
        out["local"] = local
        out["test_score"] = float(np.mean([r["test_score"] for r in local.values()]))
        out["best_round"] = {k: r["best_round"] for k, r in local.items()}
        out["rounds_run"] = {k: r["rounds_run"] for k, r in local.items()}
        out["best_val"] = float(np.mean([r["best_val"] for r in local.values()]))
        out["val_curve"] = []
    else:
        out.update(train_and_test(handlers))
    out["seconds"] = time.perf_counter() - t0
    return out


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    by = {arm: {r["seed"]: r["test_score"] for r in runs if r["arm"] == arm} for arm in ARMS}
    out: dict[str, Any] = {"arms": {}}
    for arm, d in by.items():
        if d:
            v = np.array(list(d.values()))
            out["arms"][arm] = {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0,
                                "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}
    seeds = sorted(set(by["pretrained"]) & set(by["random"]))
    if seeds:
        diffs = [by["pretrained"][s] - by["random"][s] for s in seeds]
        out["paired_pretrained_minus_random"] = {**t_ci(diffs), "seeds": seeds,
                                                 "positive": int(sum(x > 0 for x in diffs))}
    return out


def finetune(a: argparse.Namespace) -> int:
    install_dataset_cache()
    if a.labelled < 0:
        raise SystemExit(f"--labelled must be >= 0 (0 = every labelled item), got {a.labelled}")
    if "pretrained" in a.arms and (a.pretrained is None or not Path(a.pretrained).is_file()):
        raise SystemExit(f"--pretrained {a.pretrained!r} does not exist (the arm pretrained needs it)")
    out = Path(a.out)
    previous = json.loads(out.read_text()) if out.is_file() else {"runs": [], "settings": {}}
    if bool(previous["settings"].get("local", False)) != a.local and previous["runs"]:
        raise SystemExit(f"{out} holds {'local' if not a.local else 'federated'} runs; --local must match "
                         f"(or give another --out)")
    runs: list[dict[str, Any]] = previous["runs"]
    done = {(r["arm"], r["seed"]) for r in runs}
    base = _sites(a.data)
    a.tmp = tempfile.mkdtemp(prefix="pf_study_")
    settings = {k: v for k, v in vars(a).items() if k not in ("func", "tmp")}
    t_all = time.perf_counter()
    for seed in a.seeds:
        if a.labelled == 0:  # every labelled item of every site (a plain supervised baseline)
            dls, chosen = base, {p.parent.name: "all" for p in base}
        else:
            dls, chosen = labelled_datalists(base, a.labelled, seed, Path(a.tmp) / f"seed{seed}")
        for arm in a.arms:
            if (arm, seed) in done:
                continue
            print(f"[{time.perf_counter() - t_all:7.1f}s] seed {seed} arm {arm}: labelled {chosen}", flush=True)
            r = run_arm(a, arm, seed, dls)
            r["labelled_patients"] = chosen
            runs.append(r)
            print(f"[{time.perf_counter() - t_all:7.1f}s]   test {r['test_score']:.4f}; best round {r['best_round']} "
                  f"of {r['rounds_run']} (val {r['best_val']:.4f}); val curve "
                  f"{[round(x, 3) for x in r['val_curve']]}; {r['seconds']:.0f}s", flush=True)
            atomic_write_json({"settings": settings, "runs": runs, "summary": summarize(runs),
                               "torch_threads": torch.get_num_threads()}, out, indent=1)
    print(json.dumps(summarize(runs), indent=1))
    print(f"total {time.perf_counter() - t_all:.0f}s; wrote {out}")
    return 0


def merge(a: argparse.Namespace) -> int:
    """Combine the runs of result files (e.g. the two arms run in two processes) into ``--out``."""
    runs, parts = [], []
    for f in a.inputs:
        r = json.loads(Path(f).read_text())
        runs += r["runs"]
        parts.append({"file": f, "settings": r["settings"]})
    keys = [(r["arm"], r["seed"]) for r in runs]
    if len(set(keys)) != len(keys):
        raise SystemExit(f"duplicate (arm, seed) runs in {a.inputs}")
    atomic_write_json({"parts": parts, "runs": runs, "summary": summarize(runs)}, Path(a.out), indent=1)
    print(json.dumps(summarize(runs), indent=1))
    print(markdown(runs))
    return 0


def _rounds(r: dict[str, Any]) -> str:
    """``best round / rounds run`` of a run; for local fine-tuning one pair per site."""
    if isinstance(r["best_round"], dict):
        return ", ".join(f"{k} {r['best_round'][k]} / {r['rounds_run'][k]}" for k in r["best_round"])
    return f"{r['best_round']} / {r['rounds_run']}"


def markdown(runs: list[dict[str, Any]]) -> str:
    """Per-seed table (test score, best round / rounds run per arm) and the summary lines, as Markdown."""
    by = {(r["arm"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    lines = ["| seed | labelled patients (per site) | pretrained: test | best round / run | random: test | "
             "best round / run | difference |", "|---|---|---|---|---|---|---|"]
    for s in seeds:
        p, q = by.get(("pretrained", s)), by.get(("random", s))
        lab = (p or q or {}).get("labelled_patients", {})
        cells = [str(s), "; ".join(f"{k}: {', '.join(v)}" for k, v in lab.items())]
        for r in (p, q):
            cells += ([f"{r['test_score']:.3f}", _rounds(r)] if r else ["-", "-"])
        cells.append(f"{p['test_score'] - q['test_score']:+.3f}" if p and q else "-")
        lines.append("| " + " | ".join(cells) + " |")
    sm = summarize(runs)
    for arm, v in sm["arms"].items():
        lines.append(f"\n{arm}: mean {v['mean']:.3f}, sd {v['sd']:.3f}, range {v['min']:.3f}-{v['max']:.3f} (n={v['n']})")
    d = sm.get("paired_pretrained_minus_random")
    if d and d.get("n", 0) >= 2:
        lines.append(f"\npaired pretrained - random: mean {d['mean']:+.3f}, sd {d['sd']:.3f}, 95 % CI "
                     f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}], {d['positive']} of {d['n']} positive")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("pretrain", help="federated pretraining, then export the backbone")
    pp.add_argument("--method", required=True)
    pp.add_argument("--data", required=True, help="folder of <site>/datalist.json")
    pp.add_argument("--rounds", type=int, required=True)
    pp.add_argument("--steps", type=int, required=True, help="local steps per round")
    pp.add_argument("--seed", type=int, default=0)
    pp.add_argument("--set", action="append", default=[], help="method config KEY=VALUE (dotted keys)")
    pp.add_argument("--out", required=True, help="exported backbone file (.pt)")
    pp.add_argument("--no-exchange", action="store_true",
                    help="fcl only: the baseline without feature exchange (local terms only)")
    pp.set_defaults(func=pretrain)
    pf = sub.add_parser("finetune", help="paired fine-tuning from --pretrained and from random init")
    pf.add_argument("--job", required=True, help="ready fine-tuning job (finetune_seg_unet, finetune_cls, ...)")
    pf.add_argument("--data", required=True)
    pf.add_argument("--pretrained", help="exported backbone (needed by the arm pretrained)")
    pf.add_argument("--labelled", type=int, required=True, help="labelled patients (images, for MedMNIST) per site, drawn per seed; 0 = all of them")
    pf.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    pf.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    pf.add_argument("--steps", type=int, default=25, help="local steps per round")
    pf.add_argument("--max-rounds", type=int, default=40)
    pf.add_argument("--patience", type=int, default=5, help="rounds without a better validation score")
    pf.add_argument("--set", action="append", default=[], help="job setting KEY=VALUE (dotted keys)")
    pf.add_argument("--score", default="overall", choices=("overall", "balanced_accuracy", "auc"),
                    help="test score compared between arms (classification: mean over sites of balanced accuracy "
                         "or AUC; overall = Dice over all volumes / accuracy over all images)")
    pf.add_argument("--local", action="store_true",
                    help="every site fine-tunes alone on its own labelled patients (early stopping on its own "
                         "validation split); a run's test score is the mean over sites of each local model's score "
                         "on every site's test split")
    pf.add_argument("--out", required=True, help="results JSON (rewritten after every run; rerun to resume)")
    pf.set_defaults(func=finetune)
    pm = sub.add_parser("merge", help="combine result files of the same study (arms run in parallel processes)")
    pm.add_argument("inputs", nargs="+")
    pm.add_argument("--out", required=True)
    pm.set_defaults(func=merge)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    import logging

    logging.basicConfig(level=logging.WARNING)
    return int(a.func(a))


if __name__ == "__main__":
    sys.exit(main())
