"""What FCL's feature exchange costs per round: bytes per site (features and weights separately) and the wall time of
each phase as a share of the round, measured in one FLARE simulator run of the shipped ``fcl_pretrain`` job.

Per round r (from the run's TensorBoard events: the server's ``fcl/*`` scalars and every site's):

* exchange phase (server ``fcl/extract_seconds``: from sending ``extract_features`` to the last answer) split into
  the sites' own extraction compute (max over sites of ``fcl/extract_compute_seconds``) and the rest, FLARE's
  polling and transfer (the "seconds of polling" the phase adds);
* training phase = round wall time (between the server's exchange events of rounds r and r + 1) - exchange phase;
* bytes per site: weights down (once, with the extraction task) and up (the train result), float32, from the
  method's federated state; features up (the site's ``M x (D_f + 1)`` arrays) and down (the other sites').

Prints a table of rounds 1.. (round 0 includes start-up) and the medians as ratios of the round; then runs
``fcl_noexchange_pretrain`` with the same settings and prints both median round times (aggregation to aggregation):
their difference is what the exchange costs a round (the weights travel once per round in both).

    python benchmarks/fcl_exchange.py                                   # 3 synthetic sites, 5 rounds x 5 steps
    python benchmarks/fcl_exchange.py --data runs/acdc3 --rounds 4 --steps 20
    python benchmarks/fcl_exchange.py --set exchange.feature_dtype=float16 --set exchange.max_features=256
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def scalars(path: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path))
    acc.Reload()
    return {t: acc.Scalars(t) for t in acc.Tags()["scalars"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="folder of <site>/datalist.json (default: 3 generated sites)")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--set", action="append", default=[], help="job setting KEY=VALUE")
    a = p.parse_args(argv)

    from fl_plugins.cli import main as flssl
    from fl_plugins.flare.job_builder import job_settings
    from fl_plugins.methods import build
    from fl_plugins.settings import parse_set

    tmp = Path(tempfile.mkdtemp(prefix="fcl_bench_"))
    data = Path(a.data) if a.data else tmp / "data"
    if not a.data:
        from fl_plugins.data import generate_synthetic_segmentation

        generate_synthetic_segmentation(data, num_sites=a.sites, volumes_per_site=8, num_slices=12, size=64, seed=0)
    sets = [f"steps_per_round={a.steps}", *a.set]
    # one simulator thread per site: with fewer, the simulator swaps sites in and out and every swap restarts a
    # site's handler (data loading inside the measured phases: 25-30 s of a 58 s round in a first run)
    for job, ws in (("fcl_pretrain", "ws"), ("fcl_noexchange_pretrain", "ws_noexchange")):
        rc = flssl(["simulate", "--job", job, "--data", str(data), "-w", str(tmp / ws), "--sites",
                    str(a.sites), "--threads", str(a.sites), "--rounds", str(a.rounds), "--quiet",
                    *[x for s in sets for x in ("--set", s)]])
        if rc != 0:
            print(f"{job}: simulation failed (rc {rc}); log: {tmp / (ws + '_simulate.log')}", file=sys.stderr)
            return rc
    s = job_settings("fcl_pretrain", parse_set(sets))
    weights = sum(v.numel() * 4 for v in build("fcl", s["fcl"]).federated_state_dict().values())
    tb = tmp / "ws" / "server" / "simulate_job" / "tb_events"
    server = scalars(tb / "simulator_server")
    sites = {d.name: scalars(d) for d in sorted(tb.iterdir()) if d.name != "simulator_server"}
    ex = server["fcl/extract_seconds"]
    rows = []
    for i in range(1, len(ex) - 1):
        r = ex[i].step
        round_s = ex[i + 1].wall_time - ex[i].wall_time
        compute = max(next(e.value for e in sc["fcl/extract_compute_seconds"] if e.step == r) for sc in sites.values())
        up = [next(e.value for e in sc["fcl/features_shared"] if e.step == r) for sc in sites.values()]
        rows.append({"round": r, "round_s": round_s, "exchange_s": ex[i].value, "extract_compute_s": compute,
                     "polling_s": ex[i].value - compute, "train_s": round_s - ex[i].value,
                     "features_up_per_site": statistics.mean(up)})
    dim = int(s["fcl"].get("proj_dim", 128))
    fbytes = 2 if s["exchange"].get("feature_dtype") == "float16" else 4
    per_feature = dim * fbytes + 4
    n = len(sites)
    mean_up = statistics.mean(r["features_up_per_site"] for r in rows) if rows else 0.0
    print(f"{n} sites, {a.rounds} rounds x {a.steps} steps; weights {weights / 1e6:.2f} MB each way per site per "
          f"round; features {mean_up:.0f} per site, {per_feature} bytes each")
    print("round  round_s  exchange_s  (site compute  polling/transfer)  train_s")
    for r in rows:
        print(f"{r['round']:5d}  {r['round_s']:7.2f}  {r['exchange_s']:10.2f}  ({r['extract_compute_s']:12.2f}  "
              f"{r['polling_s']:16.2f})  {r['train_s']:7.2f}")
    if rows:
        med = {k: statistics.median(r[k] for r in rows) for k in ("round_s", "exchange_s", "extract_compute_s",
                                                                  "polling_s", "train_s")}
        feat_up = mean_up * per_feature
        feat_down = (n - 1) * feat_up
        summary = {
            "bytes_per_site_per_round": {"weights_down": weights, "weights_up": weights, "features_up": feat_up,
                                         "features_down": feat_down,
                                         "features_share_of_traffic": (feat_up + feat_down)
                                         / (2 * weights + feat_up + feat_down)},
            "median_seconds": med,
            "share_of_round": {k: med[k] / med["round_s"] for k in ("exchange_s", "extract_compute_s", "polling_s",
                                                                     "train_s")},
        }
        # the same job without the exchange: round wall time between consecutive aggregations (the server's
        # rejected_updates scalar is written once per round), rounds 1..
        plain = scalars(tmp / "ws_noexchange" / "server" / "simulate_job" / "tb_events" / "simulator_server")
        agg = plain["rejected_updates"]
        plain_rounds = [agg[i + 1].wall_time - agg[i].wall_time for i in range(len(agg) - 1)]
        with_ex = scalars(tb / "simulator_server")["rejected_updates"]
        ex_rounds = [with_ex[i + 1].wall_time - with_ex[i].wall_time for i in range(len(with_ex) - 1)]
        summary["round_s_median"] = {"with_exchange": statistics.median(ex_rounds),
                                     "without_exchange": statistics.median(plain_rounds)}
        summary["exchange_cost_s"] = statistics.median(ex_rounds) - statistics.median(plain_rounds)
        print(json.dumps(summary, indent=1))
    print(f"run folder: {tmp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
