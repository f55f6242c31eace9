"""Rotary tables and the attention bias of Qwen-Image 2.1's joint [text, image] sequence, in NumPy.

NumPy only, no torch: the torch-free device runtime builds the same inputs the exported transformer was
traced with. Tables come out in the interleaved-pair layout :func:`qwen_edge.ops.apply_rope` expects:
column i of ``cos``/``sin`` rotates the pair (x[2i], x[2i+1]).

MSRoPE (as diffusers' ``QwenImage21Rope``): text token i sits at position i on all three axes (frame,
height, width); the image block freezes the frame axis at the position right after the text and lays its
tokens on a height/width grid centred on zero. Text may be right-padded to a fixed ``text_pad_len`` (static
shapes at the edge): pad tokens are masked out as keys, and image positions follow the REAL text length, so
a padded prompt gives exactly the result of the unpadded one.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError

# Additive bias for a forbidden (query, key) pair. Finite in fp16 too, and exp() of it underflows to an exact
# 0 in fp32, so masked keys contribute nothing; a finite value also keeps rows free of inf - inf NaNs.
MASKED = -65504.0


def _pad_len(text_len: int, text_pad_len: int | None) -> int:
    """Check the text lengths; the padded length defaults to the real one."""
    pad = text_len if text_pad_len is None else text_pad_len
    if text_len < 1:
        raise InputError(f"text_len must be >= 1 (every query needs a key to attend to), got {text_len}")
    if pad < text_len:
        raise InputError(f"text_pad_len {pad} is shorter than text_len {text_len}")
    return int(pad)


def positions_v2(text_len: int, h: int, w: int, text_pad_len: int | None = None) -> np.ndarray:
    """(frame, height, width) positions of the joint sequence: int64 array of shape (text_pad_len + h*w, 3).

    Pad text tokens keep counting (their positions are never seen: they are masked as keys).
    """
    pad = _pad_len(text_len, text_pad_len)
    if h < 1 or w < 1:
        raise InputError(f"image grid must be at least 1x1 latent tokens, got {h}x{w}")
    text = np.repeat(np.arange(pad, dtype=np.int64)[:, None], 3, axis=1)  # (P, 3)
    rows = np.arange(-(h - h // 2), h // 2, dtype=np.int64)  # centred on zero, one more below for odd h
    cols = np.arange(-(w - w // 2), w // 2, dtype=np.int64)
    image = np.stack([np.full(h * w, text_len, dtype=np.int64),
                      np.repeat(rows, w), np.tile(cols, h)], axis=1)  # (h*w, 3), row-major
    return np.concatenate([text, image], axis=0)  # (P + h*w, 3)


def _axis_angles(pos: np.ndarray, dim: int, theta: float) -> np.ndarray:
    """Angles (S, dim/2) for one axis, rounded through float32 step by step as the reference's torch table
    is, so long prompts (positions in the thousands, where one ulp of a frequency is ~1e-4 rad) match it:
    float32 exponent, correctly rounded float32 power (glibc powf; NumPy's float32 power is not), float32
    reciprocal and product."""
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    power = np.power(np.float64(theta), exponent.astype(np.float64)).astype(np.float32)
    inv_freq = np.float32(1.0) / power
    return np.outer(pos.astype(np.float32), inv_freq).astype(np.float32)


def rope_v2(axes_dims, text_len: int, h: int, w: int, theta: float = 10000.0,
            text_pad_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rotary (cos, sin) for the joint [text (padded to text_pad_len), image h x w] sequence.

    axes_dims: rotary dims of the (frame, height, width) axes, each even, summing to the head dim.
    Returns two float32 arrays of shape (text_pad_len + h*w, head_dim/2).
    """
    axes_dims = tuple(int(d) for d in axes_dims)
    if len(axes_dims) != 3 or any(d <= 0 or d % 2 for d in axes_dims):
        raise InputError(f"axes_dims must be three positive even numbers, got {axes_dims}")
    pos = positions_v2(text_len, h, w, text_pad_len)  # (S, 3)
    angles = np.concatenate([_axis_angles(pos[:, a], d, theta) for a, d in enumerate(axes_dims)], axis=1)
    angles = angles.astype(np.float64)  # cos/sin of the float32 angle, correctly rounded back to float32
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def attention_bias_v2(text_len: int, n_image: int, text_pad_len: int | None = None) -> np.ndarray:
    """Additive block-causal bias of shape (1, 1, S, S), S = text_pad_len + n_image, float32.

    0 where a query may attend a key, :data:`MASKED` where not: text queries see the real text keys up to
    themselves (causal), image queries see all real text and every image token, pad text keys are seen by
    nobody. Pad text queries still see the real text, so no row is empty. Without padding the transformer
    applies this same structure itself when given ``mask=None``; the bias is only needed with padding (or
    for an exported graph that takes a fixed mask input).
    """
    pad = _pad_len(text_len, text_pad_len)
    if n_image < 1:
        raise InputError(f"n_image must be >= 1, got {n_image}")
    size = pad + n_image
    q = np.arange(size)[:, None]
    k = np.arange(size)[None, :]
    real_key = (k < text_len) | (k >= pad)
    allowed = real_key & ((k <= q) | (q >= pad))  # text: causal; image: every real key
    return np.where(allowed, 0.0, MASKED).astype(np.float32)[None, None]  # (1, 1, S, S)
