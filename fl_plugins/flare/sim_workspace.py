"""Prepare a FLARE *simulator* workspace so that code-free jobs from ``jobs/`` run with
``nvflare simulator <job> -w <ws> -n <sites> -t <threads>``.

The simulator copies ``<ws>/local`` into every simulated site's workspace (nvflare 2.9
``SimulatorRunner._setup_local_startup``), so one folder configures all of them:

- ``local/resources.json``: ``class_allow_list`` = nvflare's default list + ``fl_plugins.``; without it nvflare 2.9
  rejects a job with no custom code (``ComponentNotAuthorized ... not in allow_list``);
- ``local/fl_plugins_site.json``: ``{"datalist": ".../{site}/datalist.json"}``, where each simulated site
  (``site-1``, ``site-2``, ...) finds its own split.
"""

from __future__ import annotations

import json
from pathlib import Path

from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

from fl_plugins.atomic_io import atomic_write_json
from fl_plugins.flare.site_setup import CLASS_ALLOW_PREFIXES

__all__ = ["SIM_CLASS_ALLOW_PREFIXES", "write_sim_local"]

#: the same list as a site's set-up: our package plus the nvflare classes jobs can emit beyond nvflare's default list
SIM_CLASS_ALLOW_PREFIXES = CLASS_ALLOW_PREFIXES


def write_sim_local(workspace: str | Path, datalist_template: str | None = None) -> Path:
    """Write ``<workspace>/local/{resources.json, fl_plugins_site.json}`` (atomically; keeps other keys)."""
    local = Path(workspace) / "local"
    local.mkdir(parents=True, exist_ok=True)
    res_path = local / "resources.json"
    resources = {}
    if res_path.exists():
        try:
            resources = json.loads(res_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{res_path} is not valid JSON: {e}") from e
    allow = list(resources.get("class_allow_list") or DEFAULT_CLASS_ALLOW_LIST)
    for prefix in SIM_CLASS_ALLOW_PREFIXES:
        if prefix not in allow:
            allow.append(prefix)
    resources["class_allow_list"] = allow
    atomic_write_json(resources, res_path)
    if datalist_template is not None:
        atomic_write_json({"datalist": datalist_template}, local / "fl_plugins_site.json")
    return local
