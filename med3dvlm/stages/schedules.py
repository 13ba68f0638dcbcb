"""Learning-rate schedule shared by the stages: linear warm-up, then cosine decay to 0 (SPEC §3, §5)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer, warmup_ratio: float, total_steps: Callable[[], int]
) -> LambdaLR:
    """``total_steps`` is asked for on the first real step, not when the optimizer is built.

    Asking Lightning for ``estimated_stepping_batches`` inside ``configure_optimizers`` builds the
    training loader before a checkpoint is restored, and Lightning then skips restoring the loader's
    mid-epoch position; deferring the question keeps resumption exact.
    """
    cache: dict[str, int] = {}

    def factor(step: int) -> float:
        if step == 0:
            return 0.0 if warmup_ratio > 0 else 1.0
        if "total" not in cache:
            cache["total"] = max(1, int(total_steps()))
            cache["warmup"] = math.ceil(warmup_ratio * cache["total"])
        total, warmup = cache["total"], cache["warmup"]
        if step < warmup:
            return step / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
