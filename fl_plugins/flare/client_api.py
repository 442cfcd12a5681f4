"""The Client API path: ``flare.receive()`` -> the same task handler the executor uses -> ``flare.send()``.

For sites that allow bring-your-own-code and users who want NVFlare's ``ScriptRunner`` path, jobs built with
``client="client_api"`` (:func:`fl_plugins.flare.job_builder.build_fedavg_job`) run the thin script
``custom/fl_client.py``, which only calls :func:`serve`. All training logic stays in the handlers, so both paths
train identically; the script's job carries custom code (it skips the sites' class allow list and needs the
submitter's ``byoc`` right), the executor path carries none (see docs/deployment.md, "Which path").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fl_plugins.flare.handler import SITE_STATE_DIR, SiteContext

__all__ = ["serve", "find_site_config_dir", "CONFIG_FILE"]

#: the handler configuration the job ships next to the script (``handler``, ``handler_args``, ``imports``)
CONFIG_FILE = "fl_client_config.json"


def find_site_config_dir(start: Path, levels: int = 4) -> Path | None:
    """The site's ``local/`` folder: the first ``<dir>/local`` holding ``fl_plugins_site.json`` or
    ``resources.json`` at ``start`` or above (a Client API script runs inside the site's workspace)."""
    from fl_plugins.data.site_config import SITE_CONFIG_NAME

    here = start.resolve()
    for d in [here, *here.parents][: levels + 1]:
        local = d / "local"
        if (local / SITE_CONFIG_NAME).is_file() or (local / "resources.json").is_file():
            return local
    return None


def serve(flare: Any, config: dict[str, Any]) -> int:
    """Answer tasks until the job ends; returns the number of tasks answered.

    Args:
        flare: the ``nvflare.client`` module (a stand-in in tests).
        config: ``{"handler": name, "handler_args": {...}, "imports": [...]}`` (what the job builder writes).

    Raises:
        ValueError: a task the handler does not declare (named with the ones it does).
    """
    from fl_plugins.data.site_config import resolve_datalist
    from fl_plugins.flare.handlers import handler_class
    from fl_plugins.methods import import_plugins

    flare.init()
    site = flare.get_site_name()
    writer = _summary_writer()
    out_dir = Path(os.getcwd()) / "fl_plugins"
    out_dir.mkdir(parents=True, exist_ok=True)
    config_dir = find_site_config_dir(Path(os.getcwd()))
    ctx = SiteContext(
        site_name=site,
        datalist_path=str(resolve_datalist(site, config_dir)),
        workspace_dir=str(out_dir),
        log_scalar=(lambda tag, value, step: writer.add_scalar(tag, value, step)) if writer else
        (lambda tag, value, step: None),
        log_image=_image_logger(writer),
        state_dir=str(Path(config_dir).parent / SITE_STATE_DIR) if config_dir is not None else None,
    )
    import_plugins(config.get("imports") or [])
    handler = handler_class(config["handler"])(ctx, **(config.get("handler_args") or {}))
    tasks = handler.tasks()
    answered = 0
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        name = flare.get_task_name()
        if name not in tasks:
            raise ValueError(f"site {site}: task {name!r} is not one of the handler's tasks {sorted(tasks)}")
        out = tasks[name](model)
        if out.current_round is None:  # the round it answers: the server rejects another round's result
            out.current_round = model.current_round
        flare.send(out)
        answered += 1
    return answered


def _image_logger(writer: Any) -> Any:
    """``log_image`` of the Client API path: nvflare's ``SummaryWriter`` has no ``add_image``, so the image goes
    out as the IMAGE analytics record it would send (``nvflare.client.tracking.log``, TensorBoard syntax), which
    the server's ``TBAnalyticsReceiver`` writes with ``add_image``."""
    if writer is None:
        return lambda tag, image, step: None
    import numpy as np
    from nvflare.apis.analytix import AnalyticsDataType, LogWriterName
    from nvflare.client.tracking import log

    def log_image(tag: str, image: Any, step: int) -> None:
        log(key=tag, value=np.asarray(image, dtype=np.float32), data_type=AnalyticsDataType.IMAGE,
            global_step=int(step), writer=LogWriterName.TORCH_TB, ctx=writer.ctx)

    return log_image


def _summary_writer() -> Any:
    try:
        from nvflare.client.tracking import SummaryWriter

        return SummaryWriter()
    except Exception:  # no FLARE runtime (tests drive serve with a stand-in)
        return None
