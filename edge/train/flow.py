"""Training the text encoder and the 2.1 transformer jointly by flow matching: the 40-step teacher.

Rectified flow as the Qwen-Image pipelines sample it: ``x_sigma = (1 - sigma) x0 + sigma * noise`` and the
model predicts ``v = noise - x0``, so the Euler step ``x + (sigma_next - sigma) v`` of qwen-edge's sampler
walks from noise (sigma 1) to data (sigma 0). Inputs are exactly what the pipeline feeds at inference:
the whole chat template through the causal text encoder, read before its final norm, the system turn's
tokens dropped, no padding (batches are grouped by token length, so no mask is ever needed and the image
rotary positions, which follow the text length, are the inference ones).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from .optim import Hybrid, clip, ema_update

from ..prompt import PromptTemplate
from ..text_encoder import TextEncoder, TextEncoderConfig
from ..transformer_v2 import TransformerV2, TransformerV2Config

LATENT_GRID = 8  # 128 px / 16
BLANK = " "  # the unconditional prompt: the pipelines' default negative prompt
# Weight matrices Muon leaves to AdamW: the token table, the layers that read the inputs, the output projection.
ADAMW_ONLY = ("embed_tokens", "img_in", "txt_in.in_layer", "timestep_embedder.linear_1", "proj_out")
OPTIMIZERS = ("muon", "adamw")  # FlowRecipe.optimizer's values


@dataclass(frozen=True)
class FlowRecipe:
    """Model widths and the optimisation schedule of the teacher."""

    heads: int = 3
    head_dim: int = 32
    layers: int = 4
    text_hidden: int = 64
    text_layers: int = 2
    # 45.5 min on a 2-core EPYC at 2 threads (0.165 s/step in session 10; 0.14 in session 7), 39.6 min on session
    # 12's 2-core Xeon (0.144 s/step; the whole recipe 63.0 min there), 50.6 min in session 13 on the same kind of
    # host (0.184 s/step with the fused optimiser: the hosts' speed moves by a third); 18,000 in sessions 7-9,
    # when the VAE took 3.6 min instead of 7.8; 10,000 until session 7 (1 thread). Session 15: 14,000 with Muon,
    # whose step costs 1.10-1.13x AdamW's (benchmarks/bench_train_step.py) and which reaches AdamW's held-out flow
    # loss in about half the steps (41.4 min in session 15's run of the recipe). Session 16: 11,000, so the VAE can
    # take 6,600 steps (session 15's VAE's reconstructions judged 92%, capping its teacher's shapes at 90.5%).
    steps: int = 11000
    batch: int = 32  # small batches, many steps: what a CPU budget buys the most learning with
    lr: float = 2e-3
    ema: float = 0.998
    # Classifier-free guidance: the share of batches trained on the blank prompt (the pipelines' negative " "), so
    # the teacher can sample with true CFG and the student can be distilled from guided trajectories (0: none;
    # session 5: teacher 12.5% -> 26.5% with sigma_shift 3 and guidance 3).
    cfg_dropout: float = 0.1
    # SD3's shift of the training sigmas, s -> k s / (1 + (k - 1) s): k > 1 trains more at high noise, where this
    # model decides shapes and counts (benchmarks/diagnose_default.py --trajectory). 1: none.
    sigma_shift: float = 3.0
    # "muon": torch.optim.Muon on the hidden weight matrices, AdamW on the rest (train.optim.Hybrid); "adamw":
    # AdamW on everything (until session 15).
    optimizer: str = "muon"


def text_encoder_config(vocab_size: int, r: FlowRecipe) -> TextEncoderConfig:
    """A tiny Qwen3-VL text stack (qk-norm, GQA), read before its final norm as 2.1 reads it."""
    return TextEncoderConfig(vocab_size=vocab_size, hidden_size=r.text_hidden, intermediate_size=2 * r.text_hidden,
                             num_layers=r.text_layers, num_heads=4, num_kv_heads=2, head_dim=16,
                             rope_theta=5_000_000.0, qk_norm=True, final_norm=False)


def transformer_config(z_dim: int, r: FlowRecipe) -> TransformerV2Config:
    """The 2.1 single-stream transformer at tiny width; MSRoPE axes scaled to the head dim."""
    third = r.head_dim // 8 * 2  # frame axis: a quarter of the head, as (16, 56, 56) is roughly
    rest = (r.head_dim - third) // 2
    return TransformerV2Config(in_channels=z_dim, out_channels=z_dim, num_layers=r.layers, num_heads=r.heads,
                               head_dim=r.head_dim, context_dim=r.text_hidden, axes_dims=(third, rest, rest))


class PromptIds:
    """Captions tokenized through the 2.1 template, grouped by length (a batch never needs padding)."""

    def __init__(self, tokenizer, template: PromptTemplate, captions: list[str]):
        self.drop = template.drop
        ids = [tokenizer.encode(template.render(c)).ids for c in captions]
        self.blank = torch.tensor([tokenizer.encode(template.render(BLANK)).ids], dtype=torch.int64)  # (1, L0)
        self.groups: dict[int, list[int]] = {}
        for i, seq in enumerate(ids):
            self.groups.setdefault(len(seq), []).append(i)
        self.ids = ids

    def batch(self, rng: np.random.Generator, size: int) -> tuple[np.ndarray, torch.Tensor]:
        """Indices of ``size`` captions of one token length (picked in proportion to its share) and their ids."""
        lengths = sorted(self.groups)
        weights = np.array([len(self.groups[n]) for n in lengths], dtype=np.float64)
        n = lengths[int(rng.choice(len(lengths), p=weights / weights.sum()))]
        idx = rng.choice(self.groups[n], size=size, replace=len(self.groups[n]) < size)
        return idx, torch.tensor([self.ids[i] for i in idx], dtype=torch.int64)

    def of(self, indices) -> torch.Tensor:
        """Ids of captions that share one length, (B, L)."""
        return torch.tensor([self.ids[i] for i in indices], dtype=torch.int64)


def pack(z: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C): the 2.1 token layout (``qwen_edge.latents.pack_v2``)."""
    return z.flatten(2).transpose(1, 2)


def condition(te: TextEncoder, ids: torch.Tensor, drop: int) -> torch.Tensor:
    """Template ids (B, L) -> conditioning (B, L - drop, D), as the pipeline computes it."""
    return te(ids)[:, drop:]


def velocity(tr: TransformerV2, x: torch.Tensor, text: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The transformer on packed latents (B, N, C) with the inference rotary tables (no mask)."""
    cos, sin = tr.rope(text.shape[1], LATENT_GRID, LATENT_GRID)
    return tr(x, text, sigma, cos, sin)  # (B, N, C)


def sample_sigma(rng: torch.Generator, n: int, shift: float = 1.0) -> torch.Tensor:
    """Training sigmas: logit-normal (mass in the middle, where the layout is decided) mixed with uniform, then
    shifted by ``shift`` toward high noise (1: unchanged)."""
    logit = torch.sigmoid(torch.randn(n, generator=rng))
    uniform = torch.rand(n, generator=rng)
    s = torch.where(torch.rand(n, generator=rng) < 0.3, uniform, logit)
    return (shift * s / (1 + (shift - 1) * s)).clamp(1e-3, 1.0)


def train_flow(r: FlowRecipe, latents: torch.Tensor, prompts: PromptIds, vocab_size: int,
               seed: int) -> tuple[TextEncoder, TransformerV2]:
    """Train text encoder + transformer on normalised latents (N, C, 8, 8); returns their EMA weights."""
    if r.optimizer not in OPTIMIZERS:
        raise ValueError(f"FlowRecipe.optimizer must be one of {OPTIMIZERS}, got {r.optimizer!r}")
    torch.manual_seed(seed)
    gen, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    te = TextEncoder(text_encoder_config(vocab_size, r))
    tr = TransformerV2(transformer_config(latents.shape[1], r))
    _init(te, tr)
    ema = [copy.deepcopy(te).eval().requires_grad_(False), copy.deepcopy(tr).eval().requires_grad_(False)]
    named = [*te.named_parameters(prefix="text_encoder"), *tr.named_parameters(prefix="transformer")]
    params = [p for _, p in named]
    opt = Hybrid(named, lr=r.lr, weight_decay=0.01, steps=r.steps, adamw_only=ADAMW_ONLY, betas=(0.9, 0.99),
                 muon=r.optimizer == "muon")
    bar = tqdm(range(r.steps), desc="teacher", unit="step")
    for step in bar:
        idx, ids = prompts.batch(rng, r.batch)
        if r.cfg_dropout and rng.random() < r.cfg_dropout:  # a whole batch on the blank prompt: no padding needed
            ids = prompts.blank.expand(r.batch, -1)
        x0 = pack(latents[torch.from_numpy(idx)])  # (B, N, C)
        loss = flow_loss(te, tr, x0, ids, prompts.drop, gen, r.sigma_shift)
        opt.zero_grad()
        loss.backward()
        clip(params)
        opt.step()
        ema_update(ema, [te, tr], min(r.ema, (1 + step) / (10 + step)))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return ema[0], ema[1]


def flow_loss(te: TextEncoder, tr: TransformerV2, x0: torch.Tensor, ids: torch.Tensor, drop: int,
              gen: torch.Generator, shift: float = 1.0) -> torch.Tensor:
    """Mean squared error of the predicted velocity at random sigmas."""
    sigma = sample_sigma(gen, x0.shape[0], shift)  # (B,)
    noise = torch.randn(x0.shape, generator=gen)
    s = sigma[:, None, None]
    xt = (1 - s) * x0 + s * noise  # (B, N, C)
    v = velocity(tr, xt, condition(te, ids, drop), sigma)  # (B, N, C)
    return ((v - (noise - x0)) ** 2).mean()


def _init(te: TextEncoder, tr: TransformerV2) -> None:
    """PyTorch's default init everywhere (the time embedding and modulation must start O(1), or the tanh gates
    and their gradients start near zero and training crawls), with a zero output projection so the first
    prediction is 0, and the zero-centred text norm at scale 1 (stored scale - 1 = 0)."""
    torch.nn.init.zeros_(tr.proj_out.weight)
    tr.txt_in.text_norm.weight.data.zero_()
