"""Wire contract constants: task names, ``FLModel.meta`` keys and metric names, in one place.

This module imports nothing (not even nvflare), so every layer may use it. The values that nvflare defines too
(``FLMetaKey``) are spelled here exactly as nvflare spells them; ``tests/flare/test_wire_constants.py`` checks them
against the installed nvflare. Payloads that are not model weights are documented in ``docs/contracts.md``.
"""

from __future__ import annotations

__all__ = [
    "TASK_TRAIN",
    "TASK_VALIDATE",
    "TASK_SUBMIT_MODEL",
    "META_NUM_STEPS",
    "META_CLIENT_NAME",
    "META_CURRENT_ROUND",
    "META_TOTAL_ROUNDS",
]

# -- task names (the server sends them; a handler declares which it handles) -----------------------------------------
TASK_TRAIN = "train"  # nvflare AppConstants.TASK_TRAIN
TASK_VALIDATE = "validate"  # nvflare AppConstants.TASK_VALIDATION
TASK_SUBMIT_MODEL = "submit_model"  # nvflare AppConstants.TASK_SUBMIT_MODEL

# -- FLModel.meta keys -------------------------------------------------------------------------------------------------
#: Aggregation weight of a site's result (nvflare ``FLMetaKey.NUM_STEPS_CURRENT_ROUND``; FedAvg weighs by it).
META_NUM_STEPS = "NUM_STEPS_CURRENT_ROUND"
#: Set by nvflare on every result the server receives (``ReservedHeaderKey``/``FLContextKey.CLIENT_NAME`` value).
META_CLIENT_NAME = "client_name"
#: nvflare ``FLMetaKey.CURRENT_ROUND`` / ``FLMetaKey.TOTAL_ROUNDS``.
META_CURRENT_ROUND = "current_round"
META_TOTAL_ROUNDS = "total_rounds"
