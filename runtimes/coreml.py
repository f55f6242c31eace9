"""The Core ML runtime: a Core ML bundle's ML Program packages as pipeline components.

On macOS the packages run in Core ML itself (``coremltools.models.MLModel.predict``, all compute units: CPU,
GPU and Neural Engine). Everywhere else they run in qwen-edge's NumPy MIL interpreter
(:mod:`qwen_edge.runtimes.mil`), which executes the same programs op by op with Core ML's fp16 rounding and
weight decompression: slow, but it is how a Linux build machine proves an export right. ``backend_name``
says which one ran.

Only provides callables (:class:`qwen_edge.pipeline.Components`) through
:class:`qwen_edge.runtimes.onnx.GraphComponents`, which builds every graph's IOSpec inputs (padding, rotary
tables, biases) in NumPy; this module only runs packages. A component is one package or a chain of chunk
packages (``chunks`` in the manifest): each chunk reads the component's inputs plus the previous chunk's outputs.
Imports no torch.
"""

from __future__ import annotations

import dataclasses
import math
import platform
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from qwen_edge import bundle as bundle_mod
from qwen_edge import iospec
from qwen_edge.errors import InputError, IntegrityError, require

from .onnx import Feed, Feeds, GraphComponents, required_components

BACKENDS = ("auto", "coreml", "interpreter")

__all__ = ["BACKENDS", "CoreMLComponents", "fit", "pipeline", "required_components"]


def fit(feed: Mapping[str, np.ndarray], io: iospec.IOSpec) -> dict[str, np.ndarray]:
    """A feed in IOSpec layout -> the inputs of a package whose I/O is ``io``: the same bytes reshaped where
    Core ML's rank limit folded leading axes, integer inputs as int32 (Core ML has no int64 inputs)."""
    out = {}
    for t in io.inputs:
        if t.name not in feed:
            raise IntegrityError(f"{io.component}: nothing feeds the package input {t.name!r}")
        value = np.asarray(feed[t.name])
        if value.ndim > len(t.shape):  # merge leading axes (fold_rank); other sizes keep their own shape
            cut = value.ndim - len(t.shape) + 1
            value = value.reshape(math.prod(value.shape[:cut]), *value.shape[cut:])
        out[t.name] = np.ascontiguousarray(value, np.int32 if t.dtype.startswith("int") else np.float32)
    return out


class _Interpreted:
    def __init__(self, path: Path, function: str):
        from .mil import Program

        self.program = Program.load(path, function)

    def predict(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.program.run(feed)


class _CoreML:
    def __init__(self, path: Path, compute_units: str, function: str):
        ct = require("coremltools", "coreml")
        try:
            self.model = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit[compute_units.upper()],
                                           function_name=function)
        except Exception as e:  # noqa: BLE001  (Core ML's compile/load errors come as RuntimeError/Exception)
            raise IntegrityError(f"Core ML cannot load {path.parent.name}: {e}".splitlines()[0]) from None

    def predict(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.asarray(v, np.float32) for k, v in self.model.predict(feed).items()}


def _backend(name: str) -> str:
    if name not in BACKENDS:
        raise InputError(f"unknown Core ML backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "coreml" if platform.system() == "Darwin" else "interpreter"
    if name == "coreml" and platform.system() != "Darwin":
        raise InputError("Core ML runs on macOS only; use the interpreter backend here (--backend interpreter)")
    return name


class CoreMLComponents(GraphComponents):
    """A Core ML bundle's components.

    ``bundle``: a directory or a loaded :class:`qwen_edge.bundle.Bundle`. ``backend``: ``"coreml"`` (macOS),
    ``"interpreter"`` (any OS) or ``"auto"`` (Core ML on macOS, else the interpreter). ``verify``: check every
    file's sha256 first. ``compute_units``: Core ML's ``ComputeUnit`` name (all, cpu_only, cpu_and_gpu,
    cpu_and_ne).
    """

    def __init__(self, bundle, backend: str = "auto", verify: bool = True, compute_units: str = "all"):
        self.bundle = bundle if isinstance(bundle, bundle_mod.Bundle) else bundle_mod.load(bundle, verify=verify)
        m = self.bundle.manifest
        if m.target != "coreml":
            raise InputError(f"{self.bundle.root} is a {m.target} bundle; the Core ML runtime reads coreml bundles")
        for name in required_components(m.family):
            self.bundle.component(name)
        super().__init__(m.dims, m.rope, self._run, m.tokenizer.pad_id)
        self.backend = _backend(backend)
        self.compute_units = compute_units
        self.sizes = [tuple(s) for s in m.quant.get("sizes", [[m.height, m.width]])]
        self.models: dict[tuple[str, str], object] = {}

    @property
    def backend_name(self) -> str:
        if self.backend == "coreml":
            return f"Core ML (MLModel.predict, compute units {self.compute_units})"
        return "qwen-edge MIL interpreter (NumPy; Core ML itself needs macOS)"

    def denoiser(self, text: np.ndarray, h: int, w: int):
        self._size_for_grid(h, w)
        return super().denoiser(text, h, w)

    def decode(self, z: np.ndarray) -> np.ndarray:
        fam = self.bundle.manifest.latent
        patch = int(fam.get("patch", 1))
        self._size_for_grid(z.shape[2] // patch, z.shape[3] // patch)
        return super().decode(z)

    def model(self, rel: str, function: str = "main"):
        """Function ``function`` of the package ``rel`` (a chunk's Manifest.json path), opened on first use. iOS 18
        bundles keep 2.1's text_kv as a second function of the transformer's package (shared weights once)."""
        if (rel, function) not in self.models:
            path = self.bundle.path(rel).parent
            self.models[rel, function] = (_CoreML(path, self.compute_units, function) if self.backend == "coreml"
                                          else _Interpreted(path, function))
        return self.models[rel, function]

    def _run(self, name: str, feed: Feed) -> Feed:
        comp = self.bundle.component(name)
        parts = comp.chunks or ({"file": comp.file, **comp.io.to_json()},)
        state, kv = dict(feed), []
        for part in parts:  # chunks in order: each adds its outputs (the carry) to what the next one reads
            io = iospec.IOSpec.from_json(name, part)
            out = self.model(part["file"], part.get("function", "main")).predict(fit(state, io))
            if name == "text_kv":
                kv.append(out.pop("text_kv"))
            state.update({iospec.carried(k): v for k, v in out.items()})  # next_hidden feeds the next chunk's hidden
        if kv:
            state["text_kv"] = np.concatenate(kv, axis=0)
        spec = iospec.components(self.dims)[name]
        return {t.name: np.asarray(state[t.name], np.float32).reshape(t.shape) for t in spec.outputs}

    def _size_for_grid(self, h: int, w: int) -> None:
        """Switch the IOSpec sizes to the enumerated size whose token grid is (h, w)."""
        if (h, w) == self.dims.grid:
            return
        for height, width in self.sizes:
            dims = dataclasses.replace(self.dims, height=height, width=width)
            if dims.grid == (h, w):
                self.dims = dims
                self.feeds = Feeds(dims, self.bundle.manifest.rope, self.bundle.manifest.tokenizer.pad_id)
                return
        raise InputError(f"this Core ML bundle takes the sizes {', '.join(f'{a}x{b}' for a, b in self.sizes)} "
                         f"(height x width); re-export with --sizes to add one")


def pipeline(bundle, backend: str = "auto", verify: bool = True, compute_units: str = "all"):
    """A :class:`qwen_edge.pipeline.Pipeline` generating from a Core ML bundle (arguments as
    :class:`CoreMLComponents`)."""
    from qwen_edge.pipeline import Pipeline
    from qwen_edge.spec import ModelSpec

    components = CoreMLComponents(bundle, backend=backend, verify=verify, compute_units=compute_units)
    b = components.bundle
    spec = ModelSpec.from_bundle(b.manifest, b.root)
    if len(components.sizes) > 1:  # enumerated shapes: the components check the size, not the pipeline
        spec = dataclasses.replace(spec, fixed_size=None)
    return Pipeline(spec, components)
