"""Qwen-Image v1 transformer: the 20B dual-stream MMDiT, export-friendly.

Same parameter names as diffusers' ``QwenImageTransformer2DModel`` so the checkpoint loads with an
identity key map. What differs from the reference, on purpose:

- RoPE tables are inputs (real cos/sin, built by :mod:`qwen_edge.rope_v1` or :meth:`TransformerV1.rope`),
  not complex tables cached in the module;
- the text mask is an additive bias over the joint [text, image] sequence (:func:`text_attention_bias`);
- the AdaLN modulation, which depends on sigma only and holds about a third of the weights, is a
  separate method (:meth:`TransformerV1.modulation`) whose output :meth:`TransformerV1.forward_with_modulation`
  consumes, so an exporter can precompute it for a fixed schedule and ship the blocks without
  ``img_mod``/``txt_mod``.

Modulation layout, (B, 12 * num_layers + 2, D): block i owns rows 12i..12i+11, the image stream's
(shift1, scale1, gate1, shift2, scale2, gate2) then the text stream's; the last two rows are the
final norm's (scale, shift).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .checkpoint import load_component, read_json
from .errors import InputError
from .rope_v1 import rope_v1

_UNSUPPORTED = ("guidance_embeds", "zero_cond_t", "use_additional_t_cond", "use_layer3d_rope")


@dataclass(frozen=True)
class TransformerV1Config:
    """Shape of a v1 transformer; field names follow diffusers' ``config.json``."""

    patch_size: int = 2
    in_channels: int = 64
    out_channels: int = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    eps: float = 1e-6
    timestep_channels: int = 256

    def __post_init__(self):
        sizes = ("patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim",
                 "num_attention_heads", "joint_attention_dim", "timestep_channels")
        for name in sizes:
            if int(getattr(self, name)) < 1:
                raise InputError(f"TransformerV1Config.{name} must be positive, got {getattr(self, name)}")
        object.__setattr__(self, "axes_dims_rope", tuple(int(d) for d in self.axes_dims_rope))
        if len(self.axes_dims_rope) != 3 or any(d <= 0 or d % 2 for d in self.axes_dims_rope):
            raise InputError(f"axes_dims_rope must be three positive even sizes, got {self.axes_dims_rope}")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise InputError(f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim "
                             f"{self.attention_head_dim}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_features(self) -> int:
        """Features per packed token out: patch_size**2 * out_channels (64 for v1)."""
        return self.patch_size ** 2 * self.out_channels

    @property
    def modulation_rows(self) -> int:
        """Rows of the modulation tensor: 12 per block + 2 for the final norm."""
        return 12 * self.num_layers + 2

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "TransformerV1Config":
        """From a ``transformer/config.json`` dict of ``QwenImageTransformer2DModel``."""
        on = [k for k in _UNSUPPORTED if cfg.get(k)]
        if on:
            raise InputError(f"this v1 transformer config enables {', '.join(on)}: only the plain "
                             "text-to-image Qwen-Image v1 transformer is supported")
        in_channels = int(cfg.get("in_channels", 64))
        return cls(patch_size=int(cfg.get("patch_size", 2)), in_channels=in_channels,
                   out_channels=int(cfg.get("out_channels", 16) or in_channels),
                   num_layers=int(cfg.get("num_layers", 60)),
                   attention_head_dim=int(cfg.get("attention_head_dim", 128)),
                   num_attention_heads=int(cfg.get("num_attention_heads", 24)),
                   joint_attention_dim=int(cfg.get("joint_attention_dim", 3584)),
                   axes_dims_rope=tuple(cfg.get("axes_dims_rope", (16, 56, 56))))


QWEN_IMAGE = TransformerV1Config()


class _GeluTanhProj(nn.Module):
    """Linear then GELU-tanh; a module of its own so its weight is named ``net.0.proj`` as in diffusers."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return ops.gelu_tanh(self.proj(x))


class _FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        # Index 1 is the reference's (inactive) dropout; kept so the output Linear is named net.2.
        self.net = nn.Sequential(_GeluTanhProj(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class _TimestepEmbedder(nn.Module):
    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class _TimeTextEmbed(nn.Module):
    def __init__(self, cfg: TransformerV1Config):
        super().__init__()
        self.channels = cfg.timestep_channels
        self.timestep_embedder = _TimestepEmbedder(cfg.timestep_channels, cfg.inner_dim)

    def forward(self, sigma: Tensor, dtype: torch.dtype) -> Tensor:
        # The sinusoid is taken of sigma * 1000 (the pipeline passes timestep / 1000, the model scales back).
        emb = ops.timestep_embedding(sigma, self.channels, scale=1000.0)  # (B, 256)
        return self.timestep_embedder(emb.to(dtype))  # (B, D)


class _JointAttention(nn.Module):
    """Per-stream Q/K/V with per-head RMSNorm and RoPE, one attention over [text, image]."""

    def __init__(self, cfg: TransformerV1Config):
        super().__init__()
        d, dh = cfg.inner_dim, cfg.attention_head_dim
        self.heads, self.head_dim = cfg.num_attention_heads, dh
        self.to_q, self.to_k, self.to_v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.add_q_proj, self.add_k_proj, self.add_v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.norm_q, self.norm_k = ops.RMSNorm(dh, cfg.eps), ops.RMSNorm(dh, cfg.eps)
        self.norm_added_q, self.norm_added_k = ops.RMSNorm(dh, cfg.eps), ops.RMSNorm(dh, cfg.eps)
        self.to_out = nn.ModuleList([nn.Linear(d, d)])
        self.to_add_out = nn.Linear(d, d)

    def _split(self, x: Tensor, proj: nn.Linear, norm: ops.RMSNorm | None = None) -> Tensor:
        x = proj(x).unflatten(-1, (self.heads, self.head_dim))  # (B, S, H, Dh)
        if norm is not None:
            x = norm(x)
        return x.transpose(1, 2)  # (B, H, S, Dh)

    def _qk(self, x: Tensor, proj: nn.Linear, norm: ops.RMSNorm, cos: Tensor, sin: Tensor) -> Tensor:
        x = self._split(x, proj, norm)  # (B, H, S, Dh)
        return ops.apply_rope(x, cos, sin).to(x.dtype)  # (B, H, S, Dh)

    def forward(self, img: Tensor, txt: Tensor, img_rope: tuple[Tensor, Tensor], txt_rope: tuple[Tensor, Tensor],
                mask: Tensor | None) -> tuple[Tensor, Tensor]:
        q = torch.cat([self._qk(txt, self.add_q_proj, self.norm_added_q, *txt_rope),
                       self._qk(img, self.to_q, self.norm_q, *img_rope)], dim=2)  # (B, H, L+N, Dh)
        k = torch.cat([self._qk(txt, self.add_k_proj, self.norm_added_k, *txt_rope),
                       self._qk(img, self.to_k, self.norm_k, *img_rope)], dim=2)  # (B, H, L+N, Dh)
        v = torch.cat([self._split(txt, self.add_v_proj), self._split(img, self.to_v)], dim=2)  # (B, H, L+N, Dh)
        out = ops.attention(q, k, v, mask)  # (B, L+N, D)
        n_txt = txt.shape[1]
        return self.to_out[0](out[:, n_txt:]), self.to_add_out(out[:, :n_txt])  # (B, N, D), (B, L, D)


def _layer_norm(x: Tensor, eps: float) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


def _clip_fp16(x: Tensor) -> Tensor:
    # The reference clips the residual streams in fp16 to keep inf out of the next block (a dtype test,
    # fixed at trace time, not data-dependent control flow).
    return x.clamp(-65504, 65504) if x.dtype == torch.float16 else x


class _Block(nn.Module):
    """One dual-stream block: AdaLN-modulated joint attention, then a per-stream GELU-tanh MLP."""

    def __init__(self, cfg: TransformerV1Config):
        super().__init__()
        d = cfg.inner_dim
        self.eps = cfg.eps
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.attn = _JointAttention(cfg)
        self.img_mlp = _FeedForward(d)
        self.txt_mlp = _FeedForward(d)

    def modulation(self, temb: Tensor) -> Tensor:
        """temb (B, D) -> (B, 12, D): image then text (shift1, scale1, gate1, shift2, scale2, gate2)."""
        img = self.img_mod(temb).unflatten(-1, (6, -1))  # (B, 6, D)
        txt = self.txt_mod(temb).unflatten(-1, (6, -1))  # (B, 6, D)
        return torch.cat([img, txt], dim=1)  # (B, 12, D)

    def forward(self, img: Tensor, txt: Tensor, mod: Tensor, img_rope: tuple[Tensor, Tensor],
                txt_rope: tuple[Tensor, Tensor], mask: Tensor | None) -> tuple[Tensor, Tensor]:
        im, tm = mod[:, :6], mod[:, 6:]  # (B, 6, D) each
        img_in = _modulate(_layer_norm(img, self.eps), im[:, 0], im[:, 1])  # (B, N, D)
        txt_in = _modulate(_layer_norm(txt, self.eps), tm[:, 0], tm[:, 1])  # (B, L, D)
        img_att, txt_att = self.attn(img_in, txt_in, img_rope, txt_rope, mask)  # (B, N, D), (B, L, D)
        img = img + im[:, 2, None] * img_att  # (B, N, D)
        txt = txt + tm[:, 2, None] * txt_att  # (B, L, D)
        img = img + im[:, 5, None] * self.img_mlp(_modulate(_layer_norm(img, self.eps), im[:, 3], im[:, 4]))
        txt = txt + tm[:, 5, None] * self.txt_mlp(_modulate(_layer_norm(txt, self.eps), tm[:, 3], tm[:, 4]))
        return _clip_fp16(img), _clip_fp16(txt)  # (B, N, D), (B, L, D)


class _NormOut(nn.Module):
    """Final AdaLN (scale, shift) without affine weights; named ``norm_out.linear`` as in diffusers."""

    def __init__(self, cfg: TransformerV1Config):
        super().__init__()
        self.eps = cfg.eps
        self.linear = nn.Linear(cfg.inner_dim, 2 * cfg.inner_dim)

    def modulation(self, temb: Tensor) -> Tensor:
        return self.linear(F.silu(temb)).unflatten(-1, (2, -1))  # (B, 2, D): scale, shift

    def forward(self, x: Tensor, mod: Tensor) -> Tensor:
        return _modulate(_layer_norm(x, self.eps), mod[:, 1], mod[:, 0])  # (B, N, D)


class TransformerV1(nn.Module):
    """The Qwen-Image v1 MMDiT: packed 2x2 latent patches + text hidden states + sigma -> velocity."""

    def __init__(self, cfg: TransformerV1Config):
        super().__init__()
        self.config = cfg
        d = cfg.inner_dim
        self.time_text_embed = _TimeTextEmbed(cfg)
        self.txt_norm = ops.RMSNorm(cfg.joint_attention_dim, cfg.eps)
        self.img_in = nn.Linear(cfg.in_channels, d)
        self.txt_in = nn.Linear(cfg.joint_attention_dim, d)
        self.transformer_blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.num_layers))
        self.norm_out = _NormOut(cfg)
        self.proj_out = nn.Linear(d, cfg.out_features)

    def modulation(self, sigma: Tensor) -> Tensor:
        """sigma (B,) in [0, 1] -> every AdaLN shift/scale/gate, (B, 12 * num_layers + 2, D)."""
        temb = self.time_text_embed(sigma, self.img_in.weight.dtype)  # (B, D)
        rows = [block.modulation(temb) for block in self.transformer_blocks]  # num_layers x (B, 12, D)
        return torch.cat(rows + [self.norm_out.modulation(temb)], dim=1)  # (B, 12 * layers + 2, D)

    def forward(self, latents: Tensor, text: Tensor, sigma: Tensor, img_cos: Tensor, img_sin: Tensor,
                txt_cos: Tensor, txt_sin: Tensor, text_mask: Tensor | None = None) -> Tensor:
        """Velocity for packed latents.

        latents (B, N, in_channels) packed 2x2 patches (channel = c*4 + dy*2 + dx), text (B, L,
        joint_attention_dim) hidden states, sigma (B,), img_cos/img_sin (N, Dh/2), txt_cos/txt_sin
        (L, Dh/2) from :meth:`rope`, text_mask an additive bias (B, 1, 1, L+N) from
        :func:`text_attention_bias` or None (all tokens real). Returns (B, N, out_features).
        """
        mod = self.modulation(sigma)  # (B, 12 * layers + 2, D)
        return self.forward_with_modulation(latents, text, mod, img_cos, img_sin, txt_cos, txt_sin, text_mask)

    def forward_with_modulation(self, latents: Tensor, text: Tensor, mod: Tensor, img_cos: Tensor,
                                img_sin: Tensor, txt_cos: Tensor, txt_sin: Tensor,
                                text_mask: Tensor | None = None) -> Tensor:
        """:meth:`forward` with the sigma-only modulation (from :meth:`modulation`) given as an input."""
        self._check(latents, text, mod)
        img = self.img_in(latents)  # (B, N, D)
        txt = self.txt_in(self.txt_norm(text))  # (B, L, D)
        img_rope, txt_rope = (img_cos, img_sin), (txt_cos, txt_sin)
        for i, block in enumerate(self.transformer_blocks):
            img, txt = block(img, txt, mod[:, 12 * i:12 * i + 12], img_rope, txt_rope, text_mask)  # (B, N, D)
        img = self.norm_out(img, mod[:, -2:])  # (B, N, D)
        return self.proj_out(img)  # (B, N, out_features)

    def rope(self, text_len: int, h: int, w: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """img_cos, img_sin (h*w, Dh/2), txt_cos, txt_sin (text_len, Dh/2) float32 CPU tensors.

        h, w: the packed patch grid (image height/16, width/16); text_len: the (padded) text length.
        """
        tables = rope_v1(text_len, h, w, self.config.axes_dims_rope)
        return tuple(torch.from_numpy(t) for t in tables)

    def _check(self, latents: Tensor, text: Tensor, mod: Tensor) -> None:
        cfg = self.config
        if latents.ndim != 3 or latents.shape[-1] != cfg.in_channels:
            raise InputError(f"latents must be (B, N, {cfg.in_channels}), got {tuple(latents.shape)}")
        if text.ndim != 3 or text.shape[-1] != cfg.joint_attention_dim:
            raise InputError(f"text must be (B, L, {cfg.joint_attention_dim}), got {tuple(text.shape)}")
        if mod.ndim != 3 or mod.shape[1:] != (cfg.modulation_rows, cfg.inner_dim):
            raise InputError(f"modulation must be (B, {cfg.modulation_rows}, {cfg.inner_dim}), "
                             f"got {tuple(mod.shape)}")


def text_attention_bias(text_mask: Tensor, image_len: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """(B, L) text mask (nonzero/True = real token) -> additive bias (B, 1, 1, L + image_len).

    0 where a key may be attended, the dtype's most negative value where not (padding); image tokens
    are always attended, so no query row is ever fully masked.
    """
    if text_mask.ndim != 2:
        raise InputError(f"text_mask must be (B, L), got {tuple(text_mask.shape)}")
    keep = torch.cat([text_mask.bool(), text_mask.new_ones((text_mask.shape[0], image_len), dtype=torch.bool)], 1)
    bias = torch.zeros(keep.shape, dtype=dtype, device=text_mask.device)
    return bias.masked_fill(~keep, torch.finfo(dtype).min)[:, None, None, :]  # (B, 1, 1, L+N)


def sanitize(name: str, tensor: Tensor):
    """diffusers -> qwen-edge key map: identity (the parameter names are the reference's)."""
    yield name, tensor


def load_transformer_v1(folder: str | Path, dtype: torch.dtype = torch.float32) -> TransformerV1:
    """Build from ``folder/config.json`` and stream-load ``folder``'s safetensors strictly."""
    cfg = TransformerV1Config.from_diffusers(read_json(Path(folder) / "config.json"))
    return load_component(lambda: TransformerV1(cfg), Path(folder), sanitize, dtype)
