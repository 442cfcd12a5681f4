"""Client API entry script of fl_plugins jobs (the ScriptRunner path): no training logic here.

``flare.receive()`` -> the task handler named in ``fl_client_config.json`` (shipped next to this script by the job
builder) -> ``flare.send()``; see ``fl_plugins.flare.client_api.serve``. Sites need ``fl_plugins`` installed; the
job carries this script (custom code), so the submitter needs the ``byoc`` right on production sites.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nvflare.client as flare

from fl_plugins.flare.client_api import CONFIG_FILE, serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=CONFIG_FILE, help="handler configuration (JSON), next to this script")
    args = parser.parse_args(argv)
    path = Path(args.config)
    if not path.is_absolute():
        path = Path(__file__).resolve().with_name(path.name)
    serve(flare, json.loads(path.read_text()))


if __name__ == "__main__":
    main()
