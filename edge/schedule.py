"""The sigma schedule, exactly as the diffusers Qwen-Image pipelines build it. NumPy only.

A pipeline picks a grid (the caller's ``sigmas``, else the checkpoint's ``sample_sigmas``, else
``linspace(1, 1/N, N)``), computes ``mu`` from the number of latent tokens (``calculate_shift``), and
hands both to ``FlowMatchEulerDiscreteScheduler.set_timesteps``, which shifts the grid (exponential or
linear time shift with ``mu``, or a static ``shift``), optionally stretches it so the last sigma equals
``shift_terminal``, and appends the terminal 0. :func:`sigmas` does the same NumPy operations in the
same order and dtypes, so the result is bit-identical to ``scheduler.sigmas``.

No torch import: the torch-free device runtime uses this module.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np

from .errors import InputError

# The scheduler options Qwen-Image checkpoints never use. Supporting them would add code paths nobody
# runs (karras/exponential/beta need other sigma ranges, invert_sigmas is for Mochi, stochastic
# sampling re-noises each step); qwen-edge refuses them instead of silently ignoring them.
_UNSUPPORTED = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                "stochastic_sampling")


@dataclass(frozen=True)
class SchedulerConfig:
    """``FlowMatchEulerDiscreteScheduler``'s options that shape the sigmas (its defaults)."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float | None = 0.5
    max_shift: float | None = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    shift_terminal: float | None = None
    time_shift_type: str = "exponential"

    def __post_init__(self):
        if self.num_train_timesteps < 1:
            raise InputError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")
        if not self.shift > 0:
            raise InputError(f"shift must be > 0, got {self.shift}")
        if self.time_shift_type not in ("exponential", "linear"):
            raise InputError(f"time_shift_type must be 'exponential' or 'linear', got {self.time_shift_type!r}")
        if self.use_dynamic_shifting and (self.base_shift is None or self.max_shift is None):
            raise InputError("use_dynamic_shifting needs numeric base_shift and max_shift")
        if self.max_image_seq_len == self.base_image_seq_len:
            raise InputError("max_image_seq_len must differ from base_image_seq_len")
        if self.shift_terminal and not 0.0 < self.shift_terminal < 1.0:
            raise InputError(f"shift_terminal must be in (0, 1), got {self.shift_terminal}")

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "SchedulerConfig":
        """From a ``scheduler_config.json`` dict. Missing keys take the scheduler's defaults."""
        name = cfg.get("_class_name", "FlowMatchEulerDiscreteScheduler")
        if name != "FlowMatchEulerDiscreteScheduler":
            raise InputError(f"scheduler {name!r} is not supported: qwen-edge samples with FlowMatchEulerDiscrete")
        used = [k for k in _UNSUPPORTED if cfg.get(k)]
        if used:
            raise InputError(f"scheduler options {used} are not supported by qwen-edge (Qwen-Image never sets them)")
        known = {f.name for f in fields(cls)} | set(_UNSUPPORTED)
        unknown = sorted(k for k in cfg if not k.startswith("_") and k not in known)
        if unknown:
            raise InputError(f"unknown scheduler options {unknown}")
        return cls(**{f.name: cfg[f.name] for f in fields(cls) if f.name in cfg})


# Qwen/Qwen-Image's scheduler/scheduler_config.json (v1).
QWEN_IMAGE = SchedulerConfig(use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, max_image_seq_len=8192,
                             shift_terminal=0.02)
# Qwen-Image-Lightning (v1 distilled to 4/8 steps): a fixed shift of 3 at every size, no terminal stretch.
QWEN_IMAGE_LIGHTNING = SchedulerConfig(use_dynamic_shifting=True, base_shift=math.log(3), max_shift=math.log(3),
                                       max_image_seq_len=8192)


@dataclass(frozen=True)
class PipelineDefaults:
    """What a family's diffusers pipeline decides on its own, outside the scheduler config.

    ``shift_fallback`` is what ``calculate_shift`` gets when the scheduler config lacks a key
    (base_image_seq_len, max_image_seq_len, base_shift, max_shift). Both pipelines in diffusers 0.42.1
    read these from the scheduler config with the same fallbacks, equal to the scheduler's own
    defaults, so :meth:`SchedulerConfig.from_diffusers` filling missing keys reproduces them.
    """

    num_steps: int  # __call__'s num_inference_steps default
    cfg_scale: float  # __call__'s true_cfg_scale default (guidance runs only with a negative prompt)
    cfg_rescale: bool  # v1 rescales the guided velocity per token to the conditional norm; 2.1 does not
    shift_fallback: tuple[int, int, float, float] = (256, 4096, 0.5, 1.15)


FAMILY_DEFAULTS: dict[str, PipelineDefaults] = {
    # QwenImage21Pipeline. The Turbo checkpoint also ships `sample_sigmas` in model_index.json (8 steps).
    "qwen-image-2.1": PipelineDefaults(num_steps=40, cfg_scale=1.0, cfg_rescale=False),
    # QwenImagePipeline (v1). Lightning runs it with 4 or 8 steps and cfg_scale 1.
    "qwen-image": PipelineDefaults(num_steps=50, cfg_scale=4.0, cfg_rescale=True),
}


def calculate_shift(config: SchedulerConfig, image_seq_len: int) -> float:
    """``mu``, linear in the number of latent tokens, in float64 and in the pipelines' order of ops."""
    m = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
    b = config.base_shift - m * config.base_image_seq_len
    return image_seq_len * m + b


def sigmas(config: SchedulerConfig, num_steps: int | None, image_seq_len: int,
           custom_sigmas: Sequence[float] | None = None,
           sample_sigmas: Sequence[float] | None = None) -> np.ndarray:
    """The sigmas a Qwen-Image pipeline samples with: float32, shape (N+1,), ending in 0.

    The grid is ``custom_sigmas`` (a call's ``sigmas=``), else ``sample_sigmas`` (the checkpoint's
    ``model_index.json`` grid, Turbo), else ``linspace(1, 1/num_steps, num_steps)``; either grid excludes
    the terminal 0 and, as in diffusers, still goes through the scheduler's shift and terminal stretch.
    As in the pipelines, ``num_steps`` is ignored when a grid is given (the grid's length is the step
    count). ``image_seq_len`` is the number of packed latent tokens (see ``latents.num_tokens``).
    """
    grid = _grid(num_steps, custom_sigmas if custom_sigmas is not None else sample_sigmas)
    if image_seq_len < 1:
        raise InputError(f"image_seq_len must be >= 1, got {image_seq_len}")
    s = np.array(grid).astype(np.float32)  # set_timesteps casts the pipeline's grid to float32 first
    s = _shift(config, s, calculate_shift(config, image_seq_len) if config.use_dynamic_shifting else None)
    if config.shift_terminal:
        s = _stretch_to_terminal(s, config.shift_terminal)
    if not np.all(np.isfinite(s)):
        raise InputError(f"the schedule for {len(grid)} step(s) is undefined (non-finite sigmas): use more steps")
    return np.concatenate([s.astype(np.float32), np.zeros(1, np.float32)])


def model_timestep(sigma: float) -> float:
    """The sigma the transformer actually sees for ``sigma``: the pipelines feed it
    ``timestep / 1000`` with ``timestep = sigma * 1000`` in float32, which can differ from sigma in the
    last bit. Returned as a Python float holding that float32 value exactly.
    """
    t = np.float32(sigma) * np.float32(1000)
    return float(t / np.float32(1000))


def _grid(num_steps: int | None, given: Sequence[float] | None) -> Sequence[float]:
    # Returns the grid as the pipeline hands it over; the scheduler casts it to float32 itself.
    if given is None:
        if not isinstance(num_steps, numbers.Integral) or isinstance(num_steps, bool) or num_steps < 1:
            raise InputError(f"num_steps must be a positive integer, got {num_steps!r}")
        return np.linspace(1.0, 1 / num_steps, num_steps)  # the pipelines' default grid, float64
    g = np.asarray(given, dtype=np.float64)
    if g.ndim != 1 or g.size == 0 or not np.all(np.isfinite(g)):
        raise InputError("sigmas must be a non-empty list of finite numbers")
    if g[-1] == 0:
        raise InputError("leave the terminal 0 out of sigmas: it is appended after shifting")
    if np.any(g <= 0) or np.any(g > 1) or np.any(np.diff(g) >= 0):
        raise InputError(f"sigmas must decrease strictly within (0, 1], got {list(given)}")
    return given


def _shift(config: SchedulerConfig, s: np.ndarray, mu: float | None) -> np.ndarray:
    # Same expressions as the scheduler, so NumPy's promotion rules give the same float32 results.
    if mu is None:
        return config.shift * s / (1 + (config.shift - 1) * s)
    if config.time_shift_type == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / s - 1) ** 1.0)
    return mu / (mu + (1 / s - 1) ** 1.0)


def _stretch_to_terminal(s: np.ndarray, terminal: float) -> np.ndarray:
    # LTX-Video's stretch: scale (1 - sigma) so that the last sigma lands exactly on `terminal`.
    one_minus = 1 - s
    scale = one_minus[-1] / (1 - terminal)
    with np.errstate(divide="ignore", invalid="ignore"):  # a grid ending at 1 gives NaN: sigmas() refuses it
        return 1 - (one_minus / scale)
