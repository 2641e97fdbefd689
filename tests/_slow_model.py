"""A user model (`--model _slow_model:build`) whose checkpoint takes a while to write: the default
late-fusion model with a state_dict pre-hook that waits MMFEED_TEST_SAVE_DELAY seconds, so a
`checkpoint` request is slower than a client's timeout - what a big model is on a real disk."""
from __future__ import annotations

import os
import time

from trainer.model import build_model


def build(schema, num_classes):
    model = build_model(None, schema, num_classes)
    delay = float(os.environ.get("MMFEED_TEST_SAVE_DELAY", "0"))
    model.register_state_dict_pre_hook(lambda *_: time.sleep(delay))
    return model
