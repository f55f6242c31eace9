"""The text encoders: the text stack of Qwen3-VL (Qwen-Image 2.1) and Qwen2.5-VL (Qwen-Image v1), once.

Both are the same decoder-only transformer (pre-norm RMSNorm, GQA attention with split-half RoPE, SwiGLU
MLP); the differences are config flags: Qwen3 normalises each head of q and k (``qk_norm``), Qwen2.5 puts
biases on q/k/v (``qkv_bias``). No vision tower and no lm_head: Qwen-Image only reads hidden states.

Positions. The VL models use M-RoPE: three position axes (time, height, width) whose frequencies are
interleaved (Qwen3-VL) or split in sections (Qwen2.5-VL). For text-only input transformers gives every
axis the same position ``arange(L)`` — even with a padding mask, since no image grid is passed — and
picking each frequency from one of three identical tables is the plain table: M-RoPE reduces to 1D RoPE.
So the tables are computed from the config on the fly (nothing for the meta-device build to leave empty).

Which hidden state. v1 reads the output of the final norm (``hidden_states[-1]`` in transformers 5,
where that entry is tied to ``last_hidden_state``); 2.1 reads the last decoder layer's output *before*
the final norm (its pipeline hooks the norm away). ``final_norm`` selects this; the norm weight is always
loaded so one checkpoint serves both readings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import load_component, read_json
from .errors import InputError
from .ops import RMSNorm, apply_rope_half, attention


@dataclass(frozen=True)
class TextEncoderConfig:
    """Shape and flags of one Qwen VL text stack."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE
    qkv_bias: bool = False  # Qwen2.5: q/k/v projections carry biases
    o_bias: bool = False  # Qwen3's `attention_bias` also puts one on o_proj (off in every released model)
    final_norm: bool = True  # apply the final RMSNorm (v1) or return its input (2.1)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InputError(f"text encoder config: {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise InputError(f"text encoder config: num_heads {self.num_heads} is not a multiple of "
                             f"num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise InputError(f"text encoder config: head_dim must be even for RoPE, got {self.head_dim}")
        if not self.rms_norm_eps > 0 or not self.rope_theta > 0:
            raise InputError("text encoder config: rms_norm_eps and rope_theta must be positive")

    @classmethod
    def from_transformers(cls, cfg: dict, final_norm: bool | None = None) -> TextEncoderConfig:
        """Read a Qwen3-VL or Qwen2.5-VL ``config.json`` (its ``text_config``, falling back to the top-level
        keys older Qwen2.5-VL files keep there).

        ``final_norm`` defaults to how Qwen-Image reads each encoder: after the norm for Qwen2.5-VL (v1),
        before it for Qwen3-VL (2.1).
        """
        model_type = str(cfg.get("model_type", ""))
        if model_type not in _FLAGS:
            raise InputError(f"text encoder config.json has model_type {model_type!r}; qwen-edge reads "
                             f"{', '.join(_FLAGS)}")
        text = {**{k: v for k, v in cfg.items() if k != "text_config"}, **(cfg.get("text_config") or {})}
        if text.get("hidden_act", "silu") != "silu":
            raise InputError(f"text encoder hidden_act {text['hidden_act']!r} is not supported (only silu)")
        if text.get("use_sliding_window"):  # off in every Qwen2.5-VL release; not implemented here
            raise InputError("text encoder config enables sliding-window attention, which qwen-edge does not implement")
        flags = dict(_FLAGS[model_type])
        if model_type == "qwen3_vl":
            flags.update(qkv_bias=bool(text.get("attention_bias", False)), o_bias=bool(text.get("attention_bias", False)))
        if final_norm is not None:
            flags["final_norm"] = final_norm
        try:
            heads = int(text["num_attention_heads"])
            return cls(
                vocab_size=int(text["vocab_size"]), hidden_size=int(text["hidden_size"]),
                intermediate_size=int(text["intermediate_size"]), num_layers=int(text["num_hidden_layers"]),
                num_heads=heads, num_kv_heads=int(text.get("num_key_value_heads") or heads),
                head_dim=int(text.get("head_dim") or int(text["hidden_size"]) // heads),
                rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)), rope_theta=_rope_theta(text), **flags)
        except KeyError as e:
            raise InputError(f"text encoder config.json lacks {e.args[0]!r}") from None


# Per model type: the architecture flags, and how Qwen-Image reads the hidden states.
_FLAGS = {
    "qwen3_vl": dict(qk_norm=True, qkv_bias=False, o_bias=False, final_norm=False),
    "qwen2_5_vl": dict(qk_norm=False, qkv_bias=True, o_bias=False, final_norm=True),
}


def _rope_theta(text: dict) -> float:
    """rope_theta from transformers 5's ``rope_parameters`` or 4.x's ``rope_theta`` + ``rope_scaling``;
    only unscaled RoPE ('default', or 'mrope', which is default RoPE for text) is supported."""
    params = text.get("rope_parameters") or text.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "mrope"):
        raise InputError(f"text encoder rope_type {kind!r} is not supported (only unscaled RoPE)")
    theta = params.get("rope_theta", text.get("rope_theta"))
    if theta is None:
        raise InputError("text encoder config.json gives no rope_theta")
    return float(theta)


# The released encoders, read the way Qwen-Image reads them.
QWEN3_VL_8B = TextEncoderConfig(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36,
                                num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6,
                                rope_theta=5_000_000.0, **_FLAGS["qwen3_vl"])
QWEN25_VL_7B = TextEncoderConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                                 num_heads=28, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6,
                                 rope_theta=1_000_000.0, **_FLAGS["qwen2_5_vl"])


class Attention(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.config = cfg
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_dim, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def _heads(self, x: Tensor, n: int) -> Tensor:
        b, s, _ = x.shape
        return x.view(b, s, n, self.config.head_dim)  # (B, S, n, hd)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        cfg = self.config
        q = self._heads(self.q_proj(x), cfg.num_heads)  # (B, S, H, hd)
        k = self._heads(self.k_proj(x), cfg.num_kv_heads)  # (B, S, Hkv, hd)
        v = self._heads(self.v_proj(x), cfg.num_kv_heads)  # (B, S, Hkv, hd)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope_half(q.transpose(1, 2), cos, sin)  # (B, H, S, hd)
        k = apply_rope_half(k.transpose(1, 2), cos, sin)  # (B, Hkv, S, hd)
        v = v.transpose(1, 2)  # (B, Hkv, S, hd)
        # GQA: query head h reads kv head h // group (transformers' repeat_kv order).
        group = cfg.num_heads // cfg.num_kv_heads
        k = k.repeat_interleave(group, dim=1)  # (B, H, S, hd)
        v = v.repeat_interleave(group, dim=1)  # (B, H, S, hd)
        return self.o_proj(attention(q, k, v, mask))  # (B, S, D)


class MLP(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, S, D)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)  # (B, S, D)
        return x + self.mlp(self.post_attention_layernorm(x))  # (B, S, D)


class TextEncoder(nn.Module):
    """Token ids -> hidden states of a Qwen VL text stack (no lm_head, no vision tower).

    Attention is causal, so every token's hidden state depends only on the tokens before it: padding on
    the *right* up to a static length leaves the real tokens' hidden states unchanged, whatever the pad ids
    and with or without a mask. An exporter can therefore trace one static length and the caller slices
    ``[:, :n]``. ``attention_mask`` (1 = token, 0 = padding) only matters for left padding; positions are
    ``arange(L)`` regardless, as transformers computes them for text-only input.
    """

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """input_ids (B, L) int64, attention_mask (B, L) int64 or None -> hidden (B, L, hidden_size)."""
        x = self.embed_tokens(input_ids)  # (B, L, D)
        cos, sin = self.rope_tables(input_ids.shape[1], x.dtype, x.device)  # (L, hd/2) each
        mask = causal_mask(attention_mask, input_ids.shape[1], x.dtype, x.device)  # (B|1, 1, L, L)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)  # (B, L, D)
        return self.norm(x) if self.config.final_norm else x  # (B, L, D)

    def rope_tables(self, length: int, dtype: torch.dtype, device) -> tuple[Tensor, Tensor]:
        """cos/sin (L, head_dim/2) for positions 0..L-1, computed in fp32 like transformers, then cast."""
        hd = self.config.head_dim
        inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
        freqs = torch.arange(length, dtype=torch.float32, device=device)[:, None] * inv_freq[None]  # (L, hd/2)
        return freqs.cos().to(dtype), freqs.sin().to(dtype)


def causal_mask(attention_mask: Tensor | None, length: int, dtype: torch.dtype, device) -> Tensor:
    """Additive mask (B|1, 1, L, L): 0 where query i may read key j (j <= i and j is not padding).

    Masked entries get the dtype's most negative finite value rather than -inf, so a query that may read
    nothing (a left-padding slot) gets a uniform row instead of NaN; such rows are discarded anyway.
    """
    idx = torch.arange(length, device=device)
    allowed = (idx[None, :] <= idx[:, None])[None]  # (1, L, L)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, :].bool()  # (B, L, L)
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]  # (B|1, 1, L, L)


# Checkpoint key prefixes of the text stack, longest first: transformers 5 writes Qwen3-VL as
# `model.language_model.*` and Qwen2.5-VL in its original layout `model.*` (reverted on save); the
# doubled form is what transformers 5.10-5.23 wrote by mistake (transformers#45534).
_TEXT_PREFIXES = ("model.language_model.model.", "model.language_model.", "language_model.model.",
                  "language_model.", "model.")
_DROPPED_PREFIXES = ("lm_head.", "visual.", "model.visual.")


def sanitize(name: str, tensor: Tensor):
    """Map a VL checkpoint key to TextEncoder's; vision tower and lm_head keys are dropped."""
    if name.startswith(_DROPPED_PREFIXES):
        return ()
    for prefix in _TEXT_PREFIXES:
        if name.startswith(prefix):
            return ((name[len(prefix):], tensor),)
    return ((name, tensor),)


def load_text_encoder(folder, final_norm: bool | None = None, dtype: torch.dtype = torch.float32) -> TextEncoder:
    """Build the text encoder from a diffusers ``text_encoder/`` folder (config.json + safetensors).

    ``final_norm`` None reads the encoder the way its Qwen-Image family does (see the module docstring).
    """
    cfg = TextEncoderConfig.from_transformers(read_json(Path(folder) / "config.json"), final_norm=final_norm)
    return load_component(lambda: TextEncoder(cfg), Path(folder), sanitize, dtype=dtype)
