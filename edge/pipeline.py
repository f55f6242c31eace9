"""tokenize -> encode text -> sample latents -> decode, over component callables.

This module never imports torch: the torch modules, ONNX Runtime sessions and Core ML models are only
providers of :class:`Components`. Sampling, tokenization and image handling live here once.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from . import latents as lat
from . import prompt as prompt_mod
from . import schedule
from .errors import InputError, NumericalError
from .sampler import Denoiser, sample
from .spec import ModelSpec


class Components(Protocol):
    """What a runtime provides. Arrays are NumPy float32 (ids int64) at this boundary."""

    def encode_text(self, ids: np.ndarray) -> np.ndarray:
        """(1, L) token ids -> (1, L, D) hidden states, template tokens included."""

    def denoiser(self, text: np.ndarray, h: int, w: int) -> Denoiser:
        """Bind one prompt's embeddings (1, L', D) and the latent grid (h, w): a callable (latents, sigma) -> v."""

    def decode(self, z: np.ndarray) -> np.ndarray:
        """(1, C, h, w) normalised latents -> (1, 3 or 4, H, W) image in [-1, 1] (not clamped)."""


@dataclass(frozen=True)
class Request:
    """One generation. ``noise`` overrides ``seed``: (1, C, h, w) float32 in the unpacked layout."""

    prompt: str
    height: int
    width: int
    steps: int = 4
    sigmas: tuple[float, ...] | None = None
    seed: int = 0
    noise: np.ndarray | None = None
    negative_prompt: str | None = None
    cfg_scale: float = 1.0


@dataclass
class Step:
    """Yielded after each sampler step; the last one also carries the decoded image."""

    index: int
    total: int
    sigma: float
    latents: np.ndarray
    image: np.ndarray | None = None  # (H, W, 3) uint8 once decoded


class Pipeline:
    """Text to image over any runtime's components.

    >>> pipe = Pipeline.from_pretrained("path/to/checkpoint")        # torch runtime
    >>> image = pipe("a red circle above a blue square", height=128, width=128)
    """

    #: Largest image (height * width) a request may ask for; checked before anything is allocated.
    max_pixels: int = 4096 * 4096

    def __init__(self, spec: ModelSpec, components: Components):
        self.spec = spec
        self.components = components
        self.tokenizer = prompt_mod.load_tokenizer(spec.tokenizer_dir)
        self.warnings: list[str] = []

    @classmethod
    def from_pretrained(cls, model=None, *, lora: str | None = None, lora_scale: float = 1.0) -> Pipeline:
        """A checkpoint directory or cached repo id (None: the embedded default) on the torch runtime."""
        from .errors import require
        from .spec import default_model

        require("torch", "torch")  # a device install has none: one clear line, not a traceback (issue 9)
        require("safetensors", "torch")
        from qwen_edge.runtimes.torch import TorchComponents

        spec = ModelSpec.from_checkpoint(model if model is not None else default_model())
        return cls(spec, TorchComponents(spec, lora=lora, lora_scale=lora_scale))

    def __call__(self, prompt: str, **kwargs) -> np.ndarray:
        """Generate and return the (H, W, 3) uint8 RGB image."""
        *_, last = self.generate(Request(prompt=prompt, **self._size_defaults(kwargs)))
        return last.image

    def _size_defaults(self, kwargs: dict) -> dict:
        height, width = self.spec.size
        kwargs.setdefault("height", height)
        kwargs.setdefault("width", width)
        return kwargs

    # -- the four moves -------------------------------------------------------------------------------

    def encode(self, text: str, negative: bool = False) -> np.ndarray:
        """Prompt -> (1, L', D) conditioning: template, tokenize, encode, drop the template's prefix. A negative
        prompt may be blank (the pipelines' default negative is " ", the unconditional input of true CFG)."""
        if not negative and (not text or not text.strip()):
            raise InputError("the prompt is empty; say what the image should show")
        ids, drop, truncated = prompt_mod.tokenize(self.tokenizer, self.spec.template, text)
        if truncated:
            msg = f"the prompt was truncated to the text encoder's maximum of {self.spec.template.max_length} tokens"
            self.warnings.append(msg)
            warnings.warn(msg, stacklevel=2)
        hidden = check_finite(self.components.encode_text(ids), "text_encoder", "before step 0")
        return hidden[:, drop:]

    def initial_noise(self, req: Request, shape: tuple[int, ...]) -> np.ndarray:
        if req.noise is None:
            return lat.noise_from_seed(req.seed, shape)
        noise = np.asarray(req.noise)
        if noise.shape != shape:
            raise InputError(f"--noise has shape {noise.shape}, this model and size need {shape} "
                             f"(unpacked (1, C, H/{self.spec.family.vae_factor}, W/{self.spec.family.vae_factor}))")
        if noise.dtype != np.float32:
            raise InputError(f"--noise must be float32, not {noise.dtype}")
        if not np.isfinite(noise).all():
            raise InputError("--noise holds NaN or Inf values")
        return noise

    def sigmas(self, req: Request, image_seq_len: int) -> np.ndarray:
        return schedule.sigmas(self.spec.scheduler, req.steps, image_seq_len, custom_sigmas=req.sigmas,
                               sample_sigmas=self.spec.sample_sigmas)

    def generate(self, req: Request) -> Iterator[Step]:
        """Yield a :class:`Step` after every sampler step; the last one carries the image."""
        fam = self.spec.family
        if self.spec.fixed_size not in (None, (req.height, req.width)):  # a bundle's graphs have static shapes
            h, w = self.spec.fixed_size
            raise InputError(f"this bundle was exported for {h}x{w} (height x width), not {req.height}x{req.width}; "
                             "re-export it at that size")
        shape = lat.latent_shape(fam.name, req.height, req.width, self.spec.z_channels)  # (1, C, h, w)
        h, w = shape[2], shape[3]
        cond = self.encode(req.prompt)
        guided = req.negative_prompt is not None and req.cfg_scale > 1.0
        neg = self.encode(req.negative_prompt, negative=True) if guided else None
        x = lat.pack(fam.name, self.initial_noise(req, shape))  # (1, N, C*p*p)
        grid = (h // fam.patch, w // fam.patch)
        sigmas = self.sigmas(req, x.shape[1])
        denoise = self._bind(cond, grid)
        negative = self._bind(neg, grid) if guided else None
        total = len(sigmas) - 1
        for st in sample(denoise, x, sigmas, negative=negative, cfg_scale=req.cfg_scale,
                         rescale=self.spec.cfg_rescale if guided else None):
            x = st.latents
            if st.index + 1 < total:
                yield Step(st.index, total, float(st.sigma_next), x)
        z = lat.unpack(fam.name, x, h, w)  # (1, C, h, w)
        image = check_finite(self.components.decode(z), "vae_decoder", "after the last step")  # (1, 3|4, H, W)
        yield Step(total - 1, total, 0.0, x, to_uint8(image))


    def _bind(self, text: np.ndarray, grid: tuple[int, int]) -> Denoiser:
        model = self.components.denoiser(text, *grid)
        # The pipelines hand the transformer timestep/1000 with timestep = sigma*1000 in float32.
        return lambda x, sigma: model(x, schedule.model_timestep(sigma))


def check_finite(array: np.ndarray, component: str, when: str) -> np.ndarray:
    """``array`` if every value is finite, else a NumericalError naming the component and when (one pass over the
    output: cheap next to computing it). The transformer is checked per step by the sampler."""
    if not np.isfinite(array).all():
        raise NumericalError(f"{component} produced NaN/Inf ({when}): the model overflows; try float32")
    return array


def check_size(height: int, width: int, max_pixels: int) -> None:
    """Refuse absurd sizes before anything is allocated (the family's grid rules come later)."""
    if height < 1 or width < 1:
        raise InputError(f"height and width must be positive, got {height}x{width}")
    if height * width > max_pixels:
        raise InputError(f"{height}x{width} is larger than the limit of {max_pixels} pixels "
                         "(Pipeline.max_pixels / --max-pixels)")


MAX_STEPS = 1000  # the schedulers' num_train_timesteps: more steps than that is a typo, not a request


def check_steps(steps: int) -> None:
    if not 1 <= steps <= MAX_STEPS:
        raise InputError(f"steps must be between 1 and {MAX_STEPS}, got {steps}")


def to_float_rgb(image: np.ndarray) -> np.ndarray:
    """(1, C, H, W) decoder output in [-1, 1] -> (H, W, 3) float in [0, 1], as diffusers' postprocess does."""
    rgb = image[0, :3].transpose(1, 2, 0)  # (H, W, 3); 2.1 decodes RGBA, images are compared on RGB
    return np.clip(rgb / 2 + 0.5, 0.0, 1.0)


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (to_float_rgb(image) * 255).round().astype(np.uint8)
