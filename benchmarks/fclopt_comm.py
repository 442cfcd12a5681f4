"""Bytes per site per round of FCLOpt, FCLOpt + PTNU and FCLOpt + PTNU + DP, measured in one run of each in the FLARE
simulator (the controllers' own accounting, ``communication.json``), as ratios to FCLOpt.

Targets (issue "Communication-efficient contrastive learning"): PTNU removes the target download entirely; DP removes
at least 80 % of the target uploads; total traffic at least 50 % below FCLOpt's.

    python benchmarks/fclopt_comm.py                          # 3 generated sites, 4 rounds x 5 steps
    python benchmarks/fclopt_comm.py --data runs/acdc3 --rounds 6 --steps 20
    python benchmarks/fclopt_comm.py --set dp_threshold=0.005
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

MODES = {
    "fclopt": ("fclopt_pretrain", []),
    "fclopt+ptnu": ("fclopt_ptnu_dp_pretrain", ["dp_threshold=null"]),
    "fclopt+ptnu+dp": ("fclopt_ptnu_dp_pretrain", []),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="folder of <site>/datalist.json (default: 3 generated sites)")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--set", action="append", default=[], help="job setting KEY=VALUE (every mode)")
    a = p.parse_args(argv)
    from fl_plugins.cli import main as flssl

    tmp = Path(tempfile.mkdtemp(prefix="fclopt_comm_"))
    data = Path(a.data) if a.data else tmp / "data"
    if not a.data:
        from fl_plugins.data import generate_synthetic_segmentation

        generate_synthetic_segmentation(data, num_sites=a.sites, volumes_per_site=8, num_slices=12, size=64, seed=0)
    out = {}
    for mode, (job, extra) in MODES.items():
        sets = [f"steps_per_round={a.steps}", *extra, *[s for s in a.set if not (extra and s.startswith("dp_"))]]
        ws = tmp / mode.replace("+", "_")
        rc = flssl(["simulate", "--job", job, "--data", str(data), "-w", str(ws), "--sites", str(a.sites), "--threads",
                    str(a.sites), "--rounds", str(a.rounds), "--quiet", *[x for s in sets for x in ("--set", s)]])
        if rc != 0:
            print(f"{mode}: simulation failed (rc {rc}); log {ws}_simulate.log", file=sys.stderr)
            return rc
        out[mode] = json.loads((ws / "server" / "simulate_job" / "app_server" / "communication.json").read_text())
    base = out["fclopt"]["bytes_per_site_per_round"]
    print(f"{a.sites} sites, {a.rounds} rounds x {a.steps} steps; bytes per site per round (MB)")
    print(f"{'mode':16s} {'up online':>10s} {'up pred':>8s} {'up target':>10s} {'down online':>12s} {'down pred':>10s} "
          f"{'down target':>12s} {'total':>8s} {'vs fclopt':>10s} {'target uploads':>15s}")
    rows = {}
    for mode, s in out.items():
        b = s["bytes_per_site_per_round"]
        ratio = b["total"] / base["total"]
        rows[mode] = {**b, "ratio_to_fclopt": ratio, "target_upload_fraction": s["target_upload_fraction"]}
        print(f"{mode:16s} {b['up']['online'] / 1e6:10.3f} {b['up']['predictor'] / 1e6:8.3f} "
              f"{b['up']['target'] / 1e6:10.3f} {b['down']['online'] / 1e6:12.3f} {b['down']['predictor'] / 1e6:10.3f} "
              f"{b['down']['target'] / 1e6:12.3f} {b['total'] / 1e6:8.3f} {ratio:10.3f} "
              f"{s['target_upload_fraction']:15.2f}")
    dp, fo = rows["fclopt+ptnu+dp"], rows["fclopt"]
    checks = {
        "ptnu_target_download_removed": rows["fclopt+ptnu"]["down"]["target"] == 0.0,
        "dp_target_uploads_removed_fraction": 1.0 - dp["up"]["target"] / fo["up"]["target"] if fo["up"]["target"] else None,
        "dp_total_reduction_vs_fclopt": 1.0 - dp["ratio_to_fclopt"],
    }
    print(json.dumps(checks, indent=1))
    (tmp / "fclopt_comm.json").write_text(json.dumps({"rows": rows, "checks": checks}, indent=1))
    print(f"run folder: {tmp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
