"""Where a site's data lives (site-config contract of ``docs/contracts.md``): never in a job.

Resolution order for site ``site``:

1. the environment variable ``FL_PLUGINS_DATALIST`` (non-empty), with ``{site}`` replaced by the site name;
2. ``<site_config_dir>/fl_plugins_site.json`` = ``{"datalist": "/data/acdc_split/{site}/datalist.json"}``
   (``site_config_dir`` is the FLARE workspace's ``local/`` folder; a relative path is taken relative to it).

The resolved datalist must exist; every failure says what to create and where.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fl_plugins.atomic_io import atomic_write_json
from fl_plugins.data.errors import DataError

__all__ = ["ENV_VAR", "SITE_CONFIG_NAME", "SITE_PLACEHOLDER", "resolve_datalist", "write_site_config"]

ENV_VAR = "FL_PLUGINS_DATALIST"
SITE_CONFIG_NAME = "fl_plugins_site.json"
SITE_PLACEHOLDER = "{site}"

_EXAMPLE = '{"datalist": "/data/my_split/{site}/datalist.json"}'


def _fill(template: str, site_name: str) -> str:
    return template.replace(SITE_PLACEHOLDER, site_name)


def resolve_datalist(site_name: str, site_config_dir: str | Path | None) -> Path:
    """Path of the datalist of site ``site_name``.

    Args:
        site_name: the FLARE site (client) name, e.g. ``site-1``.
        site_config_dir: the site's config folder (FLARE ``workspace.get_site_config_dir()``, i.e. ``local/``);
            None when only the environment variable is used.

    Returns:
        Absolute path of an existing datalist file.

    Raises:
        DataError: nothing configured, unreadable config, or the resolved datalist does not exist.
    """
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        p = Path(_fill(env, site_name)).expanduser()
        if not p.is_file():
            raise DataError(f"{ENV_VAR}={env!r} resolves to {str(p)!r} for site {site_name!r}, which does not exist; "
                            f"fix the variable or create the datalist (flssl synth / flssl split)")
        return p.resolve()
    if site_config_dir is None:
        raise DataError(f"site {site_name!r} has no data location: set {ENV_VAR} (may contain {SITE_PLACEHOLDER}) "
                        f"or create <workspace>/local/{SITE_CONFIG_NAME} with {_EXAMPLE}")
    cfg_dir = Path(site_config_dir).expanduser()
    cfg = cfg_dir / SITE_CONFIG_NAME
    if not cfg.is_file():
        raise DataError(f"site {site_name!r} has no data location: create {str(cfg)!r} with {_EXAMPLE} "
                        f"({SITE_PLACEHOLDER} is replaced by the site name) or set {ENV_VAR}")
    try:
        obj = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"site config {str(cfg)!r} is not valid JSON ({e}); expected {_EXAMPLE}") from e
    template = obj.get("datalist") if isinstance(obj, dict) else None
    if not isinstance(template, str) or not template.strip():
        raise DataError(f"site config {str(cfg)!r} has no 'datalist' path (got {obj!r}); expected {_EXAMPLE}")
    p = Path(_fill(template, site_name)).expanduser()
    if not p.is_absolute():
        p = cfg_dir / p
    if not p.is_file():
        raise DataError(f"site config {str(cfg)!r}: datalist {template!r} resolves to {str(p)!r} for site "
                        f"{site_name!r}, which does not exist; create it (flssl synth / flssl split) or fix the path")
    return p.resolve()


def write_site_config(site_config_dir: str | Path, datalist_path: str | Path) -> Path:
    """Write ``<site_config_dir>/fl_plugins_site.json`` = ``{"datalist": <absolute path>}``.

    Args:
        site_config_dir: the site's ``local/`` folder (created if missing).
        datalist_path: a datalist path or a template containing ``{site}``; made absolute, placeholder kept.

    Returns:
        The written config file.
    """
    target = str(Path(datalist_path).expanduser().absolute())
    cfg = Path(site_config_dir).expanduser() / SITE_CONFIG_NAME
    atomic_write_json({"datalist": target}, cfg)
    return cfg
