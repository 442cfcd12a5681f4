"""fl_plugins.wire spells the values nvflare defines exactly as nvflare does (it imports nothing, so this test is
where the two meet)."""

from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.app_constant import AppConstants

from fl_plugins import wire


def test_meta_keys_and_task_names_match_nvflare():
    assert wire.META_NUM_STEPS == FLMetaKey.NUM_STEPS_CURRENT_ROUND
    assert wire.META_CURRENT_ROUND == FLMetaKey.CURRENT_ROUND
    assert wire.META_TOTAL_ROUNDS == FLMetaKey.TOTAL_ROUNDS
    assert wire.TASK_TRAIN == AppConstants.TASK_TRAIN
    assert wire.TASK_VALIDATE == AppConstants.TASK_VALIDATION
    assert wire.TASK_SUBMIT_MODEL == AppConstants.TASK_SUBMIT_MODEL
