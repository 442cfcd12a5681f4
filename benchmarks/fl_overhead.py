"""Per-round cost of FLARE: the same local training steps (a) in one plain process, (b) in the FLARE simulator.

(a) runs the two sites' ``FinetuneHandler.train`` concurrently in two threads of one process (torch ops release
    the GIL) with one torch thread each, plus an in-process FedAvg — the same parallelism as (b);
(b) runs the exported ``finetune_seg_unet`` job with the same settings in ``nvflare simulator -n 2 -t 2`` with
    ``OMP_NUM_THREADS=1``; round time = time between consecutive "Aggregated 2/2 results" server log lines (so
    process start-up and imports, paid once per job, are excluded).

Prints seconds per round for both, the overhead (b - a) and the ratio b / a. Target: overhead < 0.5 s per round.

    python benchmarks/fl_overhead.py --rounds 6 --steps 5
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def plain(data: Path, rounds: int, overrides: dict) -> list[float]:
    import torch

    from fl_plugins.engine.finetune import federated_keys
    from fl_plugins.flare.finetune_executor import FinetuneHandler
    from fl_plugins.flare.handler import SiteContext
    from fl_plugins.flare.inprocess import run_fedavg
    from fl_plugins.flare.job_builder import job_settings
    from fl_plugins.models.factory import build_model

    torch.set_num_threads(1)
    s = job_settings("finetune_seg_unet", overrides)
    handlers = [
        FinetuneHandler(SiteContext(f"site-{i}", str(data / f"site-{i}" / "datalist.json"), str(data)),
                        s["model"], s["trainer"], image_size=s["image_size"], total_rounds=rounds)
        for i in (1, 2)
    ]
    m = build_model(s["model"])
    params = {k: m.state_dict()[k].numpy() for k in federated_keys(m)}
    stamps = []
    for r in range(rounds):
        params = run_fedavg(handlers, params, 1, parallel=True, final_validation=False, start_round=r,
                            total_rounds=rounds)["params"]
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:])]


_AGG = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*Aggregated 2/2 results")


def simulated(data: Path, rounds: int, overrides: dict, work: Path) -> list[float]:
    from fl_plugins.flare.job_builder import build_job
    from fl_plugins.flare.sim_workspace import write_sim_local

    build_job("finetune_seg_unet", overrides).export_job(str(work / "jobs"))
    ws = work / "ws"
    write_sim_local(ws, str(data / "{site}" / "datalist.json"))
    cmd = [sys.executable, "-m", "nvflare.cli", "simulator", str(work / "jobs" / "finetune_seg_unet"), "-w", str(ws),
           "-n", "2", "-t", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"simulator failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    stamps = []
    for line in (proc.stdout + proc.stderr).splitlines():
        m = _AGG.match(line)
        if m:
            stamps.append(dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp())
    if len(stamps) != rounds:
        raise SystemExit(f"expected {rounds} aggregation lines, found {len(stamps)}")
    return [b - a for a, b in zip(stamps, stamps[1:])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=5, help="local steps per round per site")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--interval", type=float, default=None, help="server.task_request_interval (job default 0.1 s)")
    args = ap.parse_args()
    from fl_plugins.data import generate_synthetic_segmentation

    overrides = {"fl": {"num_rounds": args.rounds}, "image_size": args.size,
                 "trainer": {"steps_per_round": args.steps, "batch_size": args.batch}}
    if args.interval is not None:
        overrides["fl"]["task_request_interval"] = args.interval
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        generate_synthetic_segmentation(work / "data", num_sites=2, volumes_per_site=4, num_slices=12,
                                        size=args.size, num_classes=3, seed=0)
        a = plain(work / "data", args.rounds, overrides)
        b = simulated(work / "data", args.rounds, overrides, work)
    ma, mb = statistics.mean(a), statistics.mean(b)
    print(f"settings: 2 sites, {args.rounds} rounds, {args.steps} steps/round, batch {args.batch}, "
          f"{args.size}px U-Net, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, "
          f"task_request_interval={args.interval or 'job default'}, load average {os.getloadavg()[0]:.1f}")
    print(f"(a) plain process : {ma:.3f} s/round  (rounds 2..{args.rounds}: {[round(x, 2) for x in a]})")
    print(f"(b) FLARE simulator: {mb:.3f} s/round  (rounds 2..{args.rounds}: {[round(x, 2) for x in b]})")
    print(f"overhead (b - a)  : {mb - ma:.3f} s/round   target < 0.5 s")
    print(f"ratio (b / a)     : {mb / ma:.3f}")


if __name__ == "__main__":
    main()
