#!/usr/bin/env python3
"""Run an isolated NVIDIA FLARE POC system for fl_plugins on this machine (loopback only).

Everything lives under one folder (``--root``, default ``<repo>/workspace/poc`` or ``$FL_PLUGINS_POC_ROOT``):

    <root>/home/            HOME for every nvflare command (``~/.nvflare/config.conf``: startup-kit registry)
    <root>/poc_ws/          NVFLARE_POC_WORKSPACE (startup kits, jobs-storage, snapshot-storage, job runs)
    <root>/project.yml      the project file actually provisioned (from poc/project_poc.yml)
    <root>/poc_state.json   port, sites, paths, process-group id of the started system

Commands (``python poc/poc.py --help``, ``python poc/poc.py <command> --help``)::

    prepare [--num-sites N] [--port P] [--datalist '/data/{site}/datalist.json' | --synthetic]
        provision POC from poc/project_poc.yml (server named ``localhost`` => binds 127.0.0.1 only) with
        N sites on a free (or the given) port, then run fl_plugins.flare.site_setup.configure_site on every
        site: class allow list + ``local/fl_plugins_site.json`` pointing each site at its own data split.
    start [--timeout S]     start server + sites; blocks until every site is connected
    status                  server/client status (JSON)
    submit JOB [--wait] [--download DIR]   submit a job folder with the admin kit
    stop                    shut the system down; checks with ``ps`` that no process is left (kills leftovers)
    clean                   stop if needed and delete <root>
    env                     print the environment (HOME, NVFLARE_POC_WORKSPACE, admin kit) to use nvflare by hand:
                            ( eval "$(python poc/poc.py --root DIR env)"; nvflare job list )

The module is also imported by tests/deploy (class :class:`Poc`, :func:`run_nvflare`, :func:`find_processes`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from fl_plugins.atomic_io import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
PROJECT_TEMPLATE = Path(__file__).resolve().with_name("project_poc.yml")
DEFAULT_ROOT = Path(os.environ.get("FL_PLUGINS_POC_ROOT", REPO / "workspace" / "poc"))
LOOPBACK_NAMES = ("localhost", "127.0.0.1")
TERMINAL_PREFIX = "FINISHED"


class PocError(RuntimeError):
    """An nvflare command failed or the POC system is not in the expected state."""


# ----------------------------------------------------------------------------------------------- helpers


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (bound and released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def python_env(home: Path | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ + this interpreter's folder first on PATH (FLARE scripts call ``python3``) + overrides."""
    env = dict(os.environ)
    py_dir = os.path.dirname(sys.executable)
    env["PATH"] = os.pathsep.join([py_dir, env.get("PATH", "")])
    if home is not None:
        env["HOME"] = str(home)
    env.setdefault("GRPC_ENABLE_FORK_SUPPORT", "False")
    if extra:
        env.update(extra)
    return env


def _last_json(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def run_nvflare(
    args: Sequence[str],
    env: Mapping[str, str],
    timeout: float = 120,
    check: bool = True,
    cwd: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """``python -m nvflare.cli --format json <args>``; returns the parsed JSON envelope.

    With ``check`` a non-ok envelope (or no JSON) raises :class:`PocError` with the command's output.
    """
    cmd = [sys.executable, "-m", "nvflare.cli", "--format", "json", *map(str, args)]
    try:
        p = subprocess.run(cmd, env=dict(env), capture_output=True, text=True, timeout=timeout, cwd=cwd,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise PocError(f"timed out after {timeout}s: nvflare {' '.join(map(str, args))}") from e
    out = _last_json(p.stdout) or _last_json(p.stderr) or {}
    out.setdefault("exit_code", p.returncode)
    out["_stdout"], out["_stderr"] = p.stdout[-4000:], p.stderr[-4000:]
    if check and (out.get("status") != "ok" or p.returncode != 0):
        raise PocError(
            f"nvflare {' '.join(map(str, args))} failed (rc={p.returncode}): "
            f"{out.get('error_code', '')} {out.get('message', '')} {out.get('detail', '')}\n"
            f"stdout: {p.stdout[-2000:]}\nstderr: {p.stderr[-2000:]}"
        )
    return out


def find_processes(marker: str) -> list[tuple[int, str]]:
    """(pid, command line) of every process whose command line contains ``marker`` (e.g. a workspace path)."""
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if marker in cmdline:
            found.append((int(entry), cmdline))
    return found


def kill_processes(marker: str, pgids: Sequence[int] = (), grace: float = 10.0) -> list[tuple[int, str]]:
    """SIGTERM, then SIGKILL, every process matching ``marker`` and every process group in ``pgids``.

    Only processes whose command line names our own workspace (or groups we started) are touched.
    Returns what was found alive at the start.
    """
    victims = find_processes(marker)
    for pid, _ in victims:
        _signal(pid, signal.SIGTERM)
    for g in pgids:
        _signal_group(g, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and (find_processes(marker) or any(_group_alive(g) for g in pgids)):
        time.sleep(0.3)
    for pid, _ in find_processes(marker):
        _signal(pid, signal.SIGKILL)
    for g in pgids:
        _signal_group(g, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and find_processes(marker):
        time.sleep(0.2)
    return victims


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def make_project(template: str | os.PathLike, port: int, sites: Sequence[str], name: str | None = None) -> dict:
    """Project dict from ``template`` with the server's ``fed_learn_port`` = ``port`` and clients = ``sites``.

    Refuses a server whose name is not a loopback name: nvflare binds 0.0.0.0 otherwise.
    """
    with open(template, encoding="utf-8") as f:
        project = yaml.safe_load(f)
    parts = project["participants"]
    servers = [p for p in parts if p.get("type") == "server"]
    if len(servers) != 1 or servers[0]["name"] not in LOOPBACK_NAMES:
        raise PocError(f"{template}: need exactly one server named one of {LOOPBACK_NAMES} (loopback-only binding)")
    servers[0]["fed_learn_port"] = int(port)
    servers[0].pop("admin_port", None)
    clients = [{"name": s, "type": "client", "org": s.replace("-", "_")} for s in sites]
    others = [p for p in parts if p.get("type") not in ("server", "client")]
    project["participants"] = servers + clients + others
    if name:
        project["name"] = name
    return project


# ----------------------------------------------------------------------------------------------- Poc


class Poc:
    """One isolated POC system under ``root`` (see the module docstring for the layout)."""

    def __init__(self, root: str | os.PathLike = DEFAULT_ROOT):
        self.root = Path(root).resolve()
        self.home = self.root / "home"
        self.workspace = self.root / "poc_ws"
        self.project_file = self.root / "project.yml"
        self.state_file = self.root / "poc_state.json"

    # ---- state / paths
    @property
    def state(self) -> dict[str, Any]:
        if not self.state_file.is_file():
            raise PocError(f"{self.root}: not prepared (run: poc.py --root {self.root} prepare)")
        return json.loads(self.state_file.read_text())

    def _state_or_empty(self) -> dict[str, Any]:
        return json.loads(self.state_file.read_text()) if self.state_file.is_file() else {}

    def _save_state(self, **updates: Any) -> dict[str, Any]:
        st = self._state_or_empty()
        st.update(updates)
        atomic_write_text(json.dumps(st, indent=2), self.state_file)
        return st

    @property
    def prod_dir(self) -> Path:
        return Path(self.state["prod_dir"])

    @property
    def sites(self) -> list[str]:
        return list(self.state["sites"])

    @property
    def server_name(self) -> str:
        return self.state["server"]

    @property
    def admin(self) -> str:
        return self.state["admin"]

    @property
    def admin_kit(self) -> Path:
        return self.prod_dir / self.admin

    @property
    def port(self) -> int:
        return int(self.state["port"])

    def site_dir(self, site: str) -> Path:
        return self.prod_dir / site

    @property
    def env(self) -> dict[str, str]:
        env = python_env(self.home, {"NVFLARE_POC_WORKSPACE": str(self.workspace)})
        env.pop("FL_PLUGINS_DATALIST", None)  # it would override every site's local/fl_plugins_site.json
        sites = self._state_or_empty().get("sites")
        if sites:  # every POC site trains on this machine: split its cores between them (user's setting kept)
            from fl_plugins.cpu_threads import site_thread_env

            env = site_thread_env(len(sites), env)
        return env

    def nvflare(self, *args: str, timeout: float = 120, check: bool = True, kit: bool = False) -> dict[str, Any]:
        """Run an nvflare CLI command in this POC's environment (``kit=True`` adds ``--startup-kit``)."""
        extra = ["--startup-kit", str(self.admin_kit)] if kit else []
        return run_nvflare([*args, *extra], self.env, timeout=timeout, check=check)

    # ---- lifecycle
    def prepare(
        self,
        num_sites: int = 2,
        port: int | None = None,
        datalists: str | Mapping[str, str] | None = None,
        project_template: str | os.PathLike = PROJECT_TEMPLATE,
        sites: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Provision POC and configure every site. ``datalists``: a template with ``{site}`` or site -> path."""
        from fl_plugins.flare.site_setup import configure_site

        if self.workspace.exists() and self.processes():
            raise PocError(f"{self.root}: a POC system is still running here; stop it first")
        sites = list(sites) if sites else [f"site-{i + 1}" for i in range(num_sites)]
        port = int(port) if port else free_port()
        self.root.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(exist_ok=True)
        project = make_project(project_template, port, sites)
        atomic_write_text(yaml.safe_dump(project, sort_keys=False), self.project_file)
        run_nvflare(["poc", "prepare", "-i", str(self.project_file), "--force"], self.env, timeout=180)

        server = next(p["name"] for p in project["participants"] if p["type"] == "server")
        admin = next(p["name"] for p in project["participants"] if p.get("role") == "project_admin")
        prod_dir = self.workspace / project["name"] / "prod_00"
        if not (prod_dir / server / "startup" / "fed_server.json").is_file():
            raise PocError(f"nvflare poc prepare did not create {prod_dir / server}")
        self._save_state(
            root=str(self.root), port=port, sites=sites, server=server, admin=admin,
            project=project["name"], prod_dir=str(prod_dir), pgids=[],
        )
        configured = {server: configure_site(prod_dir / server, None)}
        configured.update(self.configure_data(datalists))
        for s in sites:
            configured.setdefault(s, configure_site(prod_dir / s, None))
        return {"state": self.state, "sites": configured}

    def configure_data(self, datalists: str | Mapping[str, str] | None) -> dict[str, Any]:
        """(Re)write each site's ``local/fl_plugins_site.json``; read by jobs when they start."""
        from fl_plugins.flare.site_setup import configure_site

        if datalists is None:
            return {}
        if isinstance(datalists, str):
            datalists = {s: datalists.replace("{site}", s) for s in self.sites}
        unknown = set(datalists) - set(self.sites)
        if unknown:
            raise PocError(f"no such POC site(s): {sorted(unknown)} (sites: {self.sites})")
        return {s: configure_site(self.site_dir(s), str(d)) for s, d in datalists.items()}

    def start(self, timeout: int = 120) -> dict[str, Any]:
        """Start server and sites in a new process group; block until all sites are connected."""
        if self.processes():
            raise PocError(f"{self.root}: already running ({len(self.processes())} processes)")
        log = open(self.root / "poc_start.log", "a")
        cmd = [sys.executable, "-m", "nvflare.cli", "--format", "json", "poc", "start", "--timeout", str(timeout)]
        p = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=log, text=True,
                             start_new_session=True, stdin=subprocess.DEVNULL)
        self._save_state(pgids=[p.pid])  # the session/group every POC process inherits
        try:
            stdout, _ = p.communicate(timeout=timeout + 60)
        except subprocess.TimeoutExpired:
            p.kill()
            raise PocError(f"nvflare poc start did not return within {timeout + 60}s") from None
        finally:
            log.close()
        out = _last_json(stdout) or {}
        if out.get("status") != "ok" or p.returncode != 0:
            raise PocError(f"nvflare poc start failed (rc={p.returncode}): {stdout[-3000:]}\n"
                           f"see {self.root / 'poc_start.log'} and {self.prod_dir}/*/poc_console.log")
        self.wait_ready(timeout=timeout)
        return out.get("data", {})

    def wait_ready(self, timeout: float = 60) -> dict[str, Any]:
        """Poll ``system status`` until every site is connected."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            last = self.nvflare("system", "status", kit=True, check=False, timeout=60)
            connected = {c.get("client_name") for c in (last.get("data") or {}).get("clients", [])}
            if last.get("status") == "ok" and set(self.sites) <= connected:
                return last["data"]
            time.sleep(1)
        raise PocError(f"not all sites connected within {timeout}s: {last}")

    def status(self) -> dict[str, Any]:
        return self.nvflare("system", "status", kit=True, timeout=60)["data"]

    def processes(self) -> list[tuple[int, str]]:
        return find_processes(str(self.workspace) + os.sep)

    def stop(self, timeout: float = 120) -> dict[str, Any]:
        """``nvflare poc stop`` (waits for shutdown), then make sure (``ps``) nothing is left; kill leftovers."""
        result: dict[str, Any] = {"stopped": True, "leftovers": []}
        if self.processes():
            out = self.nvflare("poc", "stop", check=False, timeout=timeout)
            result["poc_stop"] = {k: out.get(k) for k in ("status", "exit_code", "error_code", "message")}
            if out.get("status") != "ok" and self.processes() and self.state_file.is_file():
                # e.g. a job left RUNNING by a server crash makes 'poc stop' fail ("Job ... is not running"),
                # while 'system shutdown all --force' still works (verified with nvflare 2.9.0)
                out = self.nvflare("system", "shutdown", "all", "--force", kit=True, check=False, timeout=timeout)
                result["system_shutdown"] = {k: out.get(k) for k in ("status", "exit_code", "error_code", "message")}
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.processes():
                time.sleep(0.5)
        pgids = json.loads(self.state_file.read_text()).get("pgids", []) if self.state_file.is_file() else []
        leftovers = kill_processes(str(self.workspace) + os.sep, pgids=pgids)
        result["leftovers"] = leftovers
        if self.processes():
            raise PocError(f"processes still alive after stop: {self.processes()}")
        return result

    def clean(self) -> None:
        """Stop (if running) and delete the whole root folder."""
        if self.state_file.is_file():
            self.stop()
            out = self.nvflare("poc", "clean", "--force", check=False, timeout=120)
            if out.get("status") != "ok":  # notes gotcha 6: can report 'still running' right after stop
                time.sleep(2)
                self.nvflare("poc", "clean", "--force", check=False, timeout=120)
        shutil.rmtree(self.root, ignore_errors=True)

    # ---- jobs
    def submit(self, job_dir: str | os.PathLike) -> str:
        out = self.nvflare("job", "submit", "-j", str(job_dir), kit=True, timeout=180)
        return out["data"]["job_id"]

    def wait(self, job_id: str, timeout: float = 600, interval: float = 1) -> dict[str, Any]:
        out = self.nvflare("job", "wait", job_id, "--timeout", str(timeout), "--interval", str(interval),
                           kit=True, check=False, timeout=timeout + 60)
        data = out.get("data") or {}
        if not str(data.get("status", "")).startswith(TERMINAL_PREFIX) and out.get("error_code") != "TIMEOUT":
            # failed/aborted jobs come back as error envelopes, not always with data: ask for the final status
            meta = self.nvflare("job", "meta", job_id, kit=True, check=False, timeout=60).get("data") or {}
            if str(meta.get("status", "")).startswith(TERMINAL_PREFIX):
                data = {"job_id": job_id, "status": meta["status"], "job_meta": meta}
        if not str(data.get("status", "")).startswith(TERMINAL_PREFIX):
            raise PocError(f"job {job_id} did not finish: {out.get('error_code')} {out.get('message')}")
        return data

    def download(self, job_id: str, out_dir: str | os.PathLike) -> Path:
        out = self.nvflare("job", "download", job_id, "-o", str(out_dir), kit=True, timeout=300)
        return Path(out["data"]["path"])


# ----------------------------------------------------------------------------------------------- CLI


def _synthetic_datalists(root: Path, num_sites: int) -> str:
    try:
        from fl_plugins.data import generate_synthetic_segmentation  # type: ignore[attr-defined]
    except ImportError as e:
        raise PocError(f"--synthetic needs fl_plugins.data.generate_synthetic_segmentation ({e})") from e
    out = root / "data"
    generate_synthetic_segmentation(str(out), num_sites=num_sites)
    return str(out / "{site}" / "datalist.json")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="poc.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(DEFAULT_ROOT), help="folder holding everything (default: %(default)s)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="provision POC and configure every site")
    p.add_argument("--num-sites", type=int, default=2)
    p.add_argument("--port", type=int, default=None, help="FL/admin port on 127.0.0.1 (default: a free one)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--datalist", help="per-site datalist path; {site} is replaced by the site name")
    g.add_argument("--synthetic", action="store_true", help="generate synthetic segmentation data under <root>/data")
    p.add_argument("--project", default=str(PROJECT_TEMPLATE), help="project template (default: %(default)s)")
    p = sub.add_parser("start", help="start server + sites and wait until all sites are connected")
    p.add_argument("--timeout", type=int, default=120)
    sub.add_parser("status", help="server and client status")
    p = sub.add_parser("submit", help="submit a job folder")
    p.add_argument("job")
    p.add_argument("--wait", action="store_true")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--download", help="download the result into this folder (implies --wait)")
    sub.add_parser("stop", help="shut the system down and check no process is left")
    sub.add_parser("clean", help="stop if running and delete --root")
    sub.add_parser("env", help="print the environment to use nvflare by hand")
    a = ap.parse_args(argv)
    poc = Poc(a.root)
    try:
        if a.cmd == "prepare":
            poc.root.mkdir(parents=True, exist_ok=True)
            datalists = _synthetic_datalists(poc.root, a.num_sites) if a.synthetic else a.datalist
            out: Any = poc.prepare(num_sites=a.num_sites, port=a.port, datalists=datalists, project_template=a.project)
            out = {"port": out["state"]["port"], "prod_dir": out["state"]["prod_dir"], "sites": out["state"]["sites"],
                   "admin_kit": str(poc.admin_kit)}
        elif a.cmd == "start":
            t0 = time.monotonic()
            poc.start(timeout=a.timeout)
            out = {"ready": True, "seconds": round(time.monotonic() - t0, 1), "port": poc.port, "sites": poc.sites}
        elif a.cmd == "status":
            out = poc.status()
        elif a.cmd == "submit":
            job_id = poc.submit(a.job)
            out = {"job_id": job_id}
            if a.wait or a.download:
                print(f"submitted job {job_id}; waiting for it to finish (at most {a.timeout:.0f}s) ...",
                      file=sys.stderr, flush=True)
                out["result"] = poc.wait(job_id, timeout=a.timeout)
                print(f"job {job_id}: {out['result'].get('status')}", file=sys.stderr, flush=True)
            if a.download:
                out["path"] = str(poc.download(job_id, a.download))
                print(f"downloaded the server's job folder to {out['path']}", file=sys.stderr, flush=True)
        elif a.cmd == "stop":
            out = poc.stop()
        elif a.cmd == "clean":
            poc.clean()
            out = {"removed": str(poc.root)}
        else:
            # HOME isolates ~/.nvflare/config.conf (the startup-kit registry) of this POC: use it in a subshell,
            #   ( eval "$(python poc/poc.py --root DIR env)"; nvflare job list )
            print(f"export NVFLARE_POC_WORKSPACE={poc.workspace}")
            print(f"export HOME={poc.home}")
            if poc.state_file.is_file():
                print(f"export FLPOC_ADMIN_KIT={poc.admin_kit}")
            return 0
    except PocError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
