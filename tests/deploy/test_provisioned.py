"""Production path on loopback: ``nvflare provision`` from poc/production/project.yml (server renamed ``localhost``,
free port, 2 hospitals), ``configure_site`` on every kit, ``startup/start.sh`` on server and sites, jobs through the
FLARE admin API (``new_secure_session``), a server crash during a job, ``shutdown all``, and no process left behind.

The tests of this module share one provisioned system and run in file order; the last one shuts it down.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from fl_plugins.flare.site_setup import configure_workspace

from .conftest import record_timing
from .deploy_utils import (
    JOB_TIMEOUT,
    NP_JOB,
    REPO,
    check_job_result,
    listening_addresses,
    np_fedavg_job,
    poc_driver,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:ssl_context is deprecated:DeprecationWarning")]

TEMPLATE = REPO / "poc" / "production" / "project.yml"
SITES = ["hospital-a", "hospital-b"]


def _project(port: int) -> tuple[dict, str]:
    """The production template with server -> localhost:port, 2 hospitals; returns (project, project admin)."""
    project = yaml.safe_load(TEMPLATE.read_text())
    parts = project["participants"]
    server = next(p for p in parts if p["type"] == "server")
    server["name"], server["fed_learn_port"] = "localhost", port  # loopback name => binds 127.0.0.1 only
    orgs = {s.replace("-", "_") for s in SITES} | {server["org"]}
    project["participants"] = [server] + [p for p in parts if p["type"] == "client" and p["name"] in SITES] + [
        p for p in parts if p["type"] == "admin" and p["org"] in orgs
    ]
    admin = next(p["name"] for p in parts if p.get("role") == "project_admin")
    return project, admin


class ProvSystem:
    def __init__(self, root: Path):
        self.root = root
        self.port = poc_driver.free_port()
        self.project, self.admin = _project(self.port)
        self.prod = root / "ws" / self.project["name"] / "prod_00"
        self.marker = str(self.prod) + os.sep
        home = root / "home"
        home.mkdir(parents=True, exist_ok=True)
        self.env = poc_driver.python_env(home)
        self.env.pop("FL_PLUGINS_DATALIST", None)
        self.pgids: list[int] = []
        self.session: Any = None
        self.preflight: dict[str, dict[str, Any]] = {}

    def connect(self, timeout: float = 120):
        from nvflare.fuel.flare_api.flare_api import new_secure_session

        if self.session is not None:
            self.session.close()
        self.session = new_secure_session(self.admin, str(self.prod / self.admin), timeout=timeout)
        return self.session

    def wait_sites(self, timeout: float = 180) -> None:
        def connected():
            try:
                return set(SITES) <= {c.name for c in self.session.get_connected_client_list()}
            except Exception:
                return False

        wait_for(connected, timeout=timeout, what="both hospitals to connect", interval=1)

    def preflight_check(self, name: str) -> dict[str, Any]:
        out = poc_driver.run_nvflare(["preflight-check", "-p", self.prod / name], self.env, timeout=180, check=False)
        return out.get("data") or out

    def server_pid(self) -> int:
        return int((self.prod / "localhost" / "pid.fl").read_text())


@pytest.fixture(scope="module")
def prov(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProvSystem]:
    system = ProvSystem(tmp_path_factory.mktemp("prov"))
    (system.root / "project.yml").write_text(yaml.safe_dump(system.project, sort_keys=False))
    try:
        t0 = time.monotonic()
        poc_driver.run_nvflare(["provision", "-p", system.root / "project.yml", "-w", system.root / "ws", "--force"],
                               system.env)
        configure_workspace(system.prod, {s: f"/data/{s}/datalist.json" for s in SITES})
        record_timing("prov: provision + configure_site", time.monotonic() - t0)
        t0 = time.monotonic()
        for name in ["localhost", *SITES]:
            if name in ("localhost", SITES[0]):  # the server's check binds its port: before it starts; a
                system.preflight[name] = system.preflight_check(name)  # site's check needs the server up
            with open(system.prod / name / "console.log", "w") as log:
                p = subprocess.Popen([str(system.prod / name / "startup" / "start.sh")], cwd=system.prod / name,
                                     env=system.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
            system.pgids.append(p.pid)
            p.wait(timeout=30)  # start.sh backgrounds sub_start.sh (the supervising loop) and returns
            if name == "localhost":
                system.connect()
        system.wait_sites()
        record_timing("prov: start.sh until 2/2 sites connected", time.monotonic() - t0)
        yield system
    finally:
        if system.session is not None:
            try:
                system.session.close()
            except Exception:
                pass
        poc_driver.kill_processes(system.marker, pgids=system.pgids)


def test_kits_and_site_configuration(prov):
    for name, result in prov.preflight.items():  # nvflare preflight-check on the configured kits
        assert result.get("overall") == "pass", (name, result)
    srv = json.loads((prov.prod / "localhost" / "startup" / "fed_server.json").read_text())
    assert srv["servers"][0]["service"]["target"] == f"localhost:{prov.port}"
    res = json.loads((prov.prod / "localhost" / "local" / "resources.json").read_text())
    assert "fl_plugins." in res["class_allow_list"]
    storage = [c["args"]["uri_root"] for c in res["components"] if c["id"] == "job_manager"]
    assert storage == [str((prov.prod / "localhost" / "jobs-storage").resolve())]
    for s in SITES:
        assert json.loads((prov.prod / s / "local" / "fl_plugins_site.json").read_text()) == {
            "datalist": f"/data/{s}/datalist.json"}
    ours = listening_addresses(prov.port)
    assert ours and all(a.startswith("127.0.0.1:") for a in ours), ours  # never 0.0.0.0


def test_job_through_admin_api(prov, tmp_path):
    job = shutil.copytree(NP_JOB, tmp_path / "np_job")  # Session.submit_job signs the folder in place
    t0 = time.monotonic()
    job_id = prov.session.submit_job(str(job))
    meta = prov.session.wait_for_job(job_id, timeout=JOB_TIMEOUT, poll_interval=1)
    path = Path(prov.session.download_job_result(job_id, str(tmp_path / "results")))
    record_timing("prov: admin API submit+run+download", time.monotonic() - t0)
    check_job_result(NP_JOB, {"status": meta["status"]}, path / "workspace", SITES)


def test_server_crash_during_job_then_resume_finishes_the_last_rounds(prov, tmp_path):
    """Server (parent + job process) killed in round 2 of a 4-round job; its supervising loop restarts it and the
    sites reconnect.

    nvflare 2.9.0 has no snapshot resume: the job record stays RUNNING with nothing running ("zombie"); abort is
    refused ("not running"). The workflow (``FedAvgWithFinalValidation``) wrote ``round_checkpoint.pt`` after round
    1; ``flssl resume`` turns it and the job folder into a new job that runs rounds 2 and 3 only (0-based) and ends
    with the model an uninterrupted run gives: NPTrainer adds 1 to every weight each round, so after 4 rounds the
    global model is the initial one + 4, exactly (float32 means of equal integers).
    """
    job = np_fedavg_job(tmp_path / "np_crash", rounds=4, sleep_time=2, min_clients=2, name="np_crash")
    job_id = prov.session.submit_job(str(job))
    server_job_dir = prov.prod / "localhost" / job_id
    server_job_log = server_job_dir / "log.txt"
    wait_for(lambda: server_job_log.is_file() and "Round 2 started" in server_job_log.read_text(errors="replace"),
             timeout=300, what="round 2 to start")
    old_pid = prov.server_pid()
    job_procs = [pid for pid, cmd in poc_driver.find_processes(prov.marker)
                 if "runner_process" in cmd and job_id in cmd]
    assert len(job_procs) == 1, job_procs
    for pid in (old_pid, job_procs[0]):
        poc_driver._signal(pid, signal.SIGKILL)
    t_kill = time.monotonic()
    prov.session.close()
    prov.session = None
    assert "Round 3 started" not in server_job_log.read_text(errors="replace"), "killed too late"

    def restarted():
        try:
            pid = prov.server_pid()
        except (OSError, ValueError):
            return None
        return pid if pid != old_pid and any(p == pid for p, _ in poc_driver.find_processes(prov.marker)) else None

    wait_for(restarted, timeout=90, what="the supervising loop to restart the server")
    prov.connect(timeout=120)
    prov.wait_sites()
    record_timing("prov: server killed -> restarted, sites reconnected", time.monotonic() - t_kill)

    # the sites' job processes notice the server job is gone and exit; the job record does not change
    wait_for(lambda: not [c for _, c in poc_driver.find_processes(prov.marker) if job_id in c], timeout=120,
             what="the sites' job processes of the crashed job to exit", interval=1)
    record_timing("prov: server killed -> sites' job processes gone", time.monotonic() - t_kill)
    assert prov.session.get_job_meta(job_id)["status"] == "RUNNING"  # zombie: nothing runs it
    with pytest.raises(Exception, match="not running"):
        prov.session.abort_job(job_id)

    checkpoint = server_job_dir / "app_server" / "round_checkpoint.pt"
    resumed = tmp_path / "np_crash_resume"
    out = subprocess.run([sys.executable, "-m", "fl_plugins.cli", "resume", "--checkpoint", str(checkpoint),
                          "--job", str(job), "--out", str(resumed)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"resumes run {job_id} of job {job_id} after its round 1, runs rounds 2..3" in out.stdout

    t0 = time.monotonic()
    resumed_id = prov.session.submit_job(str(resumed))
    meta = prov.session.wait_for_job(resumed_id, timeout=JOB_TIMEOUT, poll_interval=1)
    assert meta["status"] == "FINISHED:COMPLETED", meta
    record_timing("prov: resumed job (rounds 2-3 of 4) to completion", time.monotonic() - t0)
    path = Path(prov.session.download_job_result(resumed_id, str(tmp_path / "results")))
    log = (path / "workspace" / "log.txt").read_text(errors="replace")
    assert re.findall(r"Round (\d+) started", log) == ["2", "3"], "only the rounds the crash left undone"
    assert f"resuming job {job_id} from" in log and "this job runs rounds 2..3" in log
    final = np.load(path / "workspace" / "models" / "server.npy")
    expected = np.arange(1, 10, dtype=np.float32).reshape(3, 3) + 4  # NPModelPersistor's initial model + 4 rounds
    np.testing.assert_array_equal(final, expected)
    assert prov.session.get_job_meta(job_id)["status"] == "RUNNING"  # the zombie record stays


def test_shutdown_all_leaves_no_process(prov):
    if prov.session is None:
        prov.connect()
    t0 = time.monotonic()
    prov.session.shutdown("all")
    prov.session = None
    wait_for(lambda: not poc_driver.find_processes(prov.marker), timeout=90, what="all FLARE processes to exit",
             interval=0.5)
    record_timing("prov: shutdown all until no process left", time.monotonic() - t0)
