"""Per-round cost of FLARE: the same local training steps (a) in one plain process, (b) in FLARE.

(a) runs the two sites' ``FinetuneHandler.train`` concurrently in two threads of one process (torch ops release
    the GIL) with one torch thread each, plus an in-process FedAvg — the same parallelism as (b);
(b) runs the ``finetune_seg_unet`` job (built with the same settings) in FLARE, ``OMP_NUM_THREADS=1`` per site:
    ``--mode sim``: ``nvflare simulator -n 2 -t 2`` on the exported job;
    ``--mode poc``: a 2-site POC system on 127.0.0.1 (the project's ``poc/poc.py`` driver, own temporary root),
    the job submitted with the admin kit; the server log is read from the downloaded job workspace.
    Round time = time between consecutive "Aggregated 2/2 results" server log lines (so process start-up and
    imports, paid once per job, and the final validation phase are excluded).

Both are measured in the one run. Prints seconds per round for (a) and (b), the overhead (b - a) and the ratio
b / a, and, with ``--breakdown``, where each FLARE round goes (from the server and client log timestamps).
Target: overhead < 0.3 s per round.

    python benchmarks/fl_overhead.py --rounds 8 --steps 3
    python benchmarks/fl_overhead.py --rounds 8 --steps 3 --mode poc
    python benchmarks/fl_overhead.py --rounds 8 --steps 3 --set fl.task_request_interval=0.05 --breakdown
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
JOB = "finetune_seg_unet"


def plain(data: Path, rounds: int, overrides: dict) -> list[float]:
    import torch

    from fl_plugins.engine.finetune import federated_keys
    from fl_plugins.flare.finetune_handler import FinetuneHandler
    from fl_plugins.flare.handler import SiteContext
    from fl_plugins.flare.inprocess import run_fedavg
    from fl_plugins.flare.job_builder import job_settings
    from fl_plugins.models.factory import build_model

    torch.set_num_threads(1)
    s = job_settings(JOB, overrides)
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


# ------------------------------------------------------------------------------------------------ FLARE log parsing

_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
_AGG = "Aggregated 2/2 results"


def _stamp(line: str) -> float | None:
    m = _STAMP.match(line)
    return dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() if m else None


def _round_times(server_lines: list[str], rounds: int) -> list[float]:
    stamps = [t for line in server_lines if _AGG in line and (t := _stamp(line)) is not None]
    if len(stamps) != rounds:
        raise SystemExit(f"expected {rounds} '{_AGG}' server log lines, found {len(stamps)}")
    return [b - a for a, b in zip(stamps, stamps[1:])]


#: (name, regex) of the log events a round is split at (a line without a timestamp, e.g. the body of FedAvg's
#: framed "Round N started." message, takes the timestamp of the line before it)
_SERVER_EVENTS = [
    ("aggregated", re.compile(re.escape(_AGG))),
    ("task_exit", re.compile(r"task train exit with status")),
    ("round_start", re.compile(r"Round \d+ started")),
]
_CLIENT_EVENTS = [
    ("got_train", re.compile(r"got task assignment: name=train\b")),
    ("train_done", re.compile(r"task 'train' done in [0-9.]+s")),
]


def _events(lines: list[str], table: list[tuple[str, re.Pattern]]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {name: [] for name, _ in table}
    last = None
    for line in lines:
        t = _stamp(line)
        last = t if t is not None else last
        for name, rx in table:
            if last is not None and rx.search(line):
                out[name].append(last)
    return out


def breakdown(server_lines: list[str], site_lines: dict[str, list[str]], rounds: int) -> dict[str, float]:
    """Mean seconds per round (rounds 2..N) of each step between two "Aggregated 2/2" lines, from the server and
    site log timestamps (ms resolution). Round r's steps: the server notices round r-1 is complete (its task
    monitor), then aggregates, selects and persists the model and starts round r; each site fetches the train task
    (polling + model download); the site's handler (validate + train); the last result's upload + acceptance."""
    srv = _events(server_lines, _SERVER_EVENTS)
    sites = {s: _events(lines, _CLIENT_EVENTS) for s, lines in sorted(site_lines.items())}
    aggs, starts = srv["aggregated"], srv["round_start"]
    parts: dict[str, list[float]] = {}

    def add(k: str, v: float) -> None:
        parts.setdefault(k, []).append(v)

    for r in range(1, min(rounds, len(aggs), len(starts))):
        exit_t = next((t for t in srv["task_exit"] if t >= aggs[r - 1]), None)
        if exit_t is not None and exit_t <= starts[r]:
            add("server: last result accepted -> round noticed complete (task monitor)", exit_t - aggs[r - 1])
            add("server: round complete -> next round started (aggregate, select, persist)", starts[r] - exit_t)
        last = None  # (done, handler seconds) of the site that finished last: the round's critical path
        for site, ev in sites.items():
            if len(ev["got_train"]) <= r or len(ev["train_done"]) <= r:
                continue
            add(f"{site}: round started -> got the train task (polling + download)", ev["got_train"][r] - starts[r])
            add(f"{site}: got task -> task done (handler: validate + train)", ev["train_done"][r] - ev["got_train"][r])
            if last is None or ev["train_done"][r] > last[0]:
                last = (ev["train_done"][r], ev["train_done"][r] - ev["got_train"][r])
        if last is not None:
            add("last site's task done -> its result accepted (upload)", aggs[r] - last[0])
            add("= FLARE time per round (round minus the last site's handler time)", aggs[r] - aggs[r - 1] - last[1])
    return {k: statistics.mean(v) for k, v in parts.items()}


# ------------------------------------------------------------------------------------------------ FLARE runs


def simulated(data: Path, rounds: int, overrides: dict, work: Path) -> tuple[list[float], dict[str, float]]:
    from fl_plugins.flare.job_builder import build_job
    from fl_plugins.flare.sim_workspace import write_sim_local

    build_job(JOB, overrides).export_job(str(work / "jobs"))
    ws = work / "ws"
    write_sim_local(ws, str(data / "{site}" / "datalist.json"))
    cmd = [sys.executable, "-m", "nvflare.cli", "simulator", str(work / "jobs" / JOB), "-w", str(ws),
           "-n", "2", "-t", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"simulator failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    server = (ws / "server" / "log.txt").read_text().splitlines()
    sites = {s: (ws / s / "log.txt").read_text().splitlines() for s in ("site-1", "site-2")}
    return _round_times(server, rounds), breakdown(server, sites, rounds)


def _load_poc_driver():
    spec = importlib.util.spec_from_file_location("fl_plugins_poc_driver", REPO / "poc" / "poc.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def poc(data: Path, rounds: int, overrides: dict, work: Path) -> tuple[list[float], dict[str, float]]:
    from fl_plugins.flare.job_builder import build_job

    build_job(JOB, overrides).export_job(str(work / "jobs"))
    driver = _load_poc_driver()
    system = driver.Poc(work / "poc")
    marker = str(system.workspace) + os.sep
    try:
        system.prepare(num_sites=2, datalists=str(data / "{site}" / "datalist.json"))
        system.start(timeout=180)
        job_id = system.submit(work / "jobs" / JOB)
        result = system.wait(job_id, timeout=1800)
        if result.get("status") != "FINISHED:COMPLETED":
            raise SystemExit(f"POC job {job_id}: {result}")
        path = system.download(job_id, work / "download")
        server = (path / "workspace" / "log.txt").read_text().splitlines()
        sites = {s: (system.site_dir(s) / job_id / "log.txt").read_text().splitlines() for s in system.sites}
    finally:
        try:
            system.stop()
        finally:
            driver.kill_processes(marker)
    return _round_times(server, rounds), breakdown(server, sites, rounds)


def _deep_update(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("sim", "poc"), default="sim", help="FLARE simulator or a POC system")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=5, help="local steps per round per site")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--interval", type=float, default=None, help="server.task_request_interval (job default 0.1 s)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="job setting for build_job, e.g. --set fl.task_check_period=0.02 (repeatable)")
    ap.add_argument("--breakdown", action="store_true", help="print where the FLARE round time goes (from the logs)")
    ap.add_argument("--skip-plain", action="store_true", help="FLARE only (no overhead / ratio)")
    ap.add_argument("--workdir", help="keep data, job, workspace and logs in this (new) folder instead of a temp one")
    args = ap.parse_args()
    from fl_plugins.data import generate_synthetic_segmentation
    from fl_plugins.settings import parse_set

    overrides: dict[str, Any] = {"fl": {"num_rounds": args.rounds}, "image_size": args.size,
                                 "trainer": {"steps_per_round": args.steps, "batch_size": args.batch}}
    if args.interval is not None:
        overrides["fl"]["task_request_interval"] = args.interval
    _deep_update(overrides, parse_set(args.set))
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir).resolve() if args.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=False if args.workdir else True)
        generate_synthetic_segmentation(work / "data", num_sites=2, volumes_per_site=4, num_slices=12,
                                        size=args.size, num_classes=3, seed=0)
        a = [] if args.skip_plain else plain(work / "data", args.rounds, overrides)
        run = simulated if args.mode == "sim" else poc
        b, parts = run(work / "data", args.rounds, overrides, work)
    mb = statistics.mean(b)
    what = "FLARE simulator" if args.mode == "sim" else "FLARE POC      "
    print(f"settings: mode {args.mode}, 2 sites, {args.rounds} rounds, {args.steps} steps/round, batch {args.batch}, "
          f"{args.size}px U-Net, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, job settings "
          f"{ {k: v for k, v in overrides.items() if k != 'image_size'} }, "
          f"load average {load0:.1f} before / {os.getloadavg()[0]:.1f} after")
    if a:
        ma = statistics.mean(a)
        print(f"(a) plain process  : {ma:.3f} s/round  (rounds 2..{args.rounds}: {[round(x, 2) for x in a]})")
    print(f"(b) {what}: {mb:.3f} s/round  (rounds 2..{args.rounds}: {[round(x, 2) for x in b]})")
    if a:
        print(f"overhead (b - a)   : {mb - ma:.3f} s/round   target < 0.3 s")
        print(f"ratio (b / a)      : {mb / ma:.3f}")
    if args.breakdown:
        print("where a FLARE round goes (mean over rounds 2..N, from log timestamps):")
        for k, v in parts.items():
            print(f"  {v:6.3f} s  {k}")


if __name__ == "__main__":
    main()
