"""Fault behaviour documented in docs/deployment.md ("When things fail"), checked on the real POC system.

A site's training process (the FLARE client *job* process of site-2) is killed with SIGKILL in the middle of a
round. nvflare 2.9.0: the site's FLARE client (still running) reports the job process's abnormal exit to the server,
which fails the whole job at once -- whatever ``min_clients`` says -- with status FINISHED:EXECUTION_EXCEPTION.
The global model of the last completed round stays in the job result; both sites stay connected and accept the
next job.
"""

from __future__ import annotations

import re
import signal
import time

import pytest

from .conftest import record_timing
from .deploy_utils import long_np_job, poc_driver, wait_for

pytestmark = pytest.mark.slow


def _job_processes(poc, job_id: str, site: str) -> list[tuple[int, str]]:
    return [(pid, cmd) for pid, cmd in poc.processes()
            if "worker_process" in cmd and job_id in cmd and f"-c {site} " in cmd]


def test_site_job_process_killed_mid_round(poc, tmp_path):
    job = long_np_job(tmp_path / "np_fault")
    job_id = poc.submit(job)
    server_job_log = poc.site_dir(poc.server_name) / job_id / "log.txt"

    def in_round_1():
        return server_job_log.is_file() and "Round 1 started" in server_job_log.read_text(errors="replace")

    wait_for(in_round_1, timeout=300, what="round 1 to start")
    victims = wait_for(lambda: _job_processes(poc, job_id, "site-2"), timeout=30, what="site-2's job process")
    assert len(victims) == 1, victims
    poc_driver._signal(victims[0][0], signal.SIGKILL)
    t_kill = time.monotonic()

    result = poc.nvflare("job", "wait", job_id, "--timeout", "240", "--interval", "1", kit=True, check=False,
                         timeout=300)
    detected_after = time.monotonic() - t_kill
    record_timing("fault: site-2 job process killed -> job failed", detected_after)
    status = (result.get("data") or {}).get("status")
    assert status == "FINISHED:EXECUTION_EXCEPTION", result
    assert detected_after < 120, f"job took {detected_after:.0f}s to fail after the kill"

    parent_log = (poc.site_dir(poc.server_name) / "log.txt").read_text(errors="replace")
    assert f"Failing job {job_id} due to reported failure from site-2" in parent_log

    path = poc.download(job_id, tmp_path / "results")
    log = (path / "workspace" / "log.txt").read_text(errors="replace")
    assert "Round 0 finished" in log and "Round 19 finished" not in log
    assert (path / "workspace" / "models" / "server.npy").is_file(), "last completed round's global model is kept"

    # the other site's job process ends too; both sites stay connected and idle
    wait_for(lambda: not _job_processes(poc, job_id, "site-1"), timeout=60, what="site-1's job process to end")
    status = poc.wait_ready(timeout=60)
    assert {c["client_name"] for c in status["clients"]} == set(poc.sites)


def test_site_client_killed_and_restarted_mid_round(poc, tmp_path):
    """The site's FLARE client process (``pid.fl``) is killed mid-round; its supervising loop (``daemon_pid.fl``,
    startup/sub_start.sh) restarts it within seconds and it logs in again. nvflare 2.9.0 does not notice that the
    re-registered site lost its part of the job: the round never completes and the job stays RUNNING until an admin
    aborts it (then FINISHED:ABORTED). Checked here for 30 s; by hand it stayed RUNNING for 9 minutes.
    """
    job = long_np_job(tmp_path / "np_fault2")
    job_id = poc.submit(job)
    server_job_log = poc.site_dir(poc.server_name) / job_id / "log.txt"

    def in_round_1():
        return server_job_log.is_file() and "Round 1 started" in server_job_log.read_text(errors="replace")

    wait_for(in_round_1, timeout=300, what="round 1 to start")
    site2 = poc.site_dir("site-2")
    daemon = int((site2 / "daemon_pid.fl").read_text())
    old_cp = int((site2 / "pid.fl").read_text())
    orphans = _job_processes(poc, job_id, "site-2")
    assert len(orphans) == 1 and any(pid == old_cp for pid, _ in poc.processes()), (orphans, old_cp)
    poc_driver._signal(old_cp, signal.SIGKILL)
    t_kill = time.monotonic()

    def restarted():
        try:
            pid = int((site2 / "pid.fl").read_text())
        except (OSError, ValueError):
            return None
        return pid if pid != old_cp and any(p == pid for p, _ in poc.processes()) else None

    wait_for(restarted, timeout=60, what="the supervising loop to restart site-2's client")
    assert any(p == daemon for p, _ in poc.processes()), "the supervising loop itself must survive"
    poc.wait_ready(timeout=90)
    record_timing("fault: site-2 client killed -> restarted and reconnected", time.monotonic() - t_kill)

    rounds_at_kill = len(re.findall(r"Round \d+ finished", server_job_log.read_text(errors="replace")))
    time.sleep(max(0.0, 30 - (time.monotonic() - t_kill)))
    meta = poc.nvflare("job", "meta", job_id, kit=True)["data"]
    assert meta["status"] == "RUNNING", meta
    rounds_now = len(re.findall(r"Round \d+ finished", server_job_log.read_text(errors="replace")))
    assert rounds_now <= rounds_at_kill + 1, f"rounds went on: {rounds_at_kill} -> {rounds_now}"
    clients = {c["client_name"]: c for c in poc.status()["client_status"]}
    assert clients["site-2"]["status"] == "no_jobs" and clients["site-1"].get("job_id") == job_id, clients

    t0 = time.monotonic()
    poc.nvflare("job", "abort", job_id, "--force", kit=True)
    result = poc.wait(job_id, timeout=120)
    assert result["status"] == "FINISHED:ABORTED", result
    record_timing("fault: admin abort of the hung job", time.monotonic() - t0)

    # the killed client's job process was orphaned; it is ours, so it must not outlive the test
    try:
        wait_for(lambda: not _job_processes(poc, job_id, "site-2"), timeout=15, what="orphaned job process to exit")
        record_timing("fault: orphaned site-2 job process exited after kill", time.monotonic() - t_kill)
    except AssertionError:
        for pid, _ in _job_processes(poc, job_id, "site-2"):
            poc_driver._signal(pid, signal.SIGKILL)
        record_timing("fault: orphaned site-2 job process still alive (killed) after", time.monotonic() - t_kill)
    wait_for(lambda: not _job_processes(poc, job_id, "site-1"), timeout=60, what="site-1's job process to end")
    poc.wait_ready(timeout=60)
