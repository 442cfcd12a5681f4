"""Memory soak: a small job for many rounds on a POC system, sampling the RSS of every FLARE process.

nvflare's issue tracker reports server and client memory growing over hours of rounds; nvflare 2.9 added
allocator-aware clean-up (``gc.collect`` + ``malloc_trim``) every N rounds. Every job here sets it (``fl.server_
memory_gc_rounds`` / ``fl.client_memory_gc_rounds``, default 1). This script runs ``finetune_seg_unet`` (U-Net,
synthetic phantoms, 1 local step per round by default: the per-round machinery dominates, as in a long run) on a
fresh POC system with 2 sites and samples the resident set size (``/proc/<pid>/status`` VmRSS) of the server's
parent and job processes and of each site's client and job processes every ``--interval`` seconds, with the round
the server's job log has reached. It prints RSS at round ``--warmup`` and at the last round per process and the
growth between them (target: under 10 %), and writes every sample to ``--out`` (JSON).

    python benchmarks/memory_soak.py --rounds 100                       # about 5 minutes on 2 CPU cores
    python benchmarks/memory_soak.py --rounds 100 --set fl.server_memory_gc_rounds=0 fl.client_memory_gc_rounds=0
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "poc"))

import poc as poc_driver  # noqa: E402  (poc/poc.py, the POC driver the deployment tests use)
from fl_plugins.settings import parse_set  # noqa: E402


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def roles(system: poc_driver.Poc, job_id: str) -> dict[str, int]:
    """role -> pid: server (parent), server job, and per site its client and its job process."""
    out: dict[str, int] = {}
    for pid, cmd in system.processes():
        if "server_train" in cmd:
            out["server"] = pid
        elif "runner_process" in cmd and job_id in cmd:
            out["server job"] = pid
        else:
            m = re.search(r"uid=(\S+)", cmd)
            if "client_train" in cmd and m:
                out[f"{m.group(1)} client"] = pid
            m = re.search(r"-c (\S+) ", cmd)
            if "worker_process" in cmd and job_id in cmd and m:
                out[f"{m.group(1)} job"] = pid
    return out


def summarise(samples: list[dict], warmup: int) -> tuple[dict[str, dict], int, int]:
    """Per process: RSS at the first sampled round >= ``warmup`` and at the last sampled round (the peak of the
    samples taken while that round ran) and the growth between them; returns (table, first round, last round)."""
    rounds = sorted({s["round"] for s in samples if s["round"] >= warmup})
    if not rounds:
        return {}, warmup, warmup
    first, last = rounds[0], rounds[-1]

    def at(rnd: int, role: str) -> float | None:
        vals = [s["rss_mb"][role] for s in samples if s["round"] == rnd and s["rss_mb"].get(role)]
        return max(vals) if vals else None

    table = {}
    for role in sorted({r for s in samples for r in s["rss_mb"]}):
        w, e = at(first, role), at(last, role)
        table[role] = {"warmup_round": first, "rss_warmup_mb": w, "last_round": last, "rss_last_mb": e,
                       "growth": (e / w - 1.0) if w and e else None}
    return table, first, last


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--steps", type=int, default=1, help="local steps per round (default: %(default)s)")
    ap.add_argument("--sites", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=10, help="the round whose RSS is the baseline (default: %(default)s)")
    ap.add_argument("--interval", type=float, default=2.0, help="seconds between samples")
    ap.add_argument("--set", nargs="*", default=[], help="job settings, e.g. fl.server_memory_gc_rounds=0")
    ap.add_argument("--root", default=None, help="POC folder (default: a temp folder, removed at the end)")
    ap.add_argument("--out", default="memory_soak.json")
    a = ap.parse_args(argv)
    if a.rounds <= a.warmup:
        ap.error(f"--rounds ({a.rounds}) must be larger than --warmup ({a.warmup})")

    from fl_plugins.flare.job_builder import build_job

    root = Path(a.root or tempfile.mkdtemp(prefix="fl_soak_"))
    overrides = {"fl": {"num_rounds": a.rounds, "min_clients": a.sites}, "trainer": {"steps_per_round": a.steps}}
    for section, values in parse_set(a.set).items():
        if isinstance(values, dict):
            overrides.setdefault(section, {}).update(values)
        else:
            overrides[section] = values
    job_dir = root / "job"
    build_job("finetune_seg_unet", overrides).export_job(str(job_dir))
    job_path = job_dir / "finetune_seg_unet"

    system = poc_driver.Poc(root / "poc")
    samples: list[dict] = []
    try:
        system.prepare(num_sites=a.sites, datalists=poc_driver._synthetic_datalists(root, a.sites))
        system.start(timeout=180)
        t0 = time.monotonic()
        job_id = system.submit(str(job_path))
        log = system.site_dir(system.server_name) / job_id / "log.txt"
        print(f"job {job_id}: {a.rounds} rounds x {a.steps} step(s) on {a.sites} sites; sampling every "
              f"{a.interval}s", flush=True)
        done = threading.Event()
        result: dict = {}

        def wait() -> None:
            result.update(system.wait(job_id, timeout=a.rounds * 60 + 600))
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        last_print = -1
        while not done.is_set():
            text = log.read_text(errors="replace") if log.is_file() else ""
            started = [int(r) for r in re.findall(r"Round (\d+) started", text)]
            rnd = max(started) if started else -1
            row = {"t": round(time.monotonic() - t0, 1), "round": rnd,
                   "rss_mb": {role: rss_mb(pid) for role, pid in sorted(roles(system, job_id).items())}}
            samples.append(row)
            if rnd // 10 != last_print // 10:
                last_print = rnd
                print(f"  t={row['t']:.0f}s round {rnd}: " + ", ".join(
                    f"{k} {v:.0f}" for k, v in row["rss_mb"].items() if v) + " MB", flush=True)
            done.wait(a.interval)
        print(f"job {job_id}: {result.get('status')} after {time.monotonic() - t0:.0f}s", flush=True)
    finally:
        system.stop()

    table, first, last = summarise(samples, a.warmup)
    print(f"\n{'process':<16} {'round ' + str(first):>10} {'round ' + str(last):>10} {'growth':>8}")
    for role, r in table.items():
        g = f"{100 * r['growth']:+.1f}%" if r["growth"] is not None else "n/a"
        print(f"{role:<16} {r['rss_warmup_mb'] or 0:>8.0f}MB {r['rss_last_mb'] or 0:>8.0f}MB {g:>8}")
    Path(a.out).write_text(json.dumps({"args": vars(a), "status": result.get("status"), "table": table,
                                       "samples": samples}, indent=1))
    print(f"samples: {os.path.abspath(a.out)}")
    return 0 if result.get("status") == "FINISHED:COMPLETED" else 1


if __name__ == "__main__":
    sys.exit(main())
