"""Export-sensitive primitives shared by every component.

Attention, rotary embeddings and norms live here so that an export-safe variant has exactly one place
to go (the lesson of flux's ``math.py``). Everything is real-valued (no complex tensors) and free of
data-dependent Python control flow, so ``torch.onnx.export`` and ``torch.export`` trace it as is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Scaled dot-product attention over heads.

    q: (B, H, Sq, D), k/v: (B, H, Sk, D); mask: additive float bias broadcastable to (B, H, Sq, Sk)
    (0 where allowed, a large negative number where not) or None.  Returns (B, Sq, H*D).
    """
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, Sq, D)
    b, h, s, d = out.shape
    return out.transpose(1, 2).reshape(b, s, h * d)  # (B, Sq, H*D)


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """RMSNorm computed in fp32 (Qwen-Image overflows fp16 here), cast back to the input dtype."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        x = x * weight.float()
    return x.to(dtype)


class RMSNorm(nn.Module):
    """RMSNorm with a learned weight, computed by :func:`rms_norm` (the q/k norms, the LLM's layer norms)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding on interleaved pairs (x[..., 2i], x[..., 2i+1]), the layout Qwen-Image uses.

    x: (B, H, S, D); cos/sin: (S, D/2), broadcast over batch and heads. This is the real-valued form
    of ``view_as_complex(x.reshape(..., D/2, 2)) * exp(i*theta)``.
    """
    x = x.float()
    x1, x2 = x[..., 0::2], x[..., 1::2]  # (B, H, S, D/2) each
    out1 = x1 * cos - x2 * sin
    out2 = x1 * sin + x2 * cos
    return torch.stack([out1, out2], dim=-1).flatten(-2)  # (B, H, S, D)


def apply_rope_half(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding on split halves (x[..., :D/2], x[..., D/2:]): the Qwen2/Qwen3 LLM layout.

    x: (B, H, S, D); cos/sin: (S, D/2).
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def timestep_embedding(t: Tensor, dim: int, scale: float = 1000.0, flip_sin_to_cos: bool = True,
                       downscale_freq_shift: float = 0.0, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of t (B,) -> (B, dim), in the diffusers ``get_timestep_embedding`` layout."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - downscale_freq_shift))  # (half,)
    args = scale * (t.float()[:, None] * freqs[None])  # (B, half); diffusers' multiplication order, bit for bit
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)  # (B, dim)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return emb


def gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")
