"""Prepare a FLARE site workspace (POC or provisioned startup kit) for fl_plugins jobs.

Pure JSON/file logic, no FLARE runtime needed. Two things are written into a site's ``local/`` folder:

``local/resources.json``
    Created from ``local/resources.json`` (if a site admin already has one: their edits are kept),
    else ``local/resources.json.default`` (what provisioning writes), else ``{}``. Then:

    * ``class_allow_list`` = the existing list (or nvflare's default list when there is none)
      + nvflare's default list + :data:`CLASS_ALLOW_PREFIXES` + ``extra_allow``, order kept, no
      duplicates. nvflare 2.9 checks every component class of a job *without* ``app/custom`` code
      against this list; our jobs ship no code, so ``"fl_plugins."`` must be on it, and so must the
      nvflare classes jobs may use beyond the default list (:data:`JOB_NVFLARE_CLASSES`, e.g. the
      quantization filters of ``fl.quantization``). A list that contains ``"*"`` (allow everything)
      is left alone.
    * server only: any storage folder nvflare keeps under ``<tmp>/nvflare/`` (the provisioned
      defaults ``/tmp/nvflare/jobs-storage`` and ``/tmp/nvflare/snapshot-storage``, which every
      server on the host would share and the OS may wipe) is moved into the site workspace
      (``<site_dir>/jobs-storage``, ``<site_dir>/snapshot-storage``).

``local/fl_plugins_site.json``
    ``{"datalist": "/abs/path/{site}/datalist.json"}`` (see docs/contracts.md), written only when a
    datalist is given. Other keys already in the file are kept.

Every write is atomic (temp file in the same folder + ``os.replace``) and only happens when the
content changes, so running it again is a no-op.

Command line (for site IT staff)::

    python -m fl_plugins.flare.site_setup <site_dir> [--datalist /data/site-1/datalist.json]
    python -m fl_plugins.flare.site_setup --workspace <prod_dir> [--datalist '/data/{site}/datalist.json']
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fl_plugins.atomic_io import atomic_write_json

__all__ = [
    "CLASS_ALLOW_PREFIXES",
    "JOB_NVFLARE_CLASSES",
    "SITE_CONFIG_FILE",
    "NotASiteWorkspaceError",
    "SiteSetupResult",
    "configure_site",
    "configure_workspace",
    "default_class_allow_list",
    "find_site_dirs",
    "is_server_site",
    "merge_allow_list",
    "site_class_allow_list",
]

#: The single declared place for the nvflare classes that fl_plugins jobs (``fl_plugins.flare.job_builder``) may
#: emit and that are NOT on nvflare's built-in default list (:func:`default_class_allow_list`), each with the job
#: option that emits it. Add a class here when the job builder starts using one (tests/flare/test_allow_list.py
#: fails until you do, and also fails if an entry here is emitted by no job/option: the list is exact).
JOB_NVFLARE_CLASSES: tuple[str, ...] = (
    # fl.quantization=float16|blockwise8: server task-data filter + client task-result filter on "train"
    "nvflare.app_opt.pt.quantization.quantizer.ModelQuantizer",
    # fl.quantization=float16|blockwise8: server task-result filter + client task-data filter on "train"
    "nvflare.app_opt.pt.quantization.dequantizer.ModelDequantizer",
)

#: Class-path prefixes (or fully qualified class paths) that every site must allow for our jobs, on top of
#: nvflare's default list: our package (every ``fl_plugins`` component) + :data:`JOB_NVFLARE_CLASSES`.
CLASS_ALLOW_PREFIXES: list[str] = ["fl_plugins.", *JOB_NVFLARE_CLASSES]

#: Site configuration file that tells our executors where the site's data is (docs/contracts.md).
SITE_CONFIG_FILE = "fl_plugins_site.json"

RESOURCES_FILE = "resources.json"
RESOURCES_DEFAULT_FILE = "resources.json.default"
SERVER_STARTUP_FILE = "fed_server.json"
CLIENT_STARTUP_FILE = "fed_client.json"
ALLOW_ALL = "*"
_STORAGE_KEYS = ("root_dir", "uri_root")


class NotASiteWorkspaceError(ValueError):
    """The folder is not a FLARE server/client workspace (``startup/fed_{server,client}.json`` + ``local/``)."""


class SiteSetupResult(dict):
    """What :func:`configure_site` did (a plain dict, JSON-serialisable)."""


def default_class_allow_list() -> list[str]:
    """nvflare's built-in allow list for jobs without custom code (88 classes in 2.9.0)."""
    from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

    return list(DEFAULT_CLASS_ALLOW_LIST)


def site_class_allow_list(extra_allow: Iterable[str] = ()) -> list[str]:
    """What :func:`configure_site` allows on a site with no list of its own: nvflare's default list +
    :data:`CLASS_ALLOW_PREFIXES` (``fl_plugins.`` + :data:`JOB_NVFLARE_CLASSES`) + ``extra_allow``."""
    return merge_allow_list(None, default_class_allow_list(), [*CLASS_ALLOW_PREFIXES, *extra_allow])


def is_server_site(site_dir: str | os.PathLike) -> bool:
    return (Path(site_dir) / "startup" / SERVER_STARTUP_FILE).is_file()


def _check_site_dir(site_dir: Path) -> None:
    startup = site_dir / "startup"
    if not site_dir.is_dir():
        raise NotASiteWorkspaceError(f"{site_dir}: not a folder (expected a FLARE site workspace)")
    if not ((startup / SERVER_STARTUP_FILE).is_file() or (startup / CLIENT_STARTUP_FILE).is_file()):
        what = "an admin startup kit" if (startup / "fed_admin.json").is_file() else "not a FLARE site workspace"
        raise NotASiteWorkspaceError(
            f"{site_dir}: {what}; a server or client workspace has startup/{SERVER_STARTUP_FILE} "
            f"or startup/{CLIENT_STARTUP_FILE}"
        )
    if not (site_dir / "local").is_dir():
        raise NotASiteWorkspaceError(f"{site_dir}: missing the 'local' folder of a FLARE site workspace")


def find_site_dirs(prod_dir: str | os.PathLike) -> dict[str, Path]:
    """Server/client workspaces directly under a POC or provisioned ``prod_NN`` folder, by participant name."""
    prod = Path(prod_dir)
    if not prod.is_dir():
        raise NotASiteWorkspaceError(f"{prod}: not a folder (expected a provisioned prod_NN folder)")
    sites = {}
    for child in sorted(prod.iterdir()):
        startup = child / "startup"
        if (startup / SERVER_STARTUP_FILE).is_file() or (startup / CLIENT_STARTUP_FILE).is_file():
            sites[child.name] = child
    if not sites:
        raise NotASiteWorkspaceError(f"{prod}: no FLARE site workspaces (*/startup/fed_server.json or fed_client.json)")
    return sites


def merge_allow_list(existing: list[str] | None, defaults: Iterable[str], extra: Iterable[str]) -> list[str]:
    """``existing`` (or ``defaults`` if None) + ``defaults`` + ``extra``, order kept, duplicates dropped.

    A list containing ``"*"`` is returned unchanged (the site allows everything).
    """
    if existing is not None and ALLOW_ALL in existing:
        return list(existing)
    out: list[str] = []
    seen: set[str] = set()
    for item in [*(defaults if existing is None else existing), *defaults, *extra]:
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"class_allow_list entries must be non-empty strings, got {item!r}")
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


def _tmp_roots() -> list[Path]:
    roots = {Path("/tmp"), Path(tempfile.gettempdir())}
    return [r / "nvflare" for r in roots]


def _relocate_tmp_storage(node: Any, site_dir: Path, changed: list[str]) -> Any:
    """Point every ``root_dir``/``uri_root`` under ``<tmp>/nvflare/`` into ``site_dir`` (same sub-path)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _STORAGE_KEYS and isinstance(value, str) and os.path.isabs(value):
                for root in _tmp_roots():
                    try:
                        rel = Path(os.path.normpath(value)).relative_to(root)
                    except ValueError:
                        continue
                    if str(rel) in ("", "."):
                        continue
                    new = str(site_dir / rel)
                    node[key] = new
                    changed.append(f"{value} -> {new}")
                    break
            else:
                _relocate_tmp_storage(value, site_dir, changed)
    elif isinstance(node, list):
        for item in node:
            _relocate_tmp_storage(item, site_dir, changed)
    return node


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e


def configure_site(
    site_dir: str | os.PathLike,
    datalist: str | None,
    *,
    extra_allow: Iterable[str] = (),
) -> SiteSetupResult:
    """Write ``local/resources.json`` (allow list, server storage) and, if given, ``local/fl_plugins_site.json``.

    Args:
        site_dir: a FLARE server or client workspace (has ``startup/`` and ``local/``).
        datalist: path of the site's datalist (may contain ``{site}``); ``None`` leaves the site file alone.
        extra_allow: more prefixes/class paths to allow besides :data:`CLASS_ALLOW_PREFIXES`.

    Returns:
        a dict with ``site``, ``role`` (server/client), ``resources`` (path), ``resources_changed``,
        ``storage_moved`` (list), ``site_config`` (path or None), ``site_config_changed``.

    Raises:
        NotASiteWorkspaceError: ``site_dir`` is not a server/client workspace.
        ValueError: an existing JSON file is invalid or has the wrong shape.
    """
    site = Path(site_dir).resolve()
    _check_site_dir(site)
    local = site / "local"
    server = is_server_site(site)

    res_path = local / RESOURCES_FILE
    base_path = res_path if res_path.is_file() else local / RESOURCES_DEFAULT_FILE
    resources: Any = _read_json(base_path) if base_path.is_file() else {}
    if not isinstance(resources, dict):
        raise ValueError(f"{base_path}: expected a JSON object, got {type(resources).__name__}")

    existing = resources.get("class_allow_list")
    if existing is not None and not isinstance(existing, list):
        raise ValueError(f"{base_path}: class_allow_list must be a list, got {type(existing).__name__}")
    resources["class_allow_list"] = merge_allow_list(
        existing, default_class_allow_list(), [*CLASS_ALLOW_PREFIXES, *extra_allow]
    )

    moved: list[str] = []
    if server:
        _relocate_tmp_storage(resources, site, moved)
    res_changed = atomic_write_json(resources, res_path, if_changed=True)

    result = SiteSetupResult(
        site=site.name,
        role="server" if server else "client",
        resources=str(res_path),
        resources_changed=res_changed,
        storage_moved=moved,
        site_config=None,
        site_config_changed=False,
    )
    if datalist is not None:
        if not isinstance(datalist, str) or not datalist.strip():
            raise ValueError(f"{site}: datalist must be a non-empty path, got {datalist!r}")
        cfg_path = local / SITE_CONFIG_FILE
        cfg: Any = _read_json(cfg_path) if cfg_path.is_file() else {}
        if not isinstance(cfg, dict):
            raise ValueError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
        cfg["datalist"] = datalist
        result["site_config"] = str(cfg_path)
        result["site_config_changed"] = atomic_write_json(cfg, cfg_path, if_changed=True)
    return result


def configure_workspace(
    prod_dir: str | os.PathLike,
    site_datalists: Mapping[str, str],
    *,
    extra_allow: Iterable[str] = (),
) -> dict[str, SiteSetupResult]:
    """:func:`configure_site` on every server/client workspace of a POC or provisioned ``prod_NN`` folder.

    Args:
        prod_dir: the folder holding one sub-folder per participant (``.../prod_00``).
        site_datalists: site name -> datalist path; the key ``"*"`` applies to every client not listed
            (use ``{site}`` in it). Sites without an entry get no datalist file.

    Raises:
        NotASiteWorkspaceError: no workspaces found, or a named site does not exist / is not a client.
    """
    sites = find_site_dirs(prod_dir)
    clients = {name for name, d in sites.items() if not is_server_site(d)}
    unknown = sorted(set(site_datalists) - clients - {"*"})
    if unknown:
        raise NotASiteWorkspaceError(
            f"{prod_dir}: no client workspace for {unknown} (client workspaces: {sorted(clients)})"
        )
    results = {}
    for name, d in sites.items():
        datalist = None
        if name in clients:
            datalist = site_datalists.get(name, site_datalists.get("*"))
        results[name] = configure_site(d, datalist, extra_allow=extra_allow)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fl_plugins.flare.site_setup",
        description="Allow-list fl_plugins classes in a FLARE site's local/resources.json, move server storage "
        "out of /tmp, and write local/fl_plugins_site.json (the site's datalist location).",
    )
    p.add_argument("site_dir", nargs="?", help="a server or client workspace (startup kit folder)")
    p.add_argument("--workspace", help="configure every site under this prod_NN folder instead")
    p.add_argument("--datalist", help="datalist path for the site(s); may contain {site}")
    p.add_argument("--allow", action="append", default=[], help="extra class prefix/path to allow (repeatable)")
    args = p.parse_args(argv)
    if bool(args.site_dir) == bool(args.workspace):
        p.error("give either SITE_DIR or --workspace PROD_DIR")
    try:
        if args.workspace:
            out: Any = configure_workspace(
                args.workspace, {"*": args.datalist} if args.datalist else {}, extra_allow=args.allow
            )
        else:
            out = configure_site(args.site_dir, args.datalist, extra_allow=args.allow)
    except (NotASiteWorkspaceError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
