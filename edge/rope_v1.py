"""Rotary tables for the Qwen-Image v1 joint sequence, in NumPy (no torch: runtimes import this).

v1 (diffusers' ``QwenEmbedRope`` with ``scale_rope=True``) gives every token a 3-axis position
(frame, row, column), each axis owning ``axes_dims[i]`` channels of a head:

- image token (r, c) of an h x w patch grid: ``(0, r - (h - h//2), c - (w - w//2))``, i.e. rows and
  columns centred on zero (for h = 4: -2, -1, 0, 1; for h = 3: -2, -1, 0);
- text token j: ``(p, p, p)`` with ``p = max(h//2, w//2) + j``, starting just past the image's
  largest positive extent. A text padded to a static length gets positions for the padded length:
  the reference uses the padded length too, the padding being masked in attention instead.

Each axis rotates ``dim/2`` interleaved channel pairs at frequencies ``theta**(-2i/dim)``; the tables
are (S, head_dim/2) float32 cos and sin in the layout :func:`qwen_edge.ops.apply_rope` takes. The
angles are formed in float32 as the reference forms them (``float32(pos) * float32(inv_freq)``), so
the tables match its complex ``polar`` tables to the last bit or two, even at large positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import InputError

THETA = 10000.0


def image_positions(h: int, w: int) -> np.ndarray:
    """(h*w, 3) int64 positions of an h x w patch grid, row-major, centred as ``scale_rope`` does."""
    _check_grid(h, w)
    rows = np.arange(h, dtype=np.int64) - (h - h // 2)
    cols = np.arange(w, dtype=np.int64) - (w - w // 2)
    grid = np.zeros((h, w, 3), dtype=np.int64)
    grid[..., 1] = rows[:, None]
    grid[..., 2] = cols[None, :]
    return grid.reshape(h * w, 3)


def text_positions(text_len: int, h: int, w: int) -> np.ndarray:
    """(text_len, 3) int64 positions of the text tokens that go with an h x w patch grid."""
    _check_grid(h, w)
    if text_len < 1:
        raise InputError(f"text length must be at least 1, got {text_len}")
    start = max(h // 2, w // 2)
    pos = np.arange(start, start + text_len, dtype=np.int64)
    return np.repeat(pos[:, None], 3, axis=1)


def inverse_frequencies(dim: int, theta: float = THETA) -> np.ndarray:
    """(dim/2,) float32 ``1 / theta**(2i/dim)``, rounded to float32 at the same steps as the reference."""
    if dim <= 0 or dim % 2:
        raise InputError(f"a rotary axis needs a positive even size, got {dim}")
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)  # float32 division, like torch
    power = np.power(np.float64(theta), exponent.astype(np.float64)).astype(np.float32)
    return (np.float32(1.0) / power).astype(np.float32)


def rope_table(positions: np.ndarray, axes_dims: Sequence[int], theta: float = THETA) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (S, sum(axes_dims)/2) float32 for (S, len(axes_dims)) integer positions."""
    positions = np.asarray(positions)
    if positions.ndim != 2 or positions.shape[1] != len(axes_dims):
        raise InputError(f"positions must be (S, {len(axes_dims)}), got {positions.shape}")
    angles = [np.outer(positions[:, i].astype(np.float32), inverse_frequencies(d, theta)).astype(np.float32)
              for i, d in enumerate(axes_dims)]
    angle = np.concatenate(angles, axis=1).astype(np.float64)  # float32 angles, trig in float64
    return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


def rope_v1(text_len: int, h: int, w: int, axes_dims: Sequence[int] = (16, 56, 56),
            theta: float = THETA) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """img_cos, img_sin (h*w, Dh/2), txt_cos, txt_sin (text_len, Dh/2) for the v1 joint sequence.

    h, w are the packed patch grid (latent height/2, latent width/2: image size / 16); text_len is the
    text length fed to the transformer (the padded length when the text is padded).
    """
    img_cos, img_sin = rope_table(image_positions(h, w), axes_dims, theta)
    txt_cos, txt_sin = rope_table(text_positions(text_len, h, w), axes_dims, theta)
    return img_cos, img_sin, txt_cos, txt_sin


def _check_grid(h: int, w: int) -> None:
    if h < 1 or w < 1:
        raise InputError(f"the patch grid must be at least 1x1, got {h}x{w}")
