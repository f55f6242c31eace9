"""Conformance vectors written into a bundle (``qwen-edge export --test-vectors``); see :mod:`qwen_edge.conform`.

One generation of the unpublished bundle on ONNX Runtime records every intermediate a port must reproduce;
each becomes ``vectors/<name>.npy`` (plus ``vectors/image.png``), listed with its shape, dtype and tolerance in
the manifest's ``vectors`` section and in ``vectors/vectors.json`` (the same listing, paths relative to the
folder, so the folder can travel alone). The torch fp32 pipeline runs on the same noise for the information
``info.torch_psnr_db`` of each float vector.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import numpy as np
from qwen_edge import bundle as bundle_mod
from qwen_edge import conform
from qwen_edge import latents as lat
from qwen_edge.errors import InputError, UsageError
from qwen_edge.image import save_png
from qwen_edge.pipeline import Pipeline
from qwen_edge.runtimes.onnx import OnnxComponents, required_components
from qwen_edge.spec import ModelSpec

from .bundle_writer import BundleWriter

DEFAULT_PROMPT = "a red circle above a blue square on a white background"


def check_request(prompt: str, seed: int) -> None:
    """Refuse an unusable vector prompt or seed before anything is exported."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("the vector prompt is empty; say what the image should show")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"the vector seed must be a non-negative integer, got {seed!r}")


def add_vectors(writer: BundleWriter, manifest: bundle_mod.Manifest, torch_components,
                prompt: str = DEFAULT_PROMPT, seed: int = 0,
                log: Callable[[str], None] | None = None) -> bundle_mod.Manifest:
    """Record the vectors of ``prompt`` and ``seed`` for the bundle being written in ``writer`` (its graphs and
    tokenizer already there) and return ``manifest`` with its ``vectors`` section. ``torch_components``: the
    checkpoint's :class:`qwen_edge.runtimes.torch.TorchComponents`, for the torch reference figures."""
    log = log or (lambda msg: None)
    check_request(prompt, seed)
    missing = [c for c in required_components(manifest.family) if c not in manifest.components]
    if missing:
        raise UsageError(f"--test-vectors needs a bundle that generates; this one lacks {', '.join(missing)}")
    spec = ModelSpec.from_bundle(manifest, writer.root)
    noise = lat.noise_from_seed(seed, tuple(lat.latent_shape(manifest.family, manifest.height, manifest.width,
                                                             manifest.dims.z_channels)))
    steps = manifest.sampler.steps
    bundle_pipe = Pipeline(spec, OnnxComponents(bundle_mod.Bundle(writer.root, manifest), cache=False))
    arrays = conform.record(bundle_pipe, prompt, noise, steps)
    reference = conform.record(Pipeline(spec, torch_components), prompt, noise, steps)
    for note in bundle_pipe.warnings:
        log(f"  vectors: {note}")
    vectors = _write(writer, arrays, reference, conform.tolerances(manifest.recipe))
    files = writer.hashes([f"{conform.FOLDER}/{v.file}" for v in vectors.values()] + [_rel(conform.PNG)])
    import onnxruntime

    vs = conform.VectorSet(
        writer.root / conform.FOLDER, conform.bundle_id(manifest), prompt, seed, vectors,
        {rel.removeprefix(f"{conform.FOLDER}/"): digest for rel, digest in files.items()}, conform.PNG,
        {"steps": steps, "recorded_with": f"this bundle's graphs on onnxruntime {onnxruntime.__version__}, CPU",
         "reference": "info.torch_psnr_db: the torch fp32 pipeline on the same noise vs these vectors"})
    index = _rel(conform.INDEX)
    writer.path(index).write_text(json.dumps(vs.to_json(), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    section = {"index": index, **vs.to_json(f"{conform.FOLDER}/")}
    section["files"] = {**section["files"], **writer.hashes([index])}
    log(f"  vectors: {len(vectors)} arrays for {prompt!r}, seed {seed}; image "
        f"{vectors['image'].info['torch_psnr_db']:.1f} dB vs the torch pipeline")
    return dataclasses.replace(manifest, vectors=section)


def _write(writer: BundleWriter, arrays: dict, reference: dict, tolerances: dict) -> dict[str, conform.Vector]:
    out = {}
    for name, array in arrays.items():
        kind = conform.kind(name)
        file = f"{name}.npy"
        np.save(writer.path(_rel(file)), np.ascontiguousarray(array), allow_pickle=False)
        info = {}
        if kind in ("float", "image") and name in reference:
            info["torch_psnr_db"] = conform.psnr(array, reference[name])
        out[name] = conform.Vector(name, file, tuple(array.shape), str(array.dtype), tolerances[kind], info)
    save_png(arrays["image"], writer.path(_rel(conform.PNG)))
    return out


def _rel(name: str) -> str:
    return f"{conform.FOLDER}/{name}"
