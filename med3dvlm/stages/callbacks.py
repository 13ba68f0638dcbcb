"""Callbacks the training configs use: exact resume (the hand-off to the next stage is
:class:`med3dvlm.checkpoints.handoff.ExportHandOff`)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback


class RngStateCheckpoint(Callback):
    """Stores the Python, NumPy and torch random states in every checkpoint and restores them.

    Lightning does not, so without this a resumed run draws different dropout masks than an
    uninterrupted one and ends with different weights.
    """

    def state_dict(self) -> dict[str, Any]:
        return {
            "python": random.getstate(),
            # as a tensor + plain values: checkpoints stay loadable with torch.load(weights_only=True)
            "numpy": _numpy_state_to_plain(np.random.get_state()),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        random.setstate(state_dict["python"])
        name, keys, pos, has_gauss, cached = state_dict["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state_dict["torch"])
        if state_dict.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


def _numpy_state_to_plain(state: tuple) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return (str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
