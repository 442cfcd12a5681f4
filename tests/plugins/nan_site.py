"""Test plugin: site-2 answers every ``train`` task with NaN weights (a diverged or broken site).

Imported on every site (the job's ``imports``, shipped in its custom code) before the handler is built, it wraps the
shared ``MethodHandler.train``: the other sites train normally; the server must leave site-2's result out.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fl_plugins.flare.handler import MethodHandler

POISONED_SITE = "site-2"

_train = MethodHandler.train


def _train_poisoned(self: MethodHandler, model: Any) -> Any:
    out = _train(self, model)
    if self.site.site_name == POISONED_SITE:
        out.params = {k: np.full_like(v, np.nan) for k, v in out.params.items()}
    return out


if getattr(MethodHandler.train, "__name__", "") != "_train_poisoned":
    MethodHandler.train = _train_poisoned
