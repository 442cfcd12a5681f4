"""Helpers for the deployment tests: the POC driver (poc/poc.py), job discovery, synthetic data, result checks."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
ASSETS = Path(__file__).resolve().parent / "assets"
NP_JOB = ASSETS / "np_job"
JOBS_DIR = REPO / "jobs"

#: local optimizer steps per round in the POC runs of jobs/ (the deployment test checks plumbing, not learning);
#: set FL_PLUGINS_DEPLOY_FULL_JOBS=1 to run the job folders unmodified
SHRINK_STEPS = 2
FULL_JOBS = os.environ.get("FL_PLUGINS_DEPLOY_FULL_JOBS", "") not in ("", "0")

#: wall-clock limit for one job (2 shared cores; other work may be running). Override with the env var.
JOB_TIMEOUT = float(os.environ.get("FL_PLUGINS_DEPLOY_JOB_TIMEOUT", "900"))


def _load_poc_driver():
    spec = importlib.util.spec_from_file_location("fl_plugins_poc_driver", REPO / "poc" / "poc.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


poc_driver = _load_poc_driver()


# ------------------------------------------------------------------------------------------------ jobs


#: Job variants the POC tests build with ``fl_plugins.flare.job_builder`` when they run (options that no folder in
#: jobs/ exercises, e.g. the quantization filters, which need their classes on the sites' allow list):
#: name -> (registered job, ``build_job`` overrides). Listed by :func:`generated_jobs` as ``GENERATED / name``.
GENERATED_JOBS: dict[str, tuple[str, dict[str, Any]]] = {
    # the ViT segmentation job, float16 on the wire: both the vit_seg model and the quantization filters on POC
    "finetune_seg_vit_fp16": ("finetune_seg_vit", {"fl": {"num_rounds": 2, "quantization": "float16"}}),
}
#: placeholder parent of the generated jobs' paths (no such folder: :func:`export_generated_job` makes the job)
GENERATED = Path("<generated>")


def _wanted_jobs(known: list[str]) -> list[str] | None:
    wanted = [n.strip() for n in os.environ.get("FL_PLUGINS_DEPLOY_JOBS", "").split(",") if n.strip()]
    if not wanted:
        return None
    unknown = set(wanted) - set(known)
    if unknown:
        raise ValueError(f"FL_PLUGINS_DEPLOY_JOBS names unknown jobs {sorted(unknown)}; known: {sorted(known)}")
    return wanted


def repo_jobs() -> list[Path]:
    """Every job folder of the repo (``jobs/<name>/meta.json``); ``FL_PLUGINS_DEPLOY_JOBS=a,b`` picks some (names
    from jobs/ or :data:`GENERATED_JOBS`)."""
    jobs = sorted(p.parent for p in JOBS_DIR.glob("*/meta.json"))
    wanted = _wanted_jobs([j.name for j in jobs] + list(GENERATED_JOBS))
    return jobs if wanted is None else [j for j in jobs if j.name in wanted]


def generated_jobs() -> list[Path]:
    """``GENERATED / name`` for every :data:`GENERATED_JOBS` entry (honours ``FL_PLUGINS_DEPLOY_JOBS``)."""
    wanted = _wanted_jobs([p.parent.name for p in JOBS_DIR.glob("*/meta.json")] + list(GENERATED_JOBS))
    return [GENERATED / n for n in GENERATED_JOBS if wanted is None or n in wanted]


def is_generated(job_dir: Path) -> bool:
    return job_dir.parent == GENERATED


def export_generated_job(job_dir: Path, out: Path) -> Path:
    """Build and export the generated job ``GENERATED / name`` into ``out / name`` (meta.json named ``name``)."""
    from fl_plugins.flare.job_builder import build_job

    name = job_dir.name
    base, overrides = GENERATED_JOBS[name]
    build_job(base, overrides).export_job(str(out / "_export" / name))
    dst = out / name
    shutil.move(str(out / "_export" / name / base), dst)
    meta = json.loads((dst / "meta.json").read_text())
    meta["name"] = name
    (dst / "meta.json").write_text(json.dumps(meta, indent=2))
    return dst


def read_server_config(job_dir: Path) -> dict[str, Any]:
    """The server app config of a job (the app deployed to the server in meta.json's deploy_map)."""
    meta = json.loads((job_dir / "meta.json").read_text())
    app = "app"
    for name, targets in (meta.get("deploy_map") or {}).items():
        if "server" in targets or "@ALL" in targets:
            app = name
            break
    return json.loads((job_dir / app / "config" / "config_fed_server.json").read_text())


def _components(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in cfg.get("components", []) if isinstance(c, dict)]


def expected_global_models(job_dir: Path) -> list[str]:
    """Paths (relative to the downloaded server workspace) where the job's persistor writes the global model."""
    cfg = read_server_config(job_dir)
    persistor_ids = {"persistor"}
    for wf in cfg.get("workflows", []):
        pid = (wf.get("args") or {}).get("persistor_id")
        if pid:
            persistor_ids.add(pid)
    out = []
    for c in _components(cfg):
        path, args = c.get("path", ""), c.get("args") or {}
        if c.get("id") not in persistor_ids and "persistor" not in path.lower():
            continue
        if path.endswith("NPModelPersistor"):
            out.append(f"{args.get('model_dir', 'models')}/{args.get('model_name', 'server.npy')}")
        else:  # PTFileModelPersistor and subclasses (fl_plugins ConfigModelPersistor)
            out.append(f"app_server/{args.get('global_model_file_name', 'FL_global_model.pt')}")
    if not out:  # e.g. FedAvg saving by itself (save_filename)
        for wf in cfg.get("workflows", []):
            fn = (wf.get("args") or {}).get("save_filename")
            if fn:
                out.append(f"app_server/{fn}")
    return out


def expected_tb_folder(job_dir: Path) -> str | None:
    """The server's TensorBoard folder if the job streams metrics to the server (TBAnalyticsReceiver)."""
    for c in _components(read_server_config(job_dir)):
        if c.get("path", "").endswith("TBAnalyticsReceiver"):
            return (c.get("args") or {}).get("tb_folder", "tb_events")
    return None


#: job-name pattern -> (generator in fl_plugins.data, kwargs); the first match wins. Extend for new jobs.
#: (Same sizes as the project-wide synth_seg_data / synth_cls_data fixtures in tests/conftest.py.)
JOB_DATA: list[tuple[str, str, dict[str, Any]]] = [
    (r"cls|class|meduniverse", "generate_synthetic_multitask",  # classification sites (stage-wise: 2 tasks)
     {"class_counts": (2, 2), "images_per_site": 60, "size": 28, "seed": 0}),
    (r".*", "generate_synthetic_segmentation",  # segmentation fine-tuning and DINO/DINOv2 pretraining (slices)
     {"num_sites": 2, "volumes_per_site": 4, "num_slices": 12, "size": 64, "num_classes": 3, "seed": 0}),
]


def data_generator_for(job_name: str) -> tuple[str, Callable[..., Any] | None, dict[str, Any]]:
    """(generator name, function or None if missing, kwargs) for a job."""
    for pattern, fn_name, kwargs in JOB_DATA:
        if re.search(pattern, job_name):
            try:
                import fl_plugins.data as data
            except ImportError:
                return fn_name, None, kwargs
            return fn_name, getattr(data, fn_name, None), kwargs
    raise AssertionError("JOB_DATA has a catch-all pattern")


def long_np_job(dst: Path, rounds: int = 20, sleep_time: int = 2, name: str = "np_fault") -> Path:
    """A copy of the numpy job with more (and slower) rounds, to interfere with while it runs."""
    shutil.copytree(NP_JOB, dst)
    meta = json.loads((dst / "meta.json").read_text())
    meta["name"] = name
    (dst / "meta.json").write_text(json.dumps(meta))
    srv_path = dst / "app" / "config" / "config_fed_server.json"
    srv = json.loads(srv_path.read_text())
    srv["workflows"][0]["args"]["num_rounds"] = rounds
    srv_path.write_text(json.dumps(srv))
    cli_path = dst / "app" / "config" / "config_fed_client.json"
    cli = json.loads(cli_path.read_text())
    cli["executors"][0]["executor"]["args"]["sleep_time"] = sleep_time
    cli_path.write_text(json.dumps(cli))
    return dst


def np_fedavg_job(
    dst: Path,
    rounds: int = 3,
    sleep_time: int = 3,
    min_clients: int = 2,
    dead_client_grace_period: float | None = None,
    name: str = "np_fedavg",
    round_timeout: int | None = None,
) -> Path:
    """The numpy job (NPTrainer/NPValidator, NPModelPersistor: no torch, quick to start) run by fl_plugins'
    ``FedAvgWithFinalValidation`` (every connected site per round, lost sites dropped, final ``validate`` phase).

    ``round_timeout`` (seconds) is the workflow's (default: the controller's). ``dead_client_grace_period`` (seconds)
    goes into the server app config, where FLARE's workflow communicator
    reads it (``ConfigService``, application config; what ``FedJob(fail_fast=True)`` sets to 0).
    """
    shutil.copytree(NP_JOB, dst)
    meta = json.loads((dst / "meta.json").read_text())
    meta.update(name=name, min_clients=min_clients)
    (dst / "meta.json").write_text(json.dumps(meta))
    srv_path = dst / "app" / "config" / "config_fed_server.json"
    srv = json.loads(srv_path.read_text())
    srv["workflows"] = [{
        "id": "controller",
        "path": "fl_plugins.flare.controllers.FedAvgWithFinalValidation",
        "args": {"num_clients": min_clients, "num_rounds": rounds, "persistor_id": "persistor",
                 "task_check_period": 0.1, **({"round_timeout": round_timeout} if round_timeout is not None else {})},
    }]
    srv["components"] = [c for c in srv["components"] if c["id"] == "persistor"]
    if dead_client_grace_period is not None:
        srv["dead_client_grace_period"] = dead_client_grace_period
    srv_path.write_text(json.dumps(srv, indent=2))
    cli_path = dst / "app" / "config" / "config_fed_client.json"
    cli = json.loads(cli_path.read_text())
    cli["executors"] = [
        {"tasks": ["train"], "executor": {"path": "nvflare.app_common.np.np_trainer.NPTrainer",
                                          "args": {"delta": 1, "sleep_time": sleep_time}}},
        {"tasks": ["validate"], "executor": {"path": "nvflare.app_common.np.np_validator.NPValidator", "args": {}}},
    ]
    cli_path.write_text(json.dumps(cli, indent=2))
    return dst


def shrunk_job_copy(job_dir: Path, dst: Path, steps: int = SHRINK_STEPS) -> tuple[Path, list[str]]:
    """Copy a job folder, lowering every client-side ``steps_per_round`` (stage-wise jobs: ``steps_per_stage``) to
    ``steps``; returns (copy, changes)."""
    shutil.copytree(job_dir, dst)
    changes: list[str] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("steps_per_round", "steps_per_stage") and isinstance(v, int) and v > steps:
                    node[k] = steps
                    changes.append(f"{where}.{k}: {v} -> {steps}")
                else:
                    walk(v, f"{where}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")

    for cfg_path in dst.glob("*/config/config_fed_client.json"):
        cfg = json.loads(cfg_path.read_text())
        walk(cfg, cfg_path.relative_to(dst).as_posix())
        cfg_path.write_text(json.dumps(cfg, indent=2))
    return dst, changes


# ------------------------------------------------------------------------------------------------ results


def tb_scalar_tags(event_dir: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_dir))
    acc.Reload()
    return list(acc.Tags().get("scalars", []))


def check_job_result(job_dir: Path, result: dict[str, Any], workspace: Path, sites: list[str]) -> dict[str, Any]:
    """Assert a finished job's outcome: COMPLETED, global model file(s), TensorBoard scalars per site."""
    assert result["status"] == "FINISHED:COMPLETED", f"{job_dir.name}: {result}"
    assert workspace.is_dir(), f"no downloaded server workspace at {workspace}"
    report: dict[str, Any] = {"models": [], "tb": {}}
    models = expected_global_models(job_dir)
    assert models, f"{job_dir.name}: cannot tell which global model file the job writes (no persistor found)"
    for rel in models:
        f = workspace / rel
        assert f.is_file() and f.stat().st_size > 0, f"{job_dir.name}: missing global model {f}"
        report["models"].append(rel)
    tb = expected_tb_folder(job_dir)
    if tb is not None:
        for site in sites:
            events = sorted((workspace / tb / site).glob("events.out.tfevents.*"))
            assert events, f"{job_dir.name}: no TensorBoard events in {workspace / tb / site}"
            tags = tb_scalar_tags(workspace / tb / site)
            assert tags, f"{job_dir.name}: no scalar tag in {events}"
            report["tb"][site] = tags
    return report


def listening_addresses(port: int) -> list[str]:
    """Local addresses in LISTEN state on ``port`` (from /proc/net/tcp{,6}; no external tool needed)."""
    out = []
    for name, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            host_hex, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:
                continue
            if v6:
                out.append(f"[{host_hex}]:{port}")  # IPv6 (raw hex); never expected from our servers
            else:
                b = bytes.fromhex(host_hex)[::-1]
                out.append(".".join(str(x) for x in b) + f":{port}")
    return out


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
