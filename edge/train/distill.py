"""Distilling the 40-step teacher into a 4-step student by trajectory matching.

The teacher integrates 40 Euler steps on ``linspace(1, 1/40, 40)``; the student's grid
(:data:`STUDENT_SIGMAS`) is a subset of it, so every teacher trajectory gives, for each student step i, the
state ``x(s_i)`` and where the teacher lands ``x(s_{i+1})``. The student (initialised from the teacher) is
trained so that its Euler steps make the same jumps. ``DistillRecipe.loss``:

- ``"unrolled"`` (the recipe's, since session 11): the student samples all its steps from the trajectory's noise,
  with gradients through the whole rollout, and each state it reaches is matched to the teacher's at that sigma:
  the student learns from its own states, as it will sample, so an early step's error is corrected by the later
  ones instead of compounding (the shipped student over 1,000 held-out prompts: 67.7% vs 63.2% for ``"step"``,
  same teacher; ``benchmarks/eval_default.py --prompts 1000``);
- ``"step"``: each step alone, from the teacher's state:
  ``v*(x(s_i), s_i) = (x(s_{i+1}) - x(s_i)) / (s_{i+1} - s_i)``.

With ``guidance`` > 1 the teacher's trajectories
are sampled with true CFG against the blank prompt (a teacher trained with ``FlowRecipe.cfg_dropout``), so the
guidance is distilled into the student, which runs without CFG as Qwen's distilled models do. The text encoder is
shared and frozen: only the transformer changes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from .optim import adamw, clip, warmup_cosine

from ..text_encoder import TextEncoder
from ..transformer_v2 import TransformerV2
from .flow import LATENT_GRID, PromptIds, condition

TEACHER_STEPS = 40
STUDENT_SIGMAS = (1.0, 0.75, 0.5, 0.25)  # each is k/40: on the teacher's grid


@dataclass(frozen=True)
class DistillRecipe:
    """How many teacher trajectories, and the student's schedule."""

    trajectories: int = 2048  # session 5: 768 / 300 gave a student at 77% of its teacher, 2,048 / 1,000 at 91%
    # An "unrolled" step runs the student 4 times (~0.6 s at batch 32 on two cores). Session 17: 500 -> 1,000 on
    # session 16's teacher: the student over 1,000 held-out prompts 85.2 -> 86.4% (batch 16 x 1,000: 85.3%; lr 6e-4
    # x 500: 84.7%), for ~5 more minutes.
    steps: int = 1000
    loss: str = "unrolled"  # or "step" (sessions 3-10; 1,000 steps)
    batch: int = 32
    lr: float = 3e-4
    guidance: float = 3.0  # true-CFG scale of the teacher's trajectories (1: unguided; needs FlowRecipe.cfg_dropout)


def teacher_grid(steps: int = TEACHER_STEPS) -> np.ndarray:
    """The teacher's sigmas as the pipeline builds them with mu = 0: linspace(1, 1/N, N) then 0."""
    return np.append(np.linspace(1.0, 1.0 / steps, steps), 0.0).astype(np.float32)


@torch.no_grad()
def trajectories(te: TextEncoder, tr: TransformerV2, prompts: PromptIds, r: DistillRecipe, z_dim: int,
                 seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Teacher trajectories in batches of one token length: [(text (B, L', D), states (5, B, N, C))].

    ``states[i]`` is the latent at ``STUDENT_SIGMAS[i]`` (``states[4]`` at sigma 0). The text K/V are
    computed once per batch (``encode_text``) and only image tokens run per step, as at inference.
    """
    grid = teacher_grid()
    keep = [int(round((1 - s) * TEACHER_STEPS)) for s in STUDENT_SIGMAS] + [TEACHER_STEPS]
    gen, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    out = []
    for _ in tqdm(range(r.trajectories // r.batch), desc="trajectories", unit="batch"):
        _, ids = prompts.batch(rng, r.batch)
        text = condition(te, ids, prompts.drop)  # (B, L', D)
        cos, sin = tr.rope(text.shape[1], LATENT_GRID, LATENT_GRID)
        kv = tr.encode_text(text, cos, sin)
        if r.guidance > 1:
            blank = condition(te, prompts.blank, prompts.drop).expand(r.batch, -1, -1)  # (B, L0', D)
            ucos, usin = tr.rope(blank.shape[1], LATENT_GRID, LATENT_GRID)
            ukv = tr.encode_text(blank, ucos, usin)
        x = torch.randn((r.batch, LATENT_GRID**2, z_dim), generator=gen)  # (B, N, C) at sigma 1
        states = [x]
        for k in range(TEACHER_STEPS):
            sigma = torch.full((r.batch,), float(grid[k]))
            v = tr.forward_cached(x, kv, sigma, cos, sin)
            if r.guidance > 1:
                vn = tr.forward_cached(x, ukv, sigma, ucos, usin)
                v = vn + r.guidance * (v - vn)  # the pipelines' true CFG (2.1: no rescale)
            x = x + float(grid[k + 1] - grid[k]) * v
            if k + 1 in keep:
                states.append(x)
        out.append((text, torch.stack(states)))  # (5, B, N, C)
    return out


def train_student(teacher: TransformerV2, data: list[tuple[torch.Tensor, torch.Tensor]], r: DistillRecipe,
                  seed: int) -> TransformerV2:
    """Fine-tune a copy of the teacher so that its Euler steps land on the teacher's states (``r.loss``)."""
    if r.loss not in ("unrolled", "step"):
        raise ValueError(f"DistillRecipe.loss must be 'unrolled' or 'step', got {r.loss!r}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    params = list(student.parameters())
    opt = adamw(params, lr=r.lr, weight_decay=0.0)
    sched = warmup_cosine(opt, r.steps, warmup=0.0)
    sig = torch.tensor((*STUDENT_SIGMAS, 0.0))
    bar = tqdm(range(r.steps), desc="student", unit="step")
    for step in bar:
        text, states = data[int(rng.integers(len(data)))]  # (B, L', D), (5, B, N, C)
        cos, sin = student.rope(text.shape[1], LATENT_GRID, LATENT_GRID)
        if r.loss == "unrolled":
            loss = _unrolled_loss(student, text, states, sig, cos, sin)
        else:
            loss = _step_loss(student, text, states, sig, cos, sin, rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip(params)
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return student.eval()


def _unrolled_loss(student: TransformerV2, text: torch.Tensor, states: torch.Tensor, sig: torch.Tensor, cos, sin):
    """The student's whole rollout from ``states[0]``; each state it reaches vs the teacher's, as a velocity
    error (divided by the step's squared size, so every step weighs alike)."""
    x, loss = states[0], 0.0  # (B, N, C) at sigma 1
    for i in range(len(sig) - 1):
        ds = float(sig[i + 1] - sig[i])
        x = x + ds * student(x, text, sig[i].expand(x.shape[0]), cos, sin)
        loss = loss + ((x - states[i + 1]) ** 2).mean() / ds**2
    return loss / (len(sig) - 1)


def _step_loss(student: TransformerV2, text: torch.Tensor, states: torch.Tensor, sig: torch.Tensor, cos, sin,
               rng: np.random.Generator):
    """One student step per sample (a random one), from the teacher's state to the teacher's next state."""
    i = torch.from_numpy(rng.integers(0, len(sig) - 1, size=text.shape[0]))
    b = torch.arange(text.shape[0])
    x, target = states[i, b], states[i + 1, b]  # (B, N, C)
    ds = (sig[i + 1] - sig[i])[:, None, None]
    v = student(x, text, sig[i], cos, sin)  # (B, N, C)
    return ((x + ds * v - target) ** 2).mean() / (ds**2).mean()  # = velocity error, scale-free over steps
