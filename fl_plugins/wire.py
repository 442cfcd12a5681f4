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
    "META_RUN_ID",
    "META_CURRENT_ROUND",
    "META_TOTAL_ROUNDS",
    "TASK_REPORT_TASK",
    "TASK_STAGE_FINETUNE",
    "META_STAGE",
    "META_NUM_STAGES",
    "META_HEAD_SHAPE",
    "META_EVALUATE",
    "META_NUM_CLASSES",
    "META_SPATIAL_DIMS",
    "META_N_SAMPLES",
    "META_N_VAL",
    "META_TASK_NAME",
    "TASK_EXTRACT_FEATURES",
    "FEAT_KEY",
    "PART_KEY",
    "META_SHARES_FEATURES",
    "META_REMOTE_FEAT",
    "META_REMOTE_PART",
    "META_DP_DISTANCE",
    "META_TARGET_UPLOADED",
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
#: server -> site, with every training task: the run's id (the first job of a chain of resumes,
#: fl_plugins.flare.resume); a site keys the state it keeps between rounds by it, so a resumed job finds it
META_RUN_ID = "run_id"

# -- stage-wise fine-tuning (MedUniverse: fl_plugins.flare.stagewise / stage_handler) ----------------------------------
#: server -> site, no params; the site answers with its task in ``meta`` (the META_* keys below, no params)
TASK_REPORT_TASK = "report_task"
#: server -> site: the stage's base backbone (``backbone.*`` keys only) + ``meta`` stage / head shape; the site answers
#: with its fine-tuned backbone (the same keys, never its head) and its sample count as the aggregation weight
TASK_STAGE_FINETUNE = "stage_finetune"
#: the stage index (also sent as ``FLModel.current_round``, which the result echoes)
META_STAGE = "stage"
META_NUM_STAGES = "num_stages"
#: ``[num_classes, embed_dim]``: the site's head (kept on the site) maps the backbone's embedding to its classes
META_HEAD_SHAPE = "head_shape"
#: whether the site evaluates the received base with its own head before fine-tuning (``FLModel.metrics``)
META_EVALUATE = "evaluate"
#: the site's task, reported in ``report_task`` and echoed in each ``stage_finetune`` result
META_NUM_CLASSES = "num_classes"
META_SPATIAL_DIMS = "spatial_dims"
META_N_SAMPLES = "n_samples"
META_N_VAL = "n_val"
META_TASK_NAME = "task_name"

# -- federated contrastive learning with feature exchange (FCL: fl_plugins.flare.fcl_controller / fcl_handler) ---------
#: server -> site, no params (``current_round`` only); the site answers with params ``{FEAT_KEY: float16/32 [M, D_f],
#: PART_KEY: int32 [M]}`` (its momentum features and their partition ids; ``M`` may be 0: the site shares nothing)
TASK_EXTRACT_FEATURES = "extract_features"
FEAT_KEY = "feat"
PART_KEY = "part"
#: ``meta`` of the extraction result: whether the site shares features (False: it trains on local terms only)
META_SHARES_FEATURES = "shares_features"
#: ``meta`` of the ``train`` task: the other sites' features ``float [R, D_f]`` and partition ids ``int32 [R]``
#: (concatenated; which site each came from is not sent)
META_REMOTE_FEAT = "remote_feat"
META_REMOTE_PART = "remote_part"

# -- FCLOpt with PTNU / DP (fl_plugins.flare.fclopt_controller / fclopt_handler) ------------------------------------------
#: ``meta`` of a ``train`` result: DP's relative distance of the site's true target to the prediction, and whether the
#: result carries the target (``target.*`` params)
META_DP_DISTANCE = "dp_distance"
META_TARGET_UPLOADED = "target_uploaded"
