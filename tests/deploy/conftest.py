"""Fixtures for the deployment tests: one POC system (2 sites, server ``localhost``, free loopback port) per session.

Every FLARE process these tests start has its workspace path (under pytest's tmp dir) on its command line; teardown
stops the system the documented way and then asserts, with a /proc scan, that none of them is left (any survivor
is killed first, so a failing run never leaks processes).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .deploy_utils import poc_driver

TIMINGS: dict[str, float] = {}


def record_timing(name: str, seconds: float) -> None:
    TIMINGS[name] = round(seconds, 1)


@contextlib.contextmanager
def poc_system(
    root: Path, num_sites: int = 2, label: str = "poc", configure: Callable[[poc_driver.Poc], None] | None = None
) -> Iterator[poc_driver.Poc]:
    """Prepare (``configure(poc)`` runs after ``prepare``, before ``start``), start and yield a POC system under
    ``root``; on exit stop it and assert, with a /proc scan, that none of its processes is left (survivors are
    killed first, also when the body failed)."""
    system = poc_driver.Poc(root)
    marker = str(system.workspace) + os.sep
    atexit.register(poc_driver.kill_processes, marker)  # last resort if the session dies before teardown
    try:
        t0 = time.monotonic()
        system.prepare(num_sites=num_sites)
        if configure is not None:
            configure(system)
        record_timing(f"{label} prepare", time.monotonic() - t0)
        t0 = time.monotonic()
        system.start(timeout=180)
        record_timing(f"{label} start (until {num_sites}/{num_sites} sites connected)", time.monotonic() - t0)
        yield system
    finally:
        stop_error = None
        leftovers: list = []
        t0 = time.monotonic()
        try:
            leftovers = system.stop()["leftovers"]
        except Exception as e:  # still make sure nothing survives
            stop_error = e
        record_timing(f"{label} stop", time.monotonic() - t0)
        survivors = poc_driver.kill_processes(marker)
        assert not survivors, f"processes survived poc stop and a kill: {survivors}"
        assert stop_error is None, f"poc stop failed: {stop_error}"
        assert not leftovers, f"'nvflare poc stop' left processes behind (killed them): {leftovers}"


@pytest.fixture(scope="session")
def poc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[poc_driver.Poc]:
    """A started POC system (2 sites); yields the :class:`poc.poc.Poc` driver. Stopped and checked at session end."""
    with poc_system(tmp_path_factory.mktemp("poc"), num_sites=2) as system:
        yield system


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory):
    """``make(generator_name, fn, kwargs) -> Path``: generate a synthetic data set once per generator."""
    root = tmp_path_factory.mktemp("data")
    made: dict[str, Path] = {}

    def make(name: str, fn, kwargs: dict) -> Path:
        if name not in made:
            out = root / name
            fn(out, **kwargs)
            made[name] = out
        return made[name]

    return make


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ARG001
    if TIMINGS:
        terminalreporter.write_sep("-", "deployment timings (s)")
        for k, v in TIMINGS.items():
            terminalreporter.write_line(f"{v:8.1f}  {k}")


def job_workspace(download_path: Path) -> Path:
    return Path(download_path) / "workspace"
