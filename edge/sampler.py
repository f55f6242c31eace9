"""The Euler flow-matching loop over a :class:`Denoiser`. NumPy only.

Every runtime (the torch modules, an ONNX Runtime session, a Core ML model) is wrapped as a
``Denoiser`` and driven by this one loop; runtimes never reimplement it. :func:`sample` yields after
each step so the caller owns progress reporting, previews and memory.

The update is bit-compatible with diffusers' ``FlowMatchEulerDiscreteScheduler.step``
(``x + (sigma_next - sigma) * v`` with the sample upcast to float32 and the result cast back to the
velocity's dtype), and guidance follows the pipelines' true CFG.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Protocol

import numpy as np

from .errors import InputError, NumericalError
from .schedule import model_timestep


class Denoiser(Protocol):
    """A transformer with its conditioning bound: packed latents and a sigma in, a velocity out.

    ``latents``: (B, N, C) packed, float32 (or float16); ``sigma``: a Python float in [0, 1], the value
    the transformer's timestep input receives (the pipelines pass ``timestep / 1000``). Returns the
    velocity, an array of the same shape. NumPy at the boundary keeps the loop torch-free: the torch
    runtime converts in its wrapper, an ONNX session takes and returns arrays as is. Prompt
    embeddings, masks and KV caches live inside the callable; guidance uses a second callable bound
    to the negative prompt.
    """

    def __call__(self, latents: np.ndarray, sigma: float) -> np.ndarray: ...


class Step(NamedTuple):
    """The state after one Euler step: ``latents`` now sit at ``sigma_next``."""

    index: int  # 0-based step number
    sigma: float
    sigma_next: float
    latents: np.ndarray  # (B, N, C) packed


def euler_step(x: np.ndarray, sigma: float, sigma_next: float, v: np.ndarray) -> np.ndarray:
    """One flow-matching Euler step ``x + (sigma_next - sigma) * v``, as the diffusers scheduler does it.

    ``dt`` is computed in float32, then (torch's promotion of a 0-d tensor) cast to ``v``'s dtype for
    the product; the sample is upcast to float32 for the sum; the result is cast back to ``v``'s dtype.
    """
    v = _as_float(v)
    dt = (np.float32(sigma_next) - np.float32(sigma)).astype(v.dtype)
    delta = dt * v  # (B, N, C) in v's dtype
    return (x.astype(np.float32, copy=False) + delta).astype(v.dtype, copy=False)


def true_cfg(cond: np.ndarray, neg: np.ndarray, scale: float, *, rescale: bool) -> np.ndarray:
    """Classifier-free guidance on two velocities: ``neg + scale * (cond - neg)``.

    With ``rescale`` (Qwen-Image v1's pipeline) each token's guided vector is rescaled to the norm of
    its conditional one, which keeps high scales from over-saturating; the 2.1 pipeline does not
    rescale. Norms are taken in float32 so float16 inputs do not overflow.
    """
    comb = neg + float(scale) * (cond - neg)  # (B, N, C)
    if not rescale:
        return comb
    ratio = _token_norm(cond) / _token_norm(comb)  # (B, N, 1) float32
    return comb * ratio.astype(comb.dtype)


def sample(denoiser: Denoiser, noise: np.ndarray, sigmas: np.ndarray, *, negative: Denoiser | None = None,
           cfg_scale: float = 1.0, rescale: bool | None = None, check_finite: bool = True) -> Iterator[Step]:
    """Integrate from ``noise`` (packed, at ``sigmas[0]``) down the schedule, yielding each :class:`Step`.

    Guidance runs as in the pipelines: only with a ``negative`` denoiser and ``cfg_scale > 1`` (a
    negative with a scale <= 1 is not called). With guidance on, ``rescale`` must be given
    (``FAMILY_DEFAULTS[family].cfg_rescale``: True for v1, False for 2.1). ``check_finite`` raises
    :class:`NumericalError` at the first step that produces NaN/Inf (fp16 overflow shows up so).
    The final latents are the last step's ``latents``. Arguments are checked at the call, not at the
    first step.
    """
    s = _check_sigmas(sigmas)
    x = _check_latents(noise)
    negative = negative if _guidance_on(negative, cfg_scale, rescale) else None
    return _steps(denoiser, negative, x, s, cfg_scale, rescale, check_finite)


def _steps(denoiser: Denoiser, negative: Denoiser | None, x: np.ndarray, s: np.ndarray, cfg_scale: float,
           rescale: bool | None, check_finite: bool) -> Iterator[Step]:
    for i in range(len(s) - 1):
        t = model_timestep(s[i])
        v = _velocity(denoiser, x, t)  # (B, N, C)
        if negative is not None:
            v = true_cfg(v, _velocity(negative, x, t), cfg_scale, rescale=rescale)
        x = euler_step(x, s[i], s[i + 1], v)  # (B, N, C) at sigma s[i + 1]
        if check_finite and not np.isfinite(x).all():
            raise NumericalError(f"transformer output made the latents NaN/Inf at step {i} (sigma {s[i]:.6g}): "
                                 "try float32")
        yield Step(i, float(s[i]), float(s[i + 1]), x)


def _guidance_on(negative: Denoiser | None, cfg_scale: float, rescale: bool | None) -> bool:
    if cfg_scale > 1 and negative is None:
        raise InputError(f"cfg_scale {cfg_scale} needs a negative prompt; use cfg_scale 1 to sample without")
    guided = negative is not None and cfg_scale > 1
    if guided and rescale is None:
        raise InputError("guidance needs rescale=True (Qwen-Image v1) or rescale=False (2.1)")
    return guided


def _velocity(denoiser: Denoiser, x: np.ndarray, sigma: float) -> np.ndarray:
    v = np.asarray(denoiser(x, sigma))
    if v.shape != x.shape:
        raise InputError(f"the denoiser returned shape {v.shape} for latents of shape {x.shape}")
    return v


def _check_sigmas(sigmas: np.ndarray) -> np.ndarray:
    s = np.asarray(sigmas, dtype=np.float32)
    if s.ndim != 1 or s.size < 2 or not np.all(np.isfinite(s)):
        raise InputError("sigmas must be a 1-D schedule of at least 2 finite values (see schedule.sigmas)")
    return s


def _check_latents(noise: np.ndarray) -> np.ndarray:
    x = np.asarray(noise)
    if x.ndim != 3:
        raise InputError(f"noise must be packed (B, N, C), got shape {x.shape}")
    return _as_float(x)


def _as_float(a: np.ndarray) -> np.ndarray:
    # float16 stays (an fp16 runtime's dtype); anything else becomes the pipelines' float32.
    return a if a.dtype in (np.float16, np.float32) else a.astype(np.float32)


def _token_norm(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32, copy=False)
    return np.sqrt(np.sum(a * a, axis=-1, keepdims=True))  # (B, N, 1)
