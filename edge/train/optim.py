"""What every training stage shares: AdamW (and the teacher's Muon), gradient clipping, the EMA and one
learning-rate schedule.

On a CPU the tiny models' optimiser work is many small tensors; ``torch.optim.AdamW``'s default per-tensor loop,
``clip_grad_norm_``'s (foreach is only the default on GPUs) and a per-tensor EMA cost 5-10% of a training step.
The fused / foreach forms compute the same update in a few kernels.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def adamw(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float,
          betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW with the fused CPU kernel (torch >= 2.4)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, fused=True)


class Hybrid:
    """Muon on the hidden weight matrices, AdamW on everything else, one warm-up + cosine schedule for both.

    ``torch.optim.Muon`` orthogonalises each matrix's momentum (Newton-Schulz) and, with ``match_rms_adamw``,
    scales its update to AdamW's RMS, so both take the same learning rate and weight decay. Embeddings, the layers
    that read the model's inputs, the output projection, norms and biases stay on AdamW, as Muon's authors keep
    them. Used like one optimiser: ``zero_grad()``, ``backward()``, ``step()`` (which also steps the schedule).
    ``muon=False``: AdamW on everything (the recipe before session 15).
    """

    def __init__(self, named: Iterable[tuple[str, torch.nn.Parameter]], lr: float, weight_decay: float,
                 steps: int, adamw_only: tuple[str, ...], betas: tuple[float, float] = (0.9, 0.999),
                 muon: bool = True):
        named = list(named)
        self.muon_names = [n for n, p in named if muon and p.ndim == 2 and not any(k in n for k in adamw_only)]
        hidden = set(self.muon_names)
        self.opts = [adamw([p for n, p in named if n not in hidden], lr=lr, weight_decay=weight_decay, betas=betas)]
        if hidden:
            self.opts.append(torch.optim.Muon([p for n, p in named if n in hidden], lr=lr,
                                              weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw"))
        self.scheds = [warmup_cosine(o, steps) for o in self.opts]

    def zero_grad(self) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=True)

    def step(self) -> None:
        for o in self.opts:
            o.step()
        for s in self.scheds:
            s.step()


def clip(params: list[torch.nn.Parameter], max_norm: float = 1.0) -> torch.Tensor:
    """Clip the gradients' global L2 norm to ``max_norm`` (foreach kernels, also on CPU)."""
    return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)


@torch.no_grad()
def ema_update(ema: list[torch.nn.Module], live: list[torch.nn.Module], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * live, parameter by parameter (one foreach lerp per module)."""
    for e, m in zip(ema, live):
        torch._foreach_lerp_(list(e.parameters()), [p.detach() for p in m.parameters()], 1.0 - decay)


def warmup_cosine(opt: torch.optim.Optimizer, steps: int, warmup: float = 0.05) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over ``steps`` optimiser steps (call ``.step()`` after each): linear warm-up, cosine decay to 5%."""
    w = max(1, int(warmup * steps))

    def factor(i: int) -> float:
        if i < w:
            return (i + 1) / w
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, (i - w) / max(1, steps - w))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
