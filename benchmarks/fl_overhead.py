"""Per-round cost of FLARE: the same local training steps (a) in one plain process, (b) in our job in FLARE and
(c) in nvflare's own stock FedAvg, measured in one run; our overhead is reported as a ratio to stock nvflare's.

(a) runs the two sites' ``FinetuneHandler.train`` concurrently in two threads of one process (torch ops release
    the GIL) with one torch thread each, plus an in-process FedAvg — the same parallelism as (b) and (c);
(b) ours: the ``finetune_seg_unet`` job (built with the same settings) in FLARE, ``OMP_NUM_THREADS=1`` per site;
(c) stock nvflare: ``nvflare.app_opt.pt.recipes.fedavg.FedAvgRecipe`` with the Client API script
    ``benchmarks/stock_nvflare/client.py`` (in-process ScriptRunner, the recipe's default) and the recipe's own
    ``PTFileModelPersistor`` (via ``PTModel``) of the same model.
(b) and (c) run in the same FLARE system, one after the other (order alternating over ``--repeats``):
    ``--mode sim``: ``nvflare simulator -n 2 -t 2`` on each exported job;
    ``--mode poc``: one 2-site POC system on 127.0.0.1 (the project's ``poc/poc.py`` driver, own temporary root),
    each job submitted with the admin kit; the server log is read from the downloaded job workspace;
    ``--mode both`` (default): sim, then poc.
    Round time = time between consecutive "Aggregated 2/2 results" server log lines (nvflare's FedAvg and our
    controller log the same line when a round's last result is accepted), so process start-up and imports, paid
    once per job, and our job's final validation phase are excluded; rounds 2..N are timed.

Identical in (a), (b), (c): the model (``build_model`` of the job's model config, the finetune_seg_unet U-Net), the
synthetic datalists and sites, and the per-step compute — (c)'s script builds the same ``FinetuneHandler`` from the
``handler_args`` of our exported job (model, trainer incl. batch size, steps per round, lr, seed, image size) and calls
its ``train`` (validate the received model, then the local steps), so only the FL machinery differs. Also identical
in (b) and (c): 2 sites, min_clients, num_rounds, key metric, float32 numpy on the wire (FULL weights, the same keys
from round 1 on), aggregation weight = the site's labelled items, and the latency settings of our job's
``FLSettings`` (``server.task_request_interval``, the controller's ``task_check_period``, the server/client
memory clean-up every N rounds), set on the stock recipe through its server config and its
``_get_controller_kwargs`` hook (the recipe itself takes no ``task_check_period``; nvflare defaults 2 s / 0.5 s).
What differs (the FL machinery, each side as shipped): ours = ``HandlerExecutor`` (no Client API), our
``FedAvgWithFinalValidation`` controller (best-model selection, update checks with norm bound, site liveness,
final validation round), ``WeightedAverage`` aggregator, ``ConfigModelPersistor`` (seeded initial model, no
BatchNorm counters, atomic background writes), per-round site-state save for resume (optimiser copy written in a
background thread), TensorBoard scalars through nvflare's analytics events; stock = Client API in-process script
(torch <-> numpy conversion both ways; the executor waiting for ``flare.send()`` and the script waiting in
``flare.receive()`` poll every 0.5 s, fixed in nvflare 2.9 — no job setting; ``--stock-poll S`` patches both, which is
then NOT stock), nvflare ``FedAvg`` with in-time weighted aggregation,
``IntimeModelSelector``, ``PTFileModelPersistor`` (unseeded initial model; round 0's model also carries the BatchNorm
counters, which the script drops), the same scalars through nvflare's ``SummaryWriter``; no site-state save.
The stock job carries custom code (the script) and imports ``fl_plugins`` for the handler and the model.

Prints seconds per round of (a), (b) and (c), the overhead per round (x - a), the ratios ours / stock of the round
time and of the overhead (target: overhead ratio <= 1.05, the engine's own cost being the floor), and, with
``--breakdown``, where each FLARE round goes (from the server and client log timestamps).

    python benchmarks/fl_overhead.py                          # sim and POC, 6 rounds x 5 steps
    python benchmarks/fl_overhead.py --rounds 8 --steps 3 --mode sim --repeats 2
    python benchmarks/fl_overhead.py --rounds 8 --steps 3 --mode poc
    python benchmarks/fl_overhead.py --rounds 8 --steps 3 --set fl.task_request_interval=0.05 --breakdown
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import json
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
STOCK_JOB = "stock_fedavg"
STOCK_SCRIPT = Path(__file__).resolve().parent / "stock_nvflare" / "client.py"


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
    # only the stock job's Client API script logs it (flare.receive() returned): the executor -> script hand-off
    ("script_got", re.compile(r"script received task 'train'")),
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
    (polling + model download); (stock job only: the Client API hands it to the script); the site's handler
    (validate + train); the last result's upload + acceptance (stock: including the executor's wait for
    ``flare.send()``)."""
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
            begin = ev["got_train"][r]
            if len(ev["script_got"]) > r:
                begin = ev["script_got"][r]
                add(f"{site}: got task -> the script's flare.receive() returned (Client API hand-off)",
                    begin - ev["got_train"][r])
            add(f"{site}: handler (validate + train) -> task done", ev["train_done"][r] - begin)
            if last is None or ev["train_done"][r] > last[0]:
                last = (ev["train_done"][r], ev["train_done"][r] - begin)
        if last is not None:
            add("last site's task done -> its result accepted (upload)", aggs[r] - last[0])
            add("= FLARE time per round (round minus the last site's handler time)", aggs[r] - aggs[r - 1] - last[1])
    return {k: statistics.mean(v) for k, v in parts.items()}


# ------------------------------------------------------------------------------------------------ the two jobs

#: our job's ``fl`` settings the stock recipe cannot mirror (key -> the only value it can), see stock_mismatches
_STOCK_MIRRORABLE = {"quantization": None, "inline_weights": False, "controller": "fedavg", "resume_from": None}


def stock_mismatches(fl: dict[str, Any]) -> list[str]:
    """Our job's ``fl`` settings (job_settings(...)["fl"]) that the stock FedAvgRecipe job would not mirror, so the
    comparison would not be like for like (an empty list: it is)."""
    out = [f"fl.{k}={fl.get(k)!r} (stock: {v!r})" for k, v in _STOCK_MIRRORABLE.items() if fl.get(k, v) != v]
    if fl.get("aggregator") not in (None, "weighted_average"):
        out.append(f"fl.aggregator={fl['aggregator']!r} (stock: nvflare's built-in weighted average)")
    return out


def stock_recipe_args(fl: dict[str, Any]) -> dict[str, Any]:
    """FedAvgRecipe arguments taken from our job's ``fl`` settings (the latency knobs beside them:
    :func:`stock_latency`)."""
    return {"min_clients": int(fl["min_clients"]), "num_rounds": int(fl["num_rounds"]),
            "key_metric": fl["key_metric"], "server_memory_gc_rounds": int(fl["server_memory_gc_rounds"]),
            "client_memory_gc_rounds": int(fl["client_memory_gc_rounds"])}


def stock_latency(fl: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(server config, FedAvg controller kwargs) giving the stock job our job's latency settings."""
    return ({"server": {"task_request_interval": float(fl["task_request_interval"])}},
            {"task_check_period": float(fl["task_check_period"])})


def export_ours(overrides: dict, jobs_dir: Path) -> Path:
    from fl_plugins.flare.job_builder import build_job

    build_job(JOB, overrides).export_job(str(jobs_dir))
    return jobs_dir / JOB


def handler_args_of(job_dir: Path) -> dict[str, Any]:
    """The ``handler_args`` our exported job ships to its sites (its HandlerExecutor's, handler ``finetune``)."""
    (cfg_path,) = sorted(job_dir.glob("*/config/config_fed_client.json"))
    cfg = json.loads(cfg_path.read_text())
    execs = [e["executor"]["args"] for e in cfg.get("executors", [])
             if e.get("executor", {}).get("path", "").endswith(".HandlerExecutor")]
    if len(execs) != 1 or execs[0].get("handler") != "finetune":
        raise SystemExit(f"{cfg_path}: expected one HandlerExecutor of handler 'finetune', got {execs}")
    return execs[0]["handler_args"]


@contextlib.contextmanager
def _chdir(path: Path):
    """contextlib.chdir (Python >= 3.11) for Python 3.10."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def export_stock(fl: dict[str, Any], handler_args: dict[str, Any], data: Path, jobs_dir: Path,
                 result_poll: float | None = None) -> Path:
    """nvflare's stock FedAvg job of the same model, data and steps (see the module docstring), exported;
    ``result_poll``: the script lowers the Client API's fixed 0.5 s result polls to it (not stock; None = as shipped)."""
    from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
    from nvflare.recipe.utils import add_experiment_tracking

    server_config, controller_kwargs = stock_latency(fl)

    class _LatencyFedAvgRecipe(FedAvgRecipe):
        # the recipe's own hook for extra FedAvg controller arguments (it has no task_check_period argument)
        def _get_controller_kwargs(self) -> dict[str, Any]:
            return {**super()._get_controller_kwargs(), **controller_kwargs}

    jobs_dir.mkdir(parents=True, exist_ok=True)
    args_file = jobs_dir / "stock_handler_args.json"
    args_file.write_text(json.dumps(handler_args, indent=1))
    # nvflare splits the script arguments at whitespace and keeps quotes, so paths must have none
    argv = ["--handler-args", str(args_file), "--datalist", str(data / "{site}" / "datalist.json"),
            "--workdir", str(data)] + ([] if result_poll is None else ["--result-poll", str(result_poll)])
    if any(not a or any(c.isspace() or c in "'\"" for c in a) for a in argv):
        raise SystemExit(f"the stock job's script arguments need paths without spaces or quotes: {argv}")
    train_args = " ".join(argv)
    # a relative script path: the sites run the copy shipped in the job's app/custom (an absolute one would run
    # this checkout's file)
    with _chdir(STOCK_SCRIPT.parents[1]):
        recipe = _LatencyFedAvgRecipe(
            name=STOCK_JOB,
            model={"path": "fl_plugins.models.factory.build_model", "args": {"cfg": handler_args["model"]}},
            train_script=str(STOCK_SCRIPT.relative_to(STOCK_SCRIPT.parents[1])), train_args=train_args,
            **stock_recipe_args(fl))
        recipe.add_server_config(server_config)
        add_experiment_tracking(recipe, "tensorboard")  # the server's TensorBoard receiver, as our job has
        recipe.export(str(jobs_dir.resolve()))
    job = jobs_dir / STOCK_JOB
    srv = json.loads(next(job.glob("*/config/config_fed_server.json")).read_text())
    ctl = [w for w in srv.get("workflows", []) if w.get("path", "").endswith("fedavg.FedAvg")]
    got = ctl[0].get("args", {}).get("task_check_period", 0.5) if ctl else None
    if got != controller_kwargs["task_check_period"] or srv.get("server") != server_config["server"]:
        raise SystemExit(f"{job}: the stock job did not take our latency settings (task_check_period {got}, "
                         f"server {srv.get('server')})")
    return job


# ------------------------------------------------------------------------------------------------ FLARE runs


def simulated(job_dir: Path, data: Path, rounds: int, ws: Path) -> tuple[list[float], dict[str, float]]:
    from fl_plugins.flare.sim_workspace import write_sim_local

    write_sim_local(ws, str(data / "{site}" / "datalist.json"))
    cmd = [sys.executable, "-m", "nvflare.cli", "simulator", str(job_dir), "-w", str(ws), "-n", "2", "-t", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"simulator failed on {job_dir.name}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    server = (ws / "server" / "log.txt").read_text().splitlines()
    sites = {s: (ws / s / "log.txt").read_text().splitlines() for s in ("site-1", "site-2")}
    return _round_times(server, rounds), breakdown(server, sites, rounds)


def _load_poc_driver():
    spec = importlib.util.spec_from_file_location("fl_plugins_poc_driver", REPO / "poc" / "poc.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def poc(jobs: list[Path], data: Path, rounds: int, work: Path) -> list[tuple[list[float], dict[str, float]]]:
    """Run ``jobs`` one after the other on one POC system (started once); per job (round times, breakdown)."""
    driver = _load_poc_driver()
    system = driver.Poc(work / "poc")
    marker = str(system.workspace) + os.sep
    out = []
    try:
        system.prepare(num_sites=2, datalists=str(data / "{site}" / "datalist.json"))
        system.start(timeout=180)
        for i, job in enumerate(jobs):
            job_id = system.submit(job)
            result = system.wait(job_id, timeout=1800)
            if result.get("status") != "FINISHED:COMPLETED":
                raise SystemExit(f"POC job {job.name} ({job_id}): {result}")
            path = system.download(job_id, work / "download" / f"{i}-{job.name}")
            server = (path / "workspace" / "log.txt").read_text().splitlines()
            sites = {s: (system.site_dir(s) / job_id / "log.txt").read_text().splitlines() for s in system.sites}
            out.append((_round_times(server, rounds), breakdown(server, sites, rounds)))
    finally:
        try:
            system.stop()
        finally:
            driver.kill_processes(marker)
    return out


def _deep_update(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


def run_order(labels: list[str], repeats: int) -> list[str]:
    """The runs of ``repeats`` repeats, the order of ``labels`` reversed every other repeat (ABBA...)."""
    return [lab for r in range(repeats) for lab in (labels if r % 2 == 0 else labels[::-1])]


def summarize(plain_s: float | None, ours_s: float, stock_s: float | None) -> dict[str, float | None]:
    """Mean s/round of (a) plain, (b) ours, (c) stock -> overheads (x - a) and the ratios ours / stock of the round
    time and of the overhead (None where an input is missing or a stock overhead is not positive)."""
    over_ours = None if plain_s is None else ours_s - plain_s
    over_stock = None if plain_s is None or stock_s is None else stock_s - plain_s
    return {"plain": plain_s, "ours": ours_s, "stock": stock_s, "overhead_ours": over_ours,
            "overhead_stock": over_stock,
            "ratio_round": None if not stock_s else ours_s / stock_s,
            "ratio_overhead": (over_ours / over_stock if over_ours is not None and over_stock and over_stock > 0
                               else None)}


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


MODE_TITLE = {"sim": "FLARE simulator (nvflare simulator -n 2 -t 2)",
              "poc": "FLARE POC (2 sites + server on 127.0.0.1, jobs submitted with the admin kit)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("sim", "poc", "both"), default="both",
                    help="FLARE simulator, a POC system, or both (default)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=5, help="local steps per round per site")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of each job per mode, the order ours/stock alternating (default 1)")
    ap.add_argument("--interval", type=float, default=None, help="server.task_request_interval (job default 0.1 s)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="job setting for build_job, e.g. --set fl.task_check_period=0.02 (repeatable; the stock "
                         "job takes the same fl latency settings)")
    ap.add_argument("--breakdown", action="store_true", help="print where the FLARE round time goes (from the logs)")
    ap.add_argument("--skip-plain", action="store_true", help="FLARE only (no overhead)")
    ap.add_argument("--skip-stock", action="store_true", help="our job only (no stock nvflare peer)")
    ap.add_argument("--stock-poll", type=float, default=None, metavar="S",
                    help="NOT stock: the stock job's script lowers nvflare's fixed 0.5 s in-process Client API result "
                         "polls to S s (to see how much of stock's overhead they are); default: as shipped")
    ap.add_argument("--workdir", help="keep data, jobs, workspaces and logs in this (new) folder instead of a temp one")
    args = ap.parse_args()
    if args.rounds < 3:
        ap.error("--rounds must be >= 3 (rounds 2..N are timed)")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    from fl_plugins.data import generate_synthetic_segmentation
    from fl_plugins.flare.job_builder import job_settings
    from fl_plugins.settings import parse_set

    overrides: dict[str, Any] = {"fl": {"num_rounds": args.rounds}, "image_size": args.size,
                                 "trainer": {"steps_per_round": args.steps, "batch_size": args.batch}}
    if args.interval is not None:
        overrides["fl"]["task_request_interval"] = args.interval
    _deep_update(overrides, parse_set(args.set))
    fl = job_settings(JOB, overrides)["fl"]  # our job's FLSettings (defaults + overrides)
    if not args.skip_stock and (bad := stock_mismatches(fl)):
        raise SystemExit(f"the stock job cannot mirror {bad}; drop them or pass --skip-stock")
    modes = ["sim", "poc"] if args.mode == "both" else [args.mode]
    labels = ["ours"] if args.skip_stock else ["ours", "stock"]
    order = run_order(labels, args.repeats)
    load0 = os.getloadavg()[0]
    times: dict[str, dict[str, list[list[float]]]] = {m: {lab: [] for lab in labels} for m in modes}
    parts: dict[str, dict[str, list[dict[str, float]]]] = {m: {lab: [] for lab in labels} for m in modes}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir).resolve() if args.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=False if args.workdir else True)
        data = work / "data"
        generate_synthetic_segmentation(data, num_sites=2, volumes_per_site=4, num_slices=12,
                                        size=args.size, num_classes=3, seed=0)
        jobs = {"ours": export_ours(overrides, work / "jobs")}
        if not args.skip_stock:
            jobs["stock"] = export_stock(fl, handler_args_of(jobs["ours"]), data, work / "jobs", args.stock_poll)
        a = [] if args.skip_plain else plain(data, args.rounds, overrides)
        for mode in modes:
            if mode == "sim":
                results = [simulated(jobs[lab], data, args.rounds, work / "sim" / f"{i}-{lab}")
                           for i, lab in enumerate(order)]
            else:
                results = poc([jobs[lab] for lab in order], data, args.rounds, work / "poc_run")
            for lab, (b, pb) in zip(order, results):
                times[mode][lab].append(b)
                parts[mode][lab].append(pb)
    wall = time.perf_counter() - t_start
    print(f"settings: 2 sites, {args.rounds} rounds, {args.steps} steps/round, batch {args.batch}, "
          f"{args.size}px U-Net, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, {args.repeats} repeat(s), run order "
          f"{order}, job settings { {k: v for k, v in overrides.items() if k != 'image_size'} }, latency: "
          f"server.task_request_interval {fl['task_request_interval']} s, task_check_period "
          f"{fl['task_check_period']} s (both jobs); load average {load0:.1f} before / {os.getloadavg()[0]:.1f} "
          f"after; {wall:.0f} s in all")
    ma = statistics.mean(a) if a else None
    if a:
        print(f"(a) plain process : {ma:.3f} s/round  (rounds 2..{args.rounds}: {[round(x, 2) for x in a]})")
    name = {"ours": f"(b) ours ({JOB})", "stock": "(c) stock nvflare (FedAvgRecipe + Client API)" + (
        "" if args.stock_poll is None else f", Client API result polls patched to {args.stock_poll} s (NOT stock)")}
    for mode in modes:
        print(f"== {MODE_TITLE[mode]}")
        mean = {}
        for lab in labels:
            flat = [x for run in times[mode][lab] for x in run]
            mean[lab] = statistics.mean(flat)
            per_run = [round(statistics.mean(run), 3) for run in times[mode][lab]]
            print(f"  {name[lab]}: {mean[lab]:.3f} s/round  (per run {per_run}; rounds 2..{args.rounds} of run 1: "
                  f"{[round(x, 2) for x in times[mode][lab][0]]})")
        s = summarize(ma, mean["ours"], mean.get("stock"))
        if a:
            line = f"  overhead per round (x - a): ours {_fmt(s['overhead_ours'])} s"
            if "stock" in mean:
                line += f", stock {_fmt(s['overhead_stock'])} s"
            print(line + f"   (ours / plain {mean['ours'] / ma:.3f})")
        if "stock" in mean:
            print(f"  ours / stock: round time {_fmt(s['ratio_round'])}, overhead {_fmt(s['ratio_overhead'])}"
                  f"   (target: overhead ratio <= 1.05)")
        if args.breakdown:
            for lab in labels:
                print(f"  where a round of {name[lab]} goes (mean over rounds 2..N of run 1, from log timestamps):")
                for k, v in parts[mode][lab][0].items():
                    print(f"    {v:6.3f} s  {k}")


if __name__ == "__main__":
    main()
