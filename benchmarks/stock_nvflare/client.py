"""Client API training script of the stock-nvflare peer in benchmarks/fl_overhead.py (shipped in the job's
``app/custom`` by nvflare's ``FedAvgRecipe`` / ``ScriptRunner``, run in-process in each site's client job process).

The per-step compute is the benchmark's: the site's model, data, optimiser and local steps are fl_plugins'
``FinetuneHandler`` built from the SAME ``handler_args`` our ``finetune_seg_unet`` job ships to its sites (read from
that job's exported ``config_fed_client.json``), on the same datalist; only the FL machinery around it is nvflare's
stock one: ``flare.receive()`` -> ``handler.train`` (validate the received model, then ``steps_per_round`` steps)
-> ``flare.send()``, metrics streamed with nvflare's own ``nvflare.client.tracking.SummaryWriter``.

    --handler-args FILE  JSON: the ``handler_args`` of our job's HandlerExecutor
    --datalist TEMPLATE  the site's datalist, ``{site}`` replaced by ``flare.get_site_name()``
    --workdir DIR        a folder the handler may write into
    --result-poll S      NOT stock: lower the in-process Client API's fixed 0.5 s result polls (the executor waiting
                         for ``flare.send()``, the script waiting in ``flare.receive()``) to S seconds, by setting
                         nvflare 2.9's module constant / API attribute (no job setting exists); default: as shipped
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import nvflare.client as flare
import torch
from nvflare.client.tracking import SummaryWriter

from fl_plugins.flare.finetune_handler import FinetuneHandler
from fl_plugins.flare.handler import SiteContext

log = logging.getLogger("stock_nvflare.client")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--handler-args", required=True)
    ap.add_argument("--datalist", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--result-poll", type=float, default=None)
    args = ap.parse_args(argv)
    with open(args.handler_args) as f:
        handler_args = json.load(f)

    ctx_api = flare.init()
    if args.result_poll is not None:
        from nvflare.app_common.executors.client_api import in_process_backend

        in_process_backend._RESULT_POLL_INTERVAL = args.result_poll  # read by the executor's wait loop each poll
        ctx_api.api.result_check_interval = args.result_poll  # flare.receive()'s poll
        log.info("Client API result polls set to %.3f s (not stock)", args.result_poll)
    site = flare.get_site_name()
    writer = SummaryWriter()
    ctx = SiteContext(site, args.datalist.format(site=site), args.workdir,
                      log_scalar=lambda tag, value, step: writer.add_scalar(tag, value, step))
    handler = FinetuneHandler(ctx, **handler_args)
    keys = set(handler.federated_params())  # what our sites send (BatchNorm step counters stay local)
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        log.info("script received task '%s'", flare.get_task_name())  # for fl_overhead.py --breakdown
        # round 0's model from nvflare's PTFileModelPersistor also carries the BatchNorm step counters
        # (num_batches_tracked); the handler loads exactly its federated keys
        model.params = {k: v for k, v in (model.params or {}).items() if k in keys}
        t0 = time.perf_counter()
        if flare.is_train():
            out = handler.train(model)
        elif flare.is_evaluate():
            out = handler.validate(model)
        elif flare.is_submit_model():
            out = handler.submit_model(model)
        else:
            raise RuntimeError(f"unknown task {flare.get_task_name()!r}")
        # the same line our executor logs (benchmarks/fl_overhead.py --breakdown reads it)
        log.info("task '%s' done in %.2fs", flare.get_task_name(), time.perf_counter() - t0)
        flare.send(flare.FLModel(params={k: torch.from_numpy(v) for k, v in (out.params or {}).items()},
                                 params_type=out.params_type, metrics=out.metrics, meta=out.meta))


if __name__ == "__main__":
    main()
