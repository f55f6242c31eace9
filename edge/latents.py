"""Latent geometry, seeded noise and token packing for both families. NumPy only.

Unpacked latents are (B, C, h, w), h = H / vae_factor and w = W / vae_factor (``qwen_edge.family``).
The transformers take them packed as tokens (B, N, C'):

- Qwen-Image 2.1 (patch 1): token i = latent pixel (i // w, i % w), all C channels: a row-major
  flatten and a transpose, N = h * w, C' = C.
- Qwen-Image v1 (2x2 patches): token = 2x2 latent patch in row-major patch order, packed channel
  ``c * 4 + dy * 2 + dx``, N = (h / 2) * (w / 2), C' = 4 C.

Noise is drawn unpacked and then packed, as the diffusers pipelines do, so packed noise fed to the
diffusers pipelines' ``latents=`` gives their image.
"""

from __future__ import annotations

import numbers

import numpy as np

from .errors import InputError
from .family import family as _family


def latent_shape(family: str, height: int, width: int, z_channels: int,
                 batch: int = 1) -> tuple[int, int, int, int]:
    """The unpacked latent shape (batch, z_channels, h, w) for an image of ``height`` x ``width``.

    Sides that are not multiples of the family's grid (32 px for 2.1, 16 px for v1) raise
    :class:`InputError` naming the nearest valid sizes: qwen-edge refuses where the pipelines floor.
    """
    fam = _family(family)
    for name, side in (("height", height), ("width", width)):
        _check_side(name, side, fam.size_multiple, family)
    if z_channels < 1 or batch < 1:
        raise InputError(f"z_channels and batch must be >= 1, got {z_channels} and {batch}")
    return batch, z_channels, height // fam.vae_factor, width // fam.vae_factor


def num_tokens(family: str, height: int, width: int) -> int:
    """Packed tokens for an image of ``height`` x ``width``: the ``image_seq_len`` of the schedule."""
    _, _, h, w = latent_shape(family, height, width, z_channels=1)
    p = _family(family).patch
    return (h // p) * (w // p)


def pack(family: str, x: np.ndarray) -> np.ndarray:
    """Unpacked (B, C, h, w) latents -> the family's tokens (:func:`pack_v2` or :func:`pack_v1`)."""
    return pack_v1(x) if _family(family).patch == 2 else pack_v2(x)


def unpack(family: str, tokens: np.ndarray, h: int, w: int) -> np.ndarray:
    """The family's tokens -> unpacked (B, C, h, w) latents on an h x w latent grid."""
    return unpack_v1(tokens, h, w) if _family(family).patch == 2 else unpack_v2(tokens, h, w)


def noise_from_seed(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Standard-normal float32 noise every runtime can reproduce bit for bit.

    Exactly ``np.random.Generator(np.random.PCG64(seed)).standard_normal(shape, dtype=np.float32)``:
    PCG64 (128-bit LCG, XSL-RR output) seeded through ``np.random.SeedSequence(seed)``, sampled by
    NumPy's float32 ziggurat (``random_standard_normal_f``, 32-bit draws), filled in C order. A port
    to another platform must reimplement those three pieces. This is not torch's ``randn``: the same
    seed gives a different image than diffusers with ``torch.Generator().manual_seed(seed)``.
    """
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    if any(not isinstance(d, numbers.Integral) or d < 1 for d in shape):
        raise InputError(f"noise shape must be positive integers, got {shape}")
    rng = np.random.Generator(np.random.PCG64(int(seed)))
    return rng.standard_normal(tuple(int(d) for d in shape), dtype=np.float32)


def pack_v2(x: np.ndarray) -> np.ndarray:
    """2.1 tokens: (B, C, h, w) -> (B, h*w, C), row-major over the latent grid."""
    b, c, h, w = _check_4d(x)
    return np.ascontiguousarray(x.reshape(b, c, h * w).transpose(0, 2, 1))  # (B, h*w, C)


def unpack_v2(tokens: np.ndarray, h: int, w: int) -> np.ndarray:
    """Inverse of :func:`pack_v2`: (B, h*w, C) -> (B, C, h, w) for a latent grid of h x w."""
    b, n, c = _check_tokens(tokens, h * w)
    return np.ascontiguousarray(tokens.transpose(0, 2, 1).reshape(b, c, h, w))  # (B, C, h, w)


def pack_v1(x: np.ndarray) -> np.ndarray:
    """v1 tokens: (B, C, h, w) -> (B, (h/2)(w/2), 4C), packed channel c*4 + dy*2 + dx."""
    b, c, h, w = _check_4d(x)
    if h % 2 or w % 2:
        raise InputError(f"v1 latents need an even grid, got {h}x{w}")
    x = x.reshape(b, c, h // 2, 2, w // 2, 2)  # (B, C, h/2, dy, w/2, dx)
    x = x.transpose(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, C, dy, dx)
    return np.ascontiguousarray(x.reshape(b, (h // 2) * (w // 2), c * 4))  # (B, N, 4C)


def unpack_v1(tokens: np.ndarray, h: int, w: int) -> np.ndarray:
    """Inverse of :func:`pack_v1`: (B, (h/2)(w/2), 4C) -> (B, C, h, w) for a latent grid of h x w."""
    if h % 2 or w % 2:
        raise InputError(f"v1 latents need an even grid, got {h}x{w}")
    b, n, c4 = _check_tokens(tokens, (h // 2) * (w // 2))
    if c4 % 4:
        raise InputError(f"v1 tokens need a multiple of 4 channels, got {c4}")
    x = tokens.reshape(b, h // 2, w // 2, c4 // 4, 2, 2)  # (B, h/2, w/2, C, dy, dx)
    x = x.transpose(0, 3, 1, 4, 2, 5)  # (B, C, h/2, dy, w/2, dx)
    return np.ascontiguousarray(x.reshape(b, c4 // 4, h, w))  # (B, C, h, w)


def _check_side(name: str, side: int, multiple: int, family: str) -> None:
    if not isinstance(side, numbers.Integral) or isinstance(side, bool):
        raise InputError(f"{name} must be an integer number of pixels, got {side!r}")
    if side >= multiple and side % multiple == 0:
        return
    lower, upper = side // multiple * multiple, (side // multiple + 1) * multiple
    near = f"{lower} or {upper}" if lower >= multiple else f"{upper}"
    raise InputError(f"{name} {side} is not a positive multiple of {multiple} for {family}: use {near}")


def _check_4d(x: np.ndarray) -> tuple[int, int, int, int]:
    if x.ndim != 4:
        raise InputError(f"latents must be (B, C, h, w), got shape {x.shape}")
    return x.shape


def _check_tokens(tokens: np.ndarray, n: int) -> tuple[int, int, int]:
    if tokens.ndim != 3 or tokens.shape[1] != n:
        raise InputError(f"tokens must be (B, {n}, C) for this grid, got shape {tokens.shape}")
    return tokens.shape
