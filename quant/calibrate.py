"""Calibration feeds recorded from real sampler trajectories.

Static quantization (``w8a16`` for the QNN NPU path, the VAE's static int8 convolutions) and the
``mixed`` recipe's sensitivity analysis need inputs that look like what each component sees when it
generates an image: the transformer's latents at each of the schedule's sigmas, the VAE's final latents.
Random tensors calibrate the wrong ranges (a step-1 latent is mostly noise, a step-4 latent mostly
image). So :func:`record` runs the torch pipeline itself (the real tokenizer, schedule and sampler) over a
calibration prompt set and records every component call.

Nothing is re-implemented here: the recording is the exporter's
(:func:`qwen_edge.export.onnx.sample_run`, a pipeline ``Components`` standing between the pipeline and
:class:`~qwen_edge.runtimes.torch.TorchComponents`), and each call's static-shape inputs are built by the
ONNX runtime's own :class:`qwen_edge.runtimes.onnx.Feeds` (ids padded to ``drop + text_len``, text states
right-padded and masked, rotary tables and biases from :mod:`qwen_edge.rope` / :mod:`qwen_edge.rope_v1`).
So calibration sees exactly the arrays a bundle's graphs receive at run time, named and shaped per
:mod:`qwen_edge.iospec`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from qwen_edge import iospec
from qwen_edge.errors import InputError
from qwen_edge.spec import ModelSpec

Feeds = dict[str, np.ndarray]


def record(torch_components, spec: ModelSpec, prompts: Sequence[str], height: int, width: int, steps: int,
           text_len: int, *, seed: int = 0) -> dict[str, list[Feeds]]:
    """Run the torch pipeline over ``prompts`` and return each component's actual inputs.

    ``torch_components``: a :class:`~qwen_edge.runtimes.torch.TorchComponents` of ``spec``'s checkpoint;
    ``text_len``: the bundle's static text length (longer prompts are cut to it, as the bundle cuts them);
    every prompt starts from the noise of ``seed``. Returns ``{component: [feeds, ...]}``:
    ``text_encoder`` (one feed per prompt), ``text_kv`` (2.1, one per prompt), ``transformer`` (one per
    sampler step and prompt, ``len(prompts) * steps``), ``vae_decoder`` (the final latents) and
    ``vae_encoder`` (the decoded image clipped to [-1, 1]); each feed maps the IOSpec input names to
    arrays of the IOSpec shapes and dtypes.
    """
    from qwen_edge.export.onnx import PAD_TOKEN, sample_run
    from qwen_edge.prompt import load_tokenizer

    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise InputError("calibration needs at least one prompt, and no empty ones")
    dims = iospec.dims_from_checkpoint(spec, height, width, text_len)
    spec = dataclasses.replace(spec, template=dataclasses.replace(spec.template, max_length=text_len))
    pad = load_tokenizer(spec.tokenizer_dir).token_to_id(PAD_TOKEN)
    feeds, _ = sample_run(spec, torch_components, dims, rope_config(torch_components.transformer),
                          0 if pad is None else int(pad), list(prompts), steps, seed)
    return {name: list(f) for name, f in feeds.items() if f}


def rope_config(transformer) -> dict:
    """The rotary settings the runtime's feed builder needs (a bundle manifest's ``rope``)."""
    cfg = transformer.config
    axes = getattr(cfg, "axes_dims", None) or cfg.axes_dims_rope
    return {"axes_dims": [int(a) for a in axes], "theta": float(getattr(cfg, "theta", 10000.0))}


def reader(feeds: Sequence[Feeds]):
    """An ``onnxruntime.quantization.CalibrationDataReader`` over recorded feeds (rewindable)."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

        def rewind(self):
            self._it = iter(feeds)

    return _Reader()
