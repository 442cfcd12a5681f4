"""Table of studies/classification_seeds.sh: per arm and seed, test balanced accuracy / AUC / accuracy (mean over the 3
sites) of the best global model, mean, sd and t-interval over seeds; majority-class accuracy of each test set."""
import json
import statistics as st
import subprocess
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fl_plugins.engine.metrics import mean_interval

R = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/cls")
DATA = {"breast": "breastmnist", "pneu": "pneumoniamnist_reconstructed", "adrenal": "adrenalmnist3d"}
rows = {}
for name in ["breast_cnn", "breast_vit", "pneu_cnn", "pneu_vit", "adrenal_cnn", "adrenal_vit"]:
    data = DATA[name.split("_")[0]]
    for s in range(3):
        ckpt = R / f"ws_{name}_s{s}/server/simulate_job/app_server/best_FL_global_model.pt"
        if not ckpt.is_file() or not (R / f"{name}_test_s{s}.json").is_file():  # finished runs only
            continue
        out = R / f"{name}_eval_s{s}.json"
        if not out.is_file():
            subprocess.run([sys.executable, "-m", "fl_plugins.cli", "evaluate", "--checkpoint", str(ckpt), "--data",
                            str(R / data), "--split", "test", "--out", str(out)], check=True, capture_output=True)
        d = json.loads(out.read_text())
        sites = d["sites"]
        best = json.loads((ckpt.parent / "best_metric.json").read_text())
        rows.setdefault(name, []).append({
            "seed": s, "acc": d["overall"]["mean"],
            "bal": st.mean(v["balanced_accuracy"] for v in sites.values()),
            "auc": st.mean(v["auc"] for v in sites.values()),
            "best_aggregate": best["aggregate"], "val_bal": best["score"]})
for name, rs in rows.items():
    bal = mean_interval([r["bal"] for r in rs])
    auc = mean_interval([r["auc"] for r in rs])
    acc = mean_interval([r["acc"] for r in rs])
    per = " | ".join(f"s{r['seed']}: bal {r['bal']:.3f} auc {r['auc']:.3f} acc {r['acc']:.3f} "
                     f"(agg {r['best_aggregate']})" for r in rs)
    ci = f"[{bal['ci95'][0]:.3f}, {bal['ci95'][1]:.3f}]" if "ci95" in bal else "-"
    print(f"{name}: n={bal['n']} bal {bal['mean']:.3f} sd {bal.get('sd', 0):.3f} CI {ci} | auc {auc['mean']:.3f} | "
          f"acc {acc['mean']:.3f} || {per}")
# majority-class accuracy of each test set (pooled over the 3 sites; balanced accuracy of a constant guess = 0.5)

for key, data in DATA.items():
    labels = [e["label"] for site in ("site-1", "site-2", "site-3")
              for e in json.loads((R / data / site / "datalist.json").read_text())["test"]]
    c = Counter(labels)
    print(key, "test images", len(labels), "classes", dict(sorted(c.items())), "majority acc", round(max(c.values()) / len(labels), 3))
