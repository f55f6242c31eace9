"""The Qwen-Image 2.1 transformer: single-stream blocks over a joint [text, image] sequence.

Parity target: diffusers' ``QwenImage21Transformer2DModel`` for text-to-image (no condition images).
Parameter names are diffusers' own, so a checkpoint loads with an identity key map.

Two properties of 2.1 shape this file:

- Attention is block-causal: text queries see earlier text only, image queries see everything. Text
  therefore never depends on the image, which is why diffusers' own SDPA processor splits attention into
  a causal text part and a full image part. We compute it the same way: per block, a *text step* (causal
  attention over text) and an *image step* (image queries against [text K/V, image K/V]). No (S, S) mask
  is materialised and the text->image corner, which would be discarded, is never computed.
- With ``causal_condition`` the text tokens are modulated at t = 0, so their per-layer K/V do not depend
  on the latents or sigma either: :meth:`TransformerV2.encode_text` computes them once per prompt and
  :meth:`TransformerV2.forward_cached` runs only the image steps. ``forward`` is the same two steps
  interleaved, so the cached and uncached paths share every line of the block.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import rope as rope_mod
from .checkpoint import load_component, read_json
from .errors import InputError
from .ops import RMSNorm, apply_rope, attention, gelu_tanh, rms_norm, timestep_embedding

TIME_PROJ_DIM = 256  # width of the sinusoidal sigma embedding (fixed in the reference)

# diffusers config.json key -> TransformerV2Config field
_DIFFUSERS_KEYS = {
    "patch_size": "patch_size",
    "in_channels": "in_channels",
    "out_channels": "out_channels",
    "num_layers": "num_layers",
    "attention_head_dim": "head_dim",
    "num_attention_heads": "num_heads",
    "context_in_dim": "context_dim",
    "mlp_ratio": "mlp_ratio",
    "axes_dims_rope": "axes_dims",
    "eps": "eps",
    "causal_condition": "causal_condition",
}


@dataclass(frozen=True)
class TransformerV2Config:
    """Shape of a Qwen-Image 2.1 transformer. Defaults are the released 7.1B model."""

    in_channels: int = 64
    out_channels: int = 64
    patch_size: int = 1
    num_layers: int = 32
    num_heads: int = 32
    head_dim: int = 128
    context_dim: int = 4096
    mlp_ratio: int = 3
    axes_dims: tuple[int, int, int] = (16, 56, 56)
    eps: float = 1e-6
    causal_condition: bool = True
    theta: float = 10000.0
    # Apple Neural Engine-friendly variants for Core ML export (issue 5); not diffusers keys, off by default (the
    # plain graph the reference runs). Same parameters, same state dict, same results up to rounding.
    ane_split_heads: bool = False  # attention as one small matmul chain per head (ml-stable-diffusion SPLIT_EINSUM)
    ane_conv: bool = False  # block linears as 1x1 convolutions over a (B, C, 1, S) layout

    def __post_init__(self):
        object.__setattr__(self, "axes_dims", tuple(int(d) for d in self.axes_dims))
        for name in ("in_channels", "out_channels", "patch_size", "num_layers", "num_heads", "head_dim",
                     "context_dim", "mlp_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"transformer config: {name} must be a positive integer, got {value!r}")
        if len(self.axes_dims) != 3 or any(d < 2 or d % 2 for d in self.axes_dims):
            raise InputError(f"transformer config: axes_dims must be three positive even numbers, got {self.axes_dims}")
        if sum(self.axes_dims) != self.head_dim:
            raise InputError(f"transformer config: axes_dims {self.axes_dims} must sum to head_dim {self.head_dim}")
        if not self.eps > 0 or not self.theta > 0:
            raise InputError(f"transformer config: eps and theta must be positive, got {self.eps}, {self.theta}")

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def mlp_dim(self) -> int:
        return self.dim * self.mlp_ratio

    @property
    def token_in(self) -> int:
        return self.in_channels * self.patch_size**2

    @property
    def token_out(self) -> int:
        return self.out_channels * self.patch_size**2

    @classmethod
    def from_diffusers(cls, cfg: dict) -> TransformerV2Config:
        """Read diffusers' ``transformer/config.json`` dict; absent keys take diffusers' defaults."""
        unknown = sorted(k for k in cfg if not k.startswith("_") and k not in _DIFFUSERS_KEYS)
        if unknown:
            raise InputError(f"transformer config has keys qwen-edge does not know: {', '.join(unknown)}")
        kwargs = {_DIFFUSERS_KEYS[k]: v for k, v in cfg.items() if k in _DIFFUSERS_KEYS}
        if kwargs.get("out_channels") is None:  # diffusers: out_channels falls back to in_channels
            kwargs["out_channels"] = kwargs.get("in_channels", cls.in_channels)
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in kwargs.items() if k in names})


QWEN_IMAGE_21 = TransformerV2Config()


def sanitize(name: str, tensor: Tensor) -> Iterable[tuple[str, Tensor]]:
    """Checkpoint key map: identity, the module mirrors diffusers' parameter names."""
    return ((name, tensor),)


def _causal_bias(n: int, like: Tensor) -> Tensor:
    """(n, n) additive bias forbidding keys after the query, built from the shape alone (export-safe)."""
    idx = torch.arange(n, device=like.device)
    later = idx[None, :] > idx[:, None]  # (n, n)
    return torch.zeros(n, n, dtype=like.dtype, device=like.device).masked_fill(later, rope_mod.MASKED)


class _ZeroCentredRMSNorm(RMSNorm):
    """RMSNorm whose checkpoint stores scale - 1 (the text projection's input norm)."""

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight.float() + 1.0, self.eps)


class _TextProjection(nn.Module):
    """Text-encoder hidden states -> model width: zero-centred RMSNorm, Linear, GELU-tanh, Linear."""

    def __init__(self, cfg: TransformerV2Config):
        super().__init__()
        self.text_norm = _ZeroCentredRMSNorm(cfg.context_dim, cfg.eps)
        self.in_layer = nn.Linear(cfg.context_dim, cfg.dim, bias=False)
        self.out_layer = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(gelu_tanh(self.in_layer(self.text_norm(x))))


class _TimestepMLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(TIME_PROJ_DIM, dim, bias=False)
        self.linear_2 = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class _TimeEmbed(nn.Module):
    """sigma (T,) -> (T, dim). The sinusoid multiplies sigma by 1000 (cos half first)."""

    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = _TimestepMLP(dim)

    def forward(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        return self.timestep_embedder(timestep_embedding(t, TIME_PROJ_DIM).to(dtype))


class _Conv1x1(nn.Conv2d):
    """A bias-free Linear computed as a 1x1 convolution over (B, C, 1, S), the layout the Neural Engine runs
    best (Apple's ml-ane-transformers). Load hooks keep the Linear's (out, in) weight in the state dict, so a
    checkpoint loads unchanged through the strict loader: (out, in) -> (out, in, 1, 1) on load and back."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, 1, bias=False)
        self._register_load_state_dict_pre_hook(self._from_linear)
        self._register_state_dict_hook(_conv_to_linear)

    @staticmethod
    def _from_linear(state: dict, prefix: str, *args) -> None:
        w = state.get(prefix + "weight")
        if w is not None and w.ndim == 2:
            state[prefix + "weight"] = w[:, :, None, None]

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x.transpose(1, 2).unsqueeze(2))  # (B, C_out, 1, S)
        return y.squeeze(2).transpose(1, 2)  # (B, S, C_out)


def _conv_to_linear(module: nn.Module, state: dict, prefix: str, local_metadata) -> None:
    state[prefix + "weight"] = state[prefix + "weight"][:, :, 0, 0]  # (out, in), as the checkpoint stores it


def _linear(cfg: TransformerV2Config, cin: int, cout: int) -> nn.Module:
    return _Conv1x1(cin, cout) if cfg.ane_conv else nn.Linear(cin, cout, bias=False)


def _attention_per_head(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """:func:`qwen_edge.ops.attention` one head at a time: q (B, H, Sq, D), k/v (B, H, Sk, D), mask broadcastable
    to (B, H, Sq, Sk) -> (B, Sq, H*D). Small per-head matmuls are what the Neural Engine tiles well."""
    scale = q.shape[-1] ** -0.5
    bias = None if mask is None else (mask[:, 0] if mask.ndim == 4 else mask)  # (B|1, Sq, Sk) or (Sq, Sk)
    heads = []
    for h in range(q.shape[1]):
        scores = torch.matmul(q[:, h] * scale, k[:, h].transpose(-1, -2))  # (B, Sq, Sk)
        if bias is not None:
            scores = scores + bias
        heads.append(torch.matmul(scores.softmax(dim=-1), v[:, h]))  # (B, Sq, D)
    return torch.cat(heads, dim=-1)  # (B, Sq, H*D)


class _Attention(nn.Module):
    """Q/K/V/out projections and per-head RMSNorm on q and k; the attention itself is in the block."""

    def __init__(self, cfg: TransformerV2Config):
        super().__init__()
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.to_q = _linear(cfg, cfg.dim, cfg.dim)
        self.to_k = _linear(cfg, cfg.dim, cfg.dim)
        self.to_v = _linear(cfg, cfg.dim, cfg.dim)
        self.to_out = nn.ModuleList([_linear(cfg, cfg.dim, cfg.dim)])
        self.norm_q = RMSNorm(cfg.head_dim, cfg.eps)
        self.norm_k = RMSNorm(cfg.head_dim, cfg.eps)

    def split_heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)  # (B, H, S, Dh)

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, S, D) -> q, k, v (B, H, S, Dh); q and k normed and rotated."""
        v = self.split_heads(self.to_v(x))  # (B, H, S, Dh)
        q = self.norm_q(self.split_heads(self.to_q(x)))  # (B, H, S, Dh)
        k = self.norm_k(self.split_heads(self.to_k(x)))  # (B, H, S, Dh)
        return apply_rope(q, cos, sin).to(v.dtype), apply_rope(k, cos, sin).to(v.dtype), v


class _SwiGLU(nn.Module):
    def __init__(self, cfg: TransformerV2Config):
        super().__init__()
        self.proj = _linear(cfg, cfg.dim, cfg.mlp_dim)
        self.out = _linear(cfg, cfg.mlp_dim, cfg.dim)
        self.gate_layer = _linear(cfg, cfg.dim, cfg.mlp_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(F.silu(self.gate_layer(x)) * self.proj(x))


class TransformerV2Block(nn.Module):
    """One single-stream block. Holds no modulation weights: every block reuses the model's shared
    ``mod`` rows [scale1, gate1, scale2, gate2] (shape (B or 1, 1, 4*D)); scale-only AdaLN, tanh gates."""

    def __init__(self, cfg: TransformerV2Config):
        super().__init__()
        self.eps = cfg.eps
        self.attend = _attention_per_head if cfg.ane_split_heads else attention
        self.attn = _Attention(cfg)
        self.img_mlp = _SwiGLU(cfg)

    def _norm(self, x: Tensor, scale: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], eps=self.eps) * (1 + scale)

    def project(self, x: Tensor, mod: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Modulated pre-attention norm, then q, k, v (B, H, S, Dh) of the tokens x (B, S, D)."""
        return self.attn.qkv(self._norm(x, mod.chunk(4, dim=-1)[0]), cos, sin)

    def update(self, x: Tensor, attn_out: Tensor, mod: Tensor) -> Tensor:
        """Gated residual of the attention output (B, S, H*Dh), then the gated SwiGLU residual."""
        _, gate1, scale2, gate2 = mod.chunk(4, dim=-1)  # (B|1, 1, D) each
        x = x + gate1.tanh() * self.attn.to_out[0](attn_out)  # (B, S, D)
        x = x + gate2.tanh() * self.img_mlp(self._norm(x, scale2))  # (B, S, D)
        if x.dtype == torch.float16:  # as the reference: keep fp16 activations finite
            x = x.clip(-65504, 65504)
        return x

    def text_step(self, txt: Tensor, mod: Tensor, cos: Tensor, sin: Tensor, bias: Tensor,
                  advance: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """Causal text attention. Returns (next txt (B, L, D), k, v (B, H, L, Dh)); with ``advance=False``
        (the last block, whose text output feeds nothing) txt is returned unchanged."""
        q, k, v = self.project(txt, mod, cos, sin)  # (B, H, L, Dh) each
        if advance:
            txt = self.update(txt, self.attend(q, k, v, bias.to(q.dtype)), mod)  # (B, L, D)
        return txt, k, v

    def image_step(self, img: Tensor, k_txt: Tensor, v_txt: Tensor, mod: Tensor, cos: Tensor, sin: Tensor,
                   bias: Tensor | None) -> Tensor:
        """Image queries against [text K/V, image K/V]; img (B, N, D), k_txt/v_txt (B, H, L, Dh)."""
        q, k, v = self.project(img, mod, cos, sin)  # (B, H, N, Dh) each
        k = torch.cat([k_txt.to(k.dtype), k], dim=2)  # (B, H, L+N, Dh)
        v = torch.cat([v_txt.to(v.dtype), v], dim=2)  # (B, H, L+N, Dh)
        out = self.attend(q, k, v, None if bias is None else bias.to(q.dtype))  # (B, N, H*Dh)
        return self.update(img, out, mod)  # (B, N, D)


class TransformerV2(nn.Module):
    """Qwen-Image 2.1 denoiser: (latents, text states, sigma, rope, mask) -> flow-matching velocity.

    Inputs: ``latents`` (B, N, C_in) packed image tokens (N = h*w, row-major); ``text`` (B, L, context_dim)
    text-encoder hidden states; ``sigma`` (B,) in [0, 1] (the pipeline's timestep / 1000); ``rope_cos`` /
    ``rope_sin`` (L+N, head_dim/2) from :meth:`rope`; ``mask`` an additive bias over the joint sequence
    (B or 1, 1, L+N, L+N), e.g. :func:`qwen_edge.rope.attention_bias_v2`, or None.

    The block-causal structure is part of the model and always applied: text queries never see later text
    or any image token, whatever ``mask`` says. ``mask`` adds to it, typically to hide right-padded text
    keys; its text-query rows are read over text keys only. ``mask=None`` is exactly what the reference
    does for a single prompt (no padding, the pipeline passes no mask).
    """

    def __init__(self, cfg: TransformerV2Config = QWEN_IMAGE_21):
        super().__init__()
        self.config = cfg
        self.time_text_embed = _TimeEmbed(cfg.dim)
        self.txt_in = _TextProjection(cfg)
        self.img_in = nn.Linear(cfg.token_in, cfg.dim, bias=False)
        # One modulation shared by every block: [scale1, gate1, scale2, gate2].
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 4 * cfg.dim, bias=False))
        self.transformer_blocks = nn.ModuleList(TransformerV2Block(cfg) for _ in range(cfg.num_layers))
        self.norm_out = nn.Module()
        self.norm_out.linear = nn.Linear(cfg.dim, cfg.dim, bias=False)  # final scale-only AdaLN
        self.proj_out = nn.Linear(cfg.dim, cfg.token_out, bias=False)

    def rope(self, text_len: int, h: int, w: int, text_pad_len: int | None = None) -> tuple[Tensor, Tensor]:
        """Rotary (cos, sin), each (text_pad_len + h*w, head_dim/2) float32, from :func:`qwen_edge.rope.rope_v2`."""
        cos, sin = rope_mod.rope_v2(self.config.axes_dims, text_len, h, w, self.config.theta, text_pad_len)
        return torch.from_numpy(cos), torch.from_numpy(sin)

    def forward(self, latents: Tensor, text: Tensor, sigma: Tensor, rope_cos: Tensor, rope_sin: Tensor,
                mask: Tensor | None = None) -> Tensor:
        """Velocity (B, N, C_out) for the image tokens. See the class docstring for the inputs."""
        length, n = text.shape[1], latents.shape[1]
        _check_rope(rope_cos, rope_sin, length + n)
        temb_txt, temb_img = self._time(sigma, latents.dtype)  # (1|B, D), (B, D)
        mod_txt, mod_img = self._mod(temb_txt), self._mod(temb_img)  # (1|B, 1, 4D), (B, 1, 4D)
        txt = self.txt_in(text)  # (B, L, D)
        img = self.img_in(latents)  # (B, N, D)
        cos_t, sin_t, bias_t = _text_inputs(rope_cos, rope_sin, mask, txt)
        cos_i, sin_i, bias_i = _image_inputs(rope_cos, rope_sin, mask, n)
        last = len(self.transformer_blocks) - 1
        for i, block in enumerate(self.transformer_blocks):
            txt, k, v = block.text_step(txt, mod_txt, cos_t, sin_t, bias_t, advance=i < last)  # k, v (B, H, L, Dh)
            img = block.image_step(img, k, v, mod_img, cos_i, sin_i, bias_i)  # (B, N, D)
        return self._head(img, temb_img)  # (B, N, C_out)

    def encode_text(self, text: Tensor, rope_cos: Tensor, rope_sin: Tensor, mask: Tensor | None = None) -> Tensor:
        """Per-layer text keys/values, (num_layers, 2, B, heads, L, head_dim), independent of latents and sigma.

        rope_cos/rope_sin: the joint tables (L+N, Dh/2) or just their first L rows; mask: the joint bias or
        its (.., L, L) text block, or None. Needs ``causal_condition`` (text modulated at t = 0).
        """
        kv = self.text_kv_pairs(text, rope_cos, rope_sin, mask)
        return torch.stack([torch.stack(pair) for pair in kv])  # (layers, 2, B, H, L, Dh)

    def text_kv_pairs(self, text: Tensor, rope_cos: Tensor, rope_sin: Tensor,
                      mask: Tensor | None = None) -> list[tuple[Tensor, Tensor]]:
        """:meth:`encode_text` as one (k, v) pair per layer, each (B, heads, L, head_dim), unstacked: the
        QNN export stacks them at rank 5 (the HTP backend stops at rank 5)."""
        if not self.config.causal_condition:
            raise InputError("text K/V caching needs causal_condition=True: otherwise text depends on sigma")
        temb = self._time(text.new_zeros(1), text.dtype)[0]  # (1, D), the t = 0 row
        mod = self._mod(temb)  # (1, 1, 4D)
        txt = self.txt_in(text)  # (B, L, D)
        cos, sin, bias = _text_inputs(rope_cos, rope_sin, mask, txt)
        kv, last = [], len(self.transformer_blocks) - 1
        for i, block in enumerate(self.transformer_blocks):
            txt, k, v = block.text_step(txt, mod, cos, sin, bias, advance=i < last)  # k, v (B, H, L, Dh)
            kv.append((k, v))
        return kv

    def forward_cached(self, latents: Tensor, kv: Tensor, sigma: Tensor, rope_cos: Tensor, rope_sin: Tensor,
                       mask: Tensor | None = None) -> Tensor:
        """Velocity (B, N, C_out) from :meth:`encode_text`'s K/V (or :meth:`text_kv_pairs`' list: ``kv[i][0]``
        and ``kv[i][1]`` are layer i's keys and values either way): only image tokens are computed.

        rope_cos/rope_sin: the joint tables (L+N, Dh/2) or their last N rows; mask: the joint bias
        (.., L+N, L+N) or its image rows (.., N, L+N), or None.
        """
        mod, scale = self.step_modulation(sigma, latents.dtype)  # (B, 1, 4D), (B, 1, D)
        return self.forward_modulated(latents, kv, mod, scale, rope_cos, rope_sin, mask)

    def step_modulation(self, sigma: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """What the image tokens of a step at ``sigma`` (B,) are modulated with; a function of sigma alone, so a
        fixed schedule can tabulate it: the blocks' shared rows (B, 1, 4D) and the final norm's scale (B, 1, D)."""
        _, temb = self._time(sigma, dtype)  # (B, D)
        return self._mod(temb), self.norm_out.linear(F.silu(temb))[:, None]

    def forward_modulated(self, latents: Tensor, kv: Tensor, mod: Tensor, scale: Tensor, rope_cos: Tensor,
                          rope_sin: Tensor, mask: Tensor | None = None) -> Tensor:
        """:meth:`forward_cached` given :meth:`step_modulation`'s ``mod`` (B, 1, 4D) and ``scale`` (B, 1, D) instead
        of sigma: no timestep embedding or modulation weights are used."""
        n = latents.shape[1]
        img = self.img_in(latents)  # (B, N, D)
        cos, sin, bias = _image_inputs(rope_cos, rope_sin, mask, n)
        for i, block in enumerate(self.transformer_blocks):
            img = block.image_step(img, kv[i][0], kv[i][1], mod, cos, sin, bias)  # (B, N, D)
        return self._out(img, scale)  # (B, N, C_out)

    def _time(self, sigma: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Embeddings (text rows, image rows). Text rows are the single t = 0 row under causal_condition,
        else the image rows themselves."""
        b = sigma.shape[0]
        sigma = sigma.to(dtype)  # the reference rounds sigma to the model dtype before embedding it
        if not self.config.causal_condition:
            temb = self.time_text_embed(sigma, dtype)  # (B, D)
            return temb, temb
        temb = self.time_text_embed(torch.cat([sigma, sigma.new_zeros(1)]), dtype)  # (B+1, D)
        return temb[b:], temb[:b]

    def _mod(self, temb: Tensor) -> Tensor:
        return self.modulation(temb)[:, None]  # (T, 1, 4D)

    def _head(self, img: Tensor, temb: Tensor) -> Tensor:
        """Scale-only final AdaLN (image rows) and the output projection."""
        return self._out(img, self.norm_out.linear(F.silu(temb))[:, None])  # (B, N, C_out)

    def _out(self, img: Tensor, scale: Tensor) -> Tensor:
        img = F.layer_norm(img, img.shape[-1:], eps=self.config.eps) * (1 + scale)  # (B, N, D)
        return self.proj_out(img)  # (B, N, C_out)


def _text_inputs(cos: Tensor, sin: Tensor, mask: Tensor | None, txt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Text rows of the rope tables and the text-query bias: causal, plus the mask's text block."""
    length = txt.shape[1]
    bias = _causal_bias(length, txt)  # (L, L)
    if mask is not None:
        bias = bias + mask[..., :length, :length].to(bias.dtype)  # (B|1, 1, L, L)
    return cos[:length], sin[:length], bias


def _image_inputs(cos: Tensor, sin: Tensor, mask: Tensor | None, n: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """Image rows of the rope tables and of the mask (image queries against every key)."""
    return cos[-n:], sin[-n:], None if mask is None else mask[..., -n:, :]


def _check_rope(cos: Tensor, sin: Tensor, seq: int) -> None:
    if tuple(cos.shape[:1]) != (seq,) or cos.shape != sin.shape:
        raise InputError(f"rope tables must both be ({seq}, head_dim/2) for text + image tokens, "
                         f"got {tuple(cos.shape)} and {tuple(sin.shape)}")


def load_transformer_v2(folder: str | Path, cfg: TransformerV2Config | None = None,
                        dtype: torch.dtype = torch.float32) -> TransformerV2:
    """Load a diffusers ``transformer/`` folder (config.json + safetensors) strictly into a TransformerV2."""
    folder = Path(folder)
    cfg = cfg or TransformerV2Config.from_diffusers(read_json(folder / "config.json"))
    return load_component(lambda: TransformerV2(cfg), folder, sanitize, dtype)
