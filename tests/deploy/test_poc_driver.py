"""Unit tests (no FLARE system) for the pure parts of poc/poc.py."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest
import yaml

from .deploy_utils import REPO, poc_driver


def test_project_template_is_loopback_only():
    project = yaml.safe_load((REPO / "poc" / "project_poc.yml").read_text())
    servers = [p for p in project["participants"] if p["type"] == "server"]
    assert [s["name"] for s in servers] == ["localhost"]
    assert [p["role"] for p in project["participants"] if p["type"] == "admin"] == ["project_admin"]


def test_make_project_sets_port_and_sites():
    project = poc_driver.make_project(REPO / "poc" / "project_poc.yml", 23456, ["site-1", "site-2", "site-3"])
    parts = project["participants"]
    assert parts[0] == {"name": "localhost", "type": "server", "org": "coordinator", "fed_learn_port": 23456}
    assert [p["name"] for p in parts if p["type"] == "client"] == ["site-1", "site-2", "site-3"]
    assert [p["name"] for p in parts if p["type"] == "admin"] == ["admin@nvidia.com"]
    assert project["builders"]


def test_make_project_refuses_a_non_loopback_server(tmp_path):
    bad = yaml.safe_load((REPO / "poc" / "project_poc.yml").read_text())
    bad["participants"][0]["name"] = "server"  # nvflare would bind 0.0.0.0
    (tmp_path / "p.yml").write_text(yaml.safe_dump(bad))
    with pytest.raises(poc_driver.PocError, match="loopback"):
        poc_driver.make_project(tmp_path / "p.yml", 1234, ["site-1"])


def test_production_template_provisions_fqdn_placeholder():
    project = yaml.safe_load((REPO / "poc" / "production" / "project.yml").read_text())
    roles = {p["role"] for p in project["participants"] if p["type"] == "admin"}
    assert roles == {"project_admin", "org_admin", "lead", "member"}
    server = next(p for p in project["participants"] if p["type"] == "server")
    assert "." in server["name"] and server["name"] != "localhost"


def test_free_port_is_bindable_on_loopback():
    port = poc_driver.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_last_json_picks_the_envelope():
    text = 'Connecting to FLARE ...\n{"status": "ok", "data": {"job_id": "x"}}\ntrailing noise\n'
    assert poc_driver._last_json(text)["data"]["job_id"] == "x"
    assert poc_driver._last_json("no json here") is None


def test_find_and_kill_processes_by_marker(tmp_path):
    marker = str(tmp_path / "ws") + "/"
    p = subprocess.Popen([sys.executable, "-c", "import time,sys; time.sleep(60)", marker + "x"],
                         start_new_session=True)
    try:
        # Popen returns after fork, before exec: until then the child's command line is still pytest's, so wait for
        # the exec (under load this took long enough to fail the test about 2 runs in 3)
        deadline = time.monotonic() + 20
        while not poc_driver.find_processes(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [pid for pid, _ in poc_driver.find_processes(marker)] == [p.pid]
        killed = poc_driver.kill_processes(marker, grace=5)
        assert [pid for pid, _ in killed] == [p.pid]
        assert p.wait(timeout=10) is not None
        assert poc_driver.find_processes(marker) == []
    finally:
        p.kill()
        p.wait()


def test_cli_help():
    out = subprocess.run([sys.executable, str(REPO / "poc" / "poc.py"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("prepare", "start", "status", "stop", "clean"):
        assert cmd in out.stdout
