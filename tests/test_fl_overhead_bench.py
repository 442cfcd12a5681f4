"""Pure helpers of benchmarks/fl_overhead.py (no FLARE run, nothing timed)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("fl_overhead_bench", REPO / "benchmarks" / "fl_overhead.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _fl(**kw):
    import dataclasses

    from fl_plugins.flare.job_builder import FLSettings

    return {**dataclasses.asdict(FLSettings()), **kw}


def test_stock_job_takes_our_fl_settings(bench):
    fl = _fl(num_rounds=6, task_request_interval=0.05, task_check_period=0.02)
    assert bench.stock_mismatches(fl) == []
    args = bench.stock_recipe_args(fl)
    assert args["num_rounds"] == 6 and args["min_clients"] == fl["min_clients"]
    assert args["key_metric"] == fl["key_metric"]
    assert args["server_memory_gc_rounds"] == fl["server_memory_gc_rounds"]
    assert args["client_memory_gc_rounds"] == fl["client_memory_gc_rounds"]
    server, controller = bench.stock_latency(fl)
    assert server == {"server": {"task_request_interval": 0.05}}
    assert controller == {"task_check_period": 0.02}


def test_settings_the_stock_job_cannot_mirror_are_named(bench):
    bad = bench.stock_mismatches(_fl(quantization="float16", controller="fcl", aggregator="other"))
    assert any("quantization" in b for b in bad) and any("controller" in b for b in bad)
    assert any("aggregator" in b for b in bad)
    assert bench.stock_mismatches(_fl(aggregator="weighted_average")) == []


def test_run_order_alternates(bench):
    assert bench.run_order(["ours", "stock"], 1) == ["ours", "stock"]
    assert bench.run_order(["ours", "stock"], 3) == ["ours", "stock", "stock", "ours", "ours", "stock"]
    assert bench.run_order(["ours"], 2) == ["ours", "ours"]


def test_summarize(bench):
    s = bench.summarize(0.5, 1.0, 1.5)
    assert s["overhead_ours"] == pytest.approx(0.5) and s["overhead_stock"] == pytest.approx(1.0)
    assert s["ratio_round"] == pytest.approx(1.0 / 1.5) and s["ratio_overhead"] == pytest.approx(0.5)
    assert bench.summarize(None, 1.0, 2.0)["ratio_overhead"] is None
    assert bench.summarize(None, 1.0, 2.0)["ratio_round"] == pytest.approx(0.5)
    assert bench.summarize(0.5, 1.0, None)["ratio_round"] is None
    assert bench.summarize(2.0, 1.0, 1.5)["ratio_overhead"] is None  # stock overhead not positive


def test_round_times_from_both_controllers_log_lines(bench):
    ours = "2026-01-01 10:00:0{}.000 - FedAvgWithFinalValidation - INFO - [identity=server] - Aggregated 2/2 results"
    stock = "2026-01-01 10:00:0{},500 - FedAvg - INFO - [identity=server] - Aggregated {}/2 results"
    lines = [stock.format(1, 1), stock.format(2, 2), stock.format(3, 1), stock.format(5, 2), stock.format(6, 2)]
    assert bench._round_times(lines, 3) == pytest.approx([3.0, 1.0])
    with pytest.raises(SystemExit):
        bench._round_times([ours.replace(".000", ",000").format(1)], 3)


def test_handler_args_of_reads_our_exported_job(bench, tmp_path):
    cfg = {"executors": [{"tasks": ["train"], "executor": {
        "path": "fl_plugins.flare.executor.HandlerExecutor",
        "args": {"handler": "finetune", "handler_args": {"model": {"arch": "unet", "num_classes": 3}}}}}]}
    (tmp_path / "app" / "config").mkdir(parents=True)
    (tmp_path / "app" / "config" / "config_fed_client.json").write_text(json.dumps(cfg))
    assert bench.handler_args_of(tmp_path) == {"model": {"arch": "unet", "num_classes": 3}}
    cfg["executors"][0]["executor"]["args"]["handler"] = "ssl"
    (tmp_path / "app" / "config" / "config_fed_client.json").write_text(json.dumps(cfg))
    with pytest.raises(SystemExit):
        bench.handler_args_of(tmp_path)
