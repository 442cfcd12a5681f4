"""One table of several fine-tuning arms run with ``pretrain_finetune_study.py finetune`` (same recipe, same seeds,
hence the same labelled patients), each arm named on the command line, with paired differences against a reference.

    python studies/compare_arms.py --ref random=runs/mim/ft_unet_l1_random.json:random \
        fcl=runs/fcl/ft_fcl_l1.json:pretrained noexchange=runs/fcl/ft_noex_l1.json:pretrained \
        --out runs/fcl/table_l1.json

Each ``NAME=FILE:ARM`` takes the runs of arm ``ARM`` of ``FILE``. The recipes of all files must agree (job, data,
labelled patients per site, steps, max rounds, patience, settings); the command refuses otherwise. Prints a Markdown
table (test score per seed, mean, sd) and, for every arm, the paired difference to the reference over the seeds all
arms share, with a t-based 95 % interval and the count of positive seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dino_finetune_study import t_ci  # noqa: E402

#: settings that must be equal for two arms to be compared
RECIPE_KEYS = ("job", "data", "labelled", "steps", "max_rounds", "patience", "set", "score", "local")
#: the value of a key that files written before it existed lack
RECIPE_DEFAULTS = {"local": False}


def load_arm(spec: str) -> tuple[str, dict[int, dict[str, Any]], dict[str, Any]]:
    name, sep, rest = spec.partition("=")
    path, sep2, arm = rest.rpartition(":")
    if not sep or not sep2 or not name or not arm:
        raise SystemExit(f"arm spec {spec!r} is not NAME=FILE:ARM")
    obj = json.loads(Path(path).read_text())
    runs = {int(r["seed"]): r for r in obj["runs"] if r["arm"] == arm}
    if not runs:
        raise SystemExit(f"{path}: no runs of arm {arm!r}")
    return name, runs, obj["settings"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", required=True, help="NAME=FILE:ARM of the reference arm (e.g. random init)")
    p.add_argument("arms", nargs="+", help="NAME=FILE:ARM of each other arm")
    p.add_argument("--out", help="write the table and statistics as JSON here")
    a = p.parse_args(argv)
    arms = [load_arm(a.ref)] + [load_arm(s) for s in a.arms]
    recipe = {k: arms[0][2].get(k, RECIPE_DEFAULTS.get(k)) for k in RECIPE_KEYS}
    for name, _, settings in arms[1:]:
        other = {k: settings.get(k, RECIPE_DEFAULTS.get(k)) for k in RECIPE_KEYS}
        if other != recipe:
            diff = {k: (recipe[k], other[k]) for k in RECIPE_KEYS if recipe[k] != other[k]}
            raise SystemExit(f"arm {name!r} was fine-tuned with another recipe than {arms[0][0]!r}: {diff}")
    seeds = sorted(set.intersection(*(set(r) for _, r, _ in arms)))
    if not seeds:
        raise SystemExit("the arms share no seed")
    header = "| seed | " + " | ".join(f"{n}: test" for n, _, _ in arms) + " |"
    lines = [header, "|" + "---|" * (len(arms) + 1)]
    for s in seeds:
        lines.append(f"| {s} | " + " | ".join(f"{r[s]['test_score']:.3f} (best {r[s]['best_round']}/"
                                             f"{r[s]['rounds_run']})" for _, r, _ in arms) + " |")
    stats: dict[str, Any] = {"seeds": seeds, "recipe": recipe, "arms": {}}
    import numpy as np

    ref_name, ref, _ = arms[0]
    for name, r, _ in arms:
        vals = [r[s]["test_score"] for s in seeds]
        entry: dict[str, Any] = {"mean": float(np.mean(vals)), "sd": float(np.std(vals, ddof=1)) if len(vals) > 1
                                 else None, "min": min(vals), "max": max(vals), "values": vals}
        if name != ref_name:
            d = [r[s]["test_score"] - ref[s]["test_score"] for s in seeds]
            entry["paired_vs_" + ref_name] = {**t_ci(d), "positive": sum(x > 0 for x in d)}
        stats["arms"][name] = entry
    lines.append("")
    for name, e in stats["arms"].items():
        sd = f", sd {e['sd']:.3f}" if e["sd"] is not None else ""
        line = f"* {name}: mean **{e['mean']:.3f}**{sd} ({e['min']:.3f}-{e['max']:.3f})"
        pr = e.get("paired_vs_" + ref_name)
        if pr and pr.get("n", 0) >= 2:
            line += (f"; paired {name} - {ref_name}: {pr['mean']:+.3f}, sd {pr['sd']:.3f}, 95 % CI "
                     f"[{pr['ci95'][0]:+.3f}, {pr['ci95'][1]:+.3f}], {pr['positive']} of {pr['n']} seeds positive")
        lines.append(line)
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).write_text(json.dumps({**stats, "markdown": text}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
