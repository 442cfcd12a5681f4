"""Tabulate the k-NN monitor (and SSL loss, collapse monitor) per site per round from a simulator workspace's server TensorBoard.

Reads ``<ws>/server/simulate_job/tb_events/<site>/`` with tensorboard's ``EventAccumulator``; the tag
``knn_accuracy`` at step r is the k-NN accuracy of the global teacher backbone received at round r (step 0 =
initial random model; the step after the last training round = the final global model, logged by the final
validation). Prints a Markdown table and optionally writes JSON.

Example::

    python studies/knn_table.py /work/runs/dino_study/ws_dino --out /work/runs/dino_study/knn.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_scalars(run_dir: Path, tags: tuple[str, ...]) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    have = set(acc.Tags().get("scalars", []))
    out: dict[str, dict[int, float]] = {}
    for tag in tags:
        matches = [t for t in have if t == tag or t.endswith("/" + tag)]
        for t in matches:
            for ev in acc.Scalars(t):
                out.setdefault(tag, {})[int(ev.step)] = float(ev.value)  # last write of a step wins
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workspace")
    p.add_argument("--out")
    a = p.parse_args(argv)
    tb = Path(a.workspace) / "server" / "simulate_job" / "tb_events"
    sites = sorted(d for d in tb.iterdir() if d.is_dir())
    tags = ("knn_accuracy", "ssl/loss", "round_seconds", "ssl/teacher_entropy", "ssl/teacher_mean_entropy",
            "ssl/teacher_mi")
    data = {d.name: read_scalars(d, tags) for d in sites}
    steps = sorted({s for v in data.values() for s in v.get("knn_accuracy", {})})
    print("| site | " + " | ".join(f"r{s}" for s in steps) + " | last - r0 |")
    print("|---|" + "---|" * (len(steps) + 1))
    for site, v in data.items():
        k = v.get("knn_accuracy", {})
        row = [f"{k[s]:.3f}" if s in k else "-" for s in steps]
        delta = f"{k[steps[-1]] - k[steps[0]]:+.3f}" if steps and steps[0] in k and steps[-1] in k else "-"
        print(f"| {site} | " + " | ".join(row) + f" | {delta} |")
    for site, v in data.items():
        loss = v.get("ssl/loss", {})
        secs = v.get("round_seconds", {})
        print(f"{site}: ssl/loss per round {[round(loss[s], 3) for s in sorted(loss)]}; "
              f"round_seconds {[round(secs[s]) for s in sorted(secs)]}")
        for tag in tags[3:]:
            if v.get(tag):
                print(f"{site}: {tag} per round {[round(v[tag][s], 2) for s in sorted(v[tag])]}")
    if a.out:
        Path(a.out).write_text(json.dumps({s: {t: {str(k): x for k, x in d.items()} for t, d in v.items()}
                                           for s, v in data.items()}, indent=1))
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
