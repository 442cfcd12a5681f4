"""Sites sharing one machine split its cores: fl_plugins.cpu_threads, and the launchers that use it."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest

from fl_plugins import cli
from fl_plugins.cpu_threads import THREAD_VARS, site_thread_env, threads_per_site


@pytest.mark.parametrize(
    ("sites", "cores", "expected"),
    [(1, 2, 2), (2, 2, 1), (3, 2, 1), (2, 16, 8), (3, 16, 5), (16, 16, 1), (1, 1, 1)],
)
def test_threads_per_site(sites, cores, expected):
    assert threads_per_site(sites, cores) == expected


def test_threads_per_site_rejects_no_sites():
    with pytest.raises(ValueError, match="parallel_sites must be >= 1, got 0"):
        threads_per_site(0, 4)


def test_env_sets_unset_vars_and_keeps_the_users():
    base = {"PATH": "/bin", "MKL_NUM_THREADS": "3", "OPENBLAS_NUM_THREADS": ""}
    env = site_thread_env(2, base, cpu_count=8)
    assert env == {"PATH": "/bin", "OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "3", "OPENBLAS_NUM_THREADS": "4"}
    assert base == {"PATH": "/bin", "MKL_NUM_THREADS": "3", "OPENBLAS_NUM_THREADS": ""}  # not modified


@pytest.mark.parametrize(("sites", "threads", "parallel"), [(2, 2, 2), (4, 1, 1), (3, 8, 3)])
def test_flssl_simulate_gives_each_parallel_site_its_share(monkeypatch, tmp_path, sites, threads, parallel):
    for var in THREAD_VARS:
        monkeypatch.delenv(var, raising=False)
    seen = {}

    class FakePopen:
        def __init__(self, cmd, env=None, **kwargs):
            seen["cmd"], seen["env"] = cmd, env
            self.stdout = io.StringIO("")

        def wait(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    assert cli.run_simulator(Path("job"), tmp_path / "ws", sites, threads, tmp_path / "sim.log", quiet=True) == 0
    assert seen["cmd"][-4:] == ["-n", str(sites), "-t", str(threads)]
    want = str(threads_per_site(parallel))
    assert {v: seen["env"][v] for v in THREAD_VARS} == dict.fromkeys(THREAD_VARS, want)


def test_poc_sites_share_the_cores(monkeypatch, tmp_path):
    from tests.deploy.deploy_utils import poc_driver

    for var in THREAD_VARS:
        monkeypatch.delenv(var, raising=False)
    system = poc_driver.Poc(tmp_path / "poc")
    assert "OMP_NUM_THREADS" not in system.env  # not prepared: the number of sites is not known yet
    system.root.mkdir(parents=True, exist_ok=True)
    system._save_state(sites=["site-1", "site-2", "site-3"])
    assert system.env["OMP_NUM_THREADS"] == str(threads_per_site(3))
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    assert system.env["OMP_NUM_THREADS"] == "7"
