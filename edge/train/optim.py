"""The one learning-rate schedule every stage uses: linear warm-up, then cosine decay to 5%."""

from __future__ import annotations

import math

import torch


def warmup_cosine(opt: torch.optim.Optimizer, steps: int, warmup: float = 0.05) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over ``steps`` optimiser steps (call ``.step()`` after each)."""
    w = max(1, int(warmup * steps))

    def factor(i: int) -> float:
        if i < w:
            return (i + 1) / w
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, (i - w) / max(1, steps - w))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
