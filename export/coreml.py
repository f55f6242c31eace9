"""Core ML export: a checkpoint -> a bundle of ML Program packages (``.mlpackage``), compressed with
``coremltools.optimize``, chunked when big, and gated without a Mac by qwen-edge's NumPy MIL interpreter.

Every package goes through the same small shape: real example inputs in its IOSpec layout (recorded from a
torch run of the pipeline) -> a thin wrapper module (:mod:`qwen_edge.export.coreml_chunks`) -> ``torch.export``
-> ``coremltools.convert`` to an ML Program (iOS 17 / macOS 14; iOS 18 / macOS 15 with ``ios18``) -> metadata
and I/O descriptions -> optional weight compression -> parity gate: the saved package executed by
:mod:`qwen_edge.runtimes.mil` against the torch module. A bundle that misses a gate is never written
(:class:`~qwen_edge.errors.NumericalError`); the measured figures go into the manifest.

Precision: ``fp16`` computes in half precision except where Qwen-Image overflows or loses what matters
(:func:`keep_fp32`: the norms' sums of squares, layer norms, and the sinusoidal sigma embedding whose
arguments reach 1000 rad). Compression (``coremltools.optimize.coreml``, nothing hand-written): ``int8``
linear per-channel weights; ``int4`` per-block (64) 4-bit, an iOS 18 feature; ``palette4/6/8`` k-means
palettes; ``mixed`` palettes whose bits per layer come from a sensitivity pass measured with the interpreter.

Names and shapes come from :mod:`qwen_edge.iospec`, folded to Core ML's rank limit of 5
(:func:`qwen_edge.iospec.fold_rank`); token ids travel as int32 (Core ML has no int64 inputs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import qwen_edge
import torch
from qwen_edge import bundle as bundle_mod
from qwen_edge import iospec
from qwen_edge.errors import (
    InputError,
    IntegrityError,
    NumericalError,
    UsageError,
    require,
)
from qwen_edge.runtimes.coreml import fit
from qwen_edge.spec import ModelSpec, default_model
from torch import nn

from . import coreml_chunks as chunks
from .bundle_writer import BundleWriter
from .coreml_chunks import parse_size  # noqa: F401  (the CLI's --chunk-limit)

QUANTS = ("fp32", "fp16", "int8", "int4", "palette4", "palette6", "palette8", "mixed")
COMPONENTS = ("text_encoder", "transformer", "vae_decoder", "vae_encoder")  # what a user selects
DEFAULT_COMPONENTS = ("text_encoder", "transformer", "vae_decoder")
DEFAULT_CHUNK_LIMIT = 1 << 30
MAX_ENUMERATED_SIZES = 128  # Core ML's limit on enumerated shapes per input
INT4_BLOCK = 64  # 4 bits + an fp16 scale per 64 weights: 0.27x fp16 (block 32 measures 0.29x)
# Package bytes per parameter, to plan chunks before anything is converted (scales and palettes are small).
BYTES_PER_PARAM = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5 + 2 / INT4_BLOCK, "palette4": 0.5,
                   "palette6": 0.75, "palette8": 1.0, "mixed": 1.0}
# Parity gates (dB): per package (interpreter vs torch on the same inputs) and end to end (images).
# 4-bit gates are loose on purpose: they catch a broken package (a wrong decompression lands near 0 dB), while a
# random tiny model already loses ~11 dB per component to 4-bit noise; trained models keep far more.
COMPONENT_GATE_DB = {"fp32": 60.0, "fp16": 35.0, "int8": 25.0, "palette8": 25.0, "palette6": 15.0, "mixed": 20.0,
                     "int4": 8.0, "palette4": 8.0}
IMAGE_GATE_DB = {"fp32": 45.0, "fp16": 40.0, "int8": 30.0, "palette8": 30.0, "palette6": 20.0, "mixed": 25.0,
                 "int4": 10.0, "palette4": 10.0}
MIXED_TARGET_DB = 35.0  # what the mixed recipe aims for per component
# What MLModel.save writes beside the model for ExecuTorch's debugger when the program came from torch.export: a map
# from debug handles to MIL ops, outside the package's Manifest.json, never read by Core ML; 8-17 % of the
# embedded default's fp16 packages (compressed programs are saved without it).
DEBUG_FILES = ("executorch_debug_handle_mapping.json",)


# -- precision ----------------------------------------------------------------------------------------------------

_FP32_OPS = frozenset({"pow", "reduce_mean", "reduce_sum", "reduce_sum_square", "reduce_l2_norm", "rsqrt", "sqrt",
                       "layer_norm", "instance_norm", "batch_norm", "sin", "cos", "exp"})
_ELEMENTWISE = frozenset({"add", "sub", "mul", "real_div", "maximum", "minimum", "clip", "square"})
_REDUCTIONS = frozenset({"reduce_mean", "reduce_sum", "reduce_sum_square", "reduce_l2_norm"})


def keep_fp32(op) -> bool:
    """Ops an fp16 program keeps in fp32 (the op_selector of ``FP16ComputePrecision`` is its negation).

    - sums of squares and norms: x^2 overflows fp16 once |x| > 256 and Qwen-Image's activations get far larger;
    - what finishes a reduction (the eps add, the clamp, the division by the norm);
    - the sinusoidal sigma embedding and everything feeding it: its argument reaches 1000 rad, where fp16's
      resolution is 0.5 rad.
    """
    if op.op_type in _FP32_OPS:
        return True
    if op.op_type in _ELEMENTWISE and any(_producer(v) in _REDUCTIONS | {"maximum"} for v in _inputs(op)):
        return True
    return _feeds_sinusoid(op, depth=5)


def _inputs(op):
    for v in op.inputs.values():
        yield from (v if isinstance(v, (list, tuple)) else (v,))


def _producer(var) -> str | None:
    return var.op.op_type if getattr(var, "op", None) is not None else None


def _feeds_sinusoid(op, depth: int) -> bool:
    # Any op within a few hops upstream of a sin/cos: in Qwen-Image that cone is sigma alone (concat with the
    # t = 0 row, unsqueeze, products). A concat left in fp16 rounded sigma 0.7431 to 0.7432: 0.03 rad at 1000x,
    # 33 dB instead of 56 on the transformer's output (found by comparing fp32 and fp16 programs op by op).
    if depth == 0 or op.op_type in ("const", "linear", "matmul", "conv"):
        return False
    for out in op.outputs:
        for child in out.child_ops:
            if child.op_type in ("sin", "cos") or _feeds_sinusoid(child, depth - 1):
                return True
    return False


# -- one package: torch.export -> coremltools.convert -> metadata -------------------------------------------------


def coremltools():
    """coremltools, or a MissingDependencyError naming the ``coreml`` extra."""
    with _quiet():  # on Linux its import logs that the Core ML framework (macOS only) is absent
        return require("coremltools", "coreml")


def export_program(module: nn.Module, args: tuple, dynamic_shapes=None, what: str = "component"):
    """``torch.export`` of ``module`` on ``args``, rewritten into ops coremltools converts faithfully."""
    try:
        with _quiet():
            program = torch.export.export(module.eval(), args, dynamic_shapes=dynamic_shapes)
    except Exception as e:  # noqa: BLE001  (torch raises many types: UserError, GuardOnDataDependentSymNode...)
        raise InputError(f"{what}: torch.export cannot trace the model: {_first_line(e)}") from None
    aten = torch.ops.aten
    program = program.run_decompositions({
        # coremltools has no converter for where(cond, x, scalar)
        aten.where.ScalarOther: lambda c, x, o: aten.where.self(c, x, aten.full.default([], o, dtype=x.dtype)),
        # coremltools turns reciprocal into MIL `inverse`, whose default epsilon of 1e-4 makes 1/1 = 0.9999
        # (found by the MIL interpreter: RoPE frequencies were off by 1e-4); a true division is exact
        aten.reciprocal.default: lambda x: aten.div.Tensor(aten.full.default([], 1.0, dtype=x.dtype), x),
        # coremltools reads gelu's `approximate` from positional arguments only, and torch.export passes it by
        # keyword: GELU-tanh silently became exact GELU (a 5e-4 error, found by the MIL interpreter). Spelled
        # out, coremltools' fuse_gelu_tanh_approximation pass folds it back into one tanh-mode gelu op.
        aten.gelu.default: _gelu,
    })
    for node in list(program.graph.nodes):
        if node.target is aten.alias.default:  # an identity coremltools does not know
            node.replace_all_uses_with(node.args[0])
            program.graph.erase_node(node)

    program.graph_module.recompile()
    _check_convertible(program, what)
    return program


def _gelu(x, approximate: str = "none"):
    aten = torch.ops.aten
    if approximate == "tanh":
        cube = aten.mul.Tensor(aten.pow.Tensor_Scalar(x, 3), 0.044715)
        inner = aten.mul.Tensor(aten.add.Tensor(x, cube), math.sqrt(2 / math.pi))
        return aten.mul.Tensor(aten.mul.Tensor(x, 0.5), aten.add.Tensor(aten.tanh.default(inner), 1.0))
    return aten.mul.Tensor(aten.mul.Tensor(x, 0.5), aten.add.Tensor(aten.erf.default(aten.mul.Tensor(x, math.sqrt(0.5))), 1.0))


def _check_convertible(program, what: str) -> None:
    """Name the first op coremltools cannot convert and the module it came from, before converting."""
    try:
        from coremltools.converters.mil.frontend.torch.torch_op_registry import (
            _TORCH_OPS_REGISTRY,
        )
        from coremltools.converters.mil.frontend.torch.utils import sanitize_op_kind
    except ImportError:  # a future coremltools: conversion itself will still report the op
        return
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        kind = node.target.name() if hasattr(node.target, "name") else getattr(node.target, "__name__", str(node.target))
        if sanitize_op_kind(kind) not in _TORCH_OPS_REGISTRY:
            stack = list(node.meta.get("nn_module_stack", {}).values())
            module = f"{stack[-1][0] or '(top)'} ({stack[-1][1]})" if stack else "the wrapper module"
            raise InputError(f"{what}: coremltools cannot convert the op {kind} from module {module}")


def convert(module: nn.Module, io: iospec.IOSpec, example: dict[str, np.ndarray], *, quant: str = "fp16",
            ios18: bool = False, variants: Sequence[iospec.IOSpec] = ()):
    """Convert ``module`` (forward takes ``io``'s inputs in order) to an ML Program ``MLModel``.

    ``variants``: the same component's IOSpec at other image sizes; inputs whose shapes differ become
    enumerated shapes (``ct.EnumeratedShapes``), the first of them the default.
    """
    ct = coremltools()
    if max(len(t.shape) for t in (*io.inputs, *io.outputs)) > 5:
        raise IntegrityError(f"{io.component}: Core ML tensors stop at rank 5; fold the IOSpec first")
    args = tuple(torch.from_numpy(np.ascontiguousarray(example[t.name])) for t in io.inputs)
    dynamic, shapes = _enumerated(io, variants, ios18)
    if dynamic is not None and _takes_varargs(module):
        dynamic = (dynamic,)  # torch.export matches dynamic shapes to forward's parameters: one *args tuple
    program = export_program(module, args, dynamic, what=io.component)
    inputs = [ct.TensorType(name=t.name, shape=shapes.get(t.name, t.shape),
                            dtype=np.int32 if t.dtype.startswith("int") else np.float32) for t in io.inputs]
    outputs = [ct.TensorType(name=t.name) for t in io.outputs]
    precision = (ct.precision.FLOAT32 if quant == "fp32"
                 else ct.transform.FP16ComputePrecision(op_selector=lambda op: not keep_fp32(op)))
    target = ct.target.iOS18 if ios18 else ct.target.iOS17
    try:
        with _quiet():
            return ct.convert(program, inputs=inputs, outputs=outputs, convert_to="mlprogram",
                              minimum_deployment_target=target, compute_precision=precision, skip_model_load=True)
    except Exception as e:  # noqa: BLE001  (coremltools raises ValueError/NotImplementedError/RuntimeError...)
        raise InputError(f"{io.component}: Core ML conversion failed: {_first_line(e)}") from None


def _enumerated(io: iospec.IOSpec, variants: Sequence[iospec.IOSpec], ios18: bool):
    """torch.export dynamic shapes and Core ML input shapes for the inputs whose sizes vary over ``variants``.

    Every varying axis gets a torch ``Dim``; an axis that is another's plus or times a constant (t + N, 16 h)
    is derived from it, so torch.export sees one symbol per independent size. iOS 18 enumerates every such
    input (``ct.EnumeratedShapes``, what the Neural Engine wants); iOS 17 allows one enumerated input, so the
    others get ``ct.RangeDim`` bounds spanning the same sizes.
    """
    if not variants:
        return None, {}
    ct = coremltools()
    specs = [io, *variants]
    bases: list[tuple[tuple[int, ...], object]] = []
    dynamic, shapes = [], {}
    for i, t in enumerate(io.inputs):
        per = [s.inputs[i].shape for s in specs]
        axes = {}
        for ax in range(len(t.shape)):
            values = tuple(p[ax] for p in per)
            if len(set(values)) > 1:
                axes[ax] = _dim(values, bases, f"{t.name}_{ax}")
        dynamic.append(axes or None)
        if not axes:
            continue
        if ios18 or not shapes:
            unique = list(dict.fromkeys(per))
            shapes[t.name] = ct.EnumeratedShapes(shapes=[list(s) for s in unique], default=list(t.shape))
        else:  # before iOS 18 Core ML enumerates one input; the others get ranges covering the same sizes
            shapes[t.name] = ct.Shape([ct.RangeDim(min(p[a] for p in per), max(p[a] for p in per), t.shape[a])
                                       if a in axes else t.shape[a] for a in range(len(t.shape))])
    return (tuple(dynamic) if shapes else None), shapes


def _takes_varargs(module: nn.Module) -> bool:
    import inspect

    params = inspect.signature(module.forward).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)


def _dim(values: tuple[int, ...], bases: list, name: str):
    from torch.export import Dim

    for base_values, base in bases:
        offsets = {v - b for v, b in zip(values, base_values)}
        if len(offsets) == 1:
            return base + offsets.pop()
        ratios = {v / b for v, b in zip(values, base_values)}
        if len(ratios) == 1 and float(next(iter(ratios))).is_integer():
            return base * int(ratios.pop())
    dim = Dim(name, min=2, max=max(values) * 4)
    bases.append((values, dim))
    return dim


def describe(mlmodel, io: iospec.IOSpec, meta: dict[str, str]) -> None:
    """Fill in model metadata and a description of every input and output (shown by Xcode)."""
    mlmodel.author = "qwen-edge"
    mlmodel.version = qwen_edge.__version__
    mlmodel.short_description = (f"{meta.get('qwen_edge.family', 'Qwen-Image')} {io.component} exported by qwen-edge "
                                 f"({meta.get('qwen_edge.recipe', '')})")
    mlmodel.user_defined_metadata.update({k: str(v) for k, v in meta.items()})
    for t in io.inputs:
        dtype = "int32" if t.dtype.startswith("int") else "float32"
        mlmodel.input_description[t.name] = f"{iospec.describe(t.name)} {list(t.shape)} {dtype}".strip()
    for t in io.outputs:
        mlmodel.output_description[t.name] = f"{iospec.describe(t.name)} {list(t.shape)} float32".strip()


# -- compression (coremltools.optimize.coreml) --------------------------------------------------------------------


def compress(mlmodel, quant: str, *, ios18: bool = False, bits: dict[str, int] | None = None):
    """Compress an fp16 ML Program's weights with ``coremltools.optimize.coreml``.

    ``bits`` (``mixed``): palette bits per weight name (:func:`weight_names`), 16 leaving it fp16; absent
    weights get 8 bits.
    """
    if quant in ("fp32", "fp16"):
        return mlmodel
    cto = require("coremltools.optimize.coreml", "coreml")
    with _quiet():
        if quant == "int8":
            cfg = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel")
            return cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(global_config=cfg))
        if quant == "int4":
            if not ios18:
                raise UsageError("--quant int4 is per-block 4-bit, an iOS 18 / macOS 15 feature: add --ios18 "
                                 "(or use --quant palette4 for iOS 17)")
            return cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(
                global_config=_int4(cto, INT4_BLOCK), op_name_configs=_int4_blocks(cto, mlmodel)))
        if quant.startswith("palette"):
            return cto.palettize_weights(mlmodel, cto.OptimizationConfig(global_config=_palette(cto, int(quant[7:]))))
        if quant == "mixed":  # 16 bits: the weight stays fp16 (None = not compressed)
            per = {name: None if b >= 16 else _palette(cto, b) for name, b in (bits or {}).items()}
            return cto.palettize_weights(mlmodel, cto.OptimizationConfig(global_config=_palette(cto, 8),
                                                                           op_name_configs=per))
    raise UsageError(f"unknown Core ML quantization {quant!r}; choose one of {', '.join(QUANTS)}")


def _int4(cto, block: int):
    return cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                       block_size=block)


def _int4_blocks(cto, mlmodel) -> dict:
    """Smaller blocks for weights whose input axis INT4_BLOCK does not divide (coremltools would leave them fp16
    without a word: the embedded default's 96-wide layers)."""
    out = {}
    for name, meta in _weights(mlmodel).items():
        width = meta.val.shape[1] if meta.val.ndim > 1 else meta.val.shape[0]
        if width % INT4_BLOCK:
            block = next((b for b in (32, 16, 8) if width % b == 0), None)
            out[name] = _int4(cto, block) if block else None
    return out


def _palette(cto, nbits: int):
    return cto.OpPalettizerConfig(mode="kmeans", nbits=nbits, granularity="per_tensor")


def weight_names(mlmodel) -> list[str]:
    """Names of the weights ``coremltools.optimize`` compresses (those above its default size threshold)."""
    return list(_weights(mlmodel))


def mixed_bits(mlmodel, io: iospec.IOSpec, feeds: Sequence[dict], refs: Sequence[dict], work: Path,
               target_db: float = MIXED_TARGET_DB) -> dict[str, int]:
    """Bits per weight (palettes of 4, 6 or 8 bits, or 16: left in fp16) meeting ``target_db`` at the smallest
    size, from our own measurement.

    Sensitivity pass: each weight alone palettized to 4 bits, the package run by the MIL interpreter, the error it
    adds to the output measured. Quantization noise falls 6 dB per bit, so 6 bits adds 1/16 and 8 bits 1/256
    of that error. Greedy allocation: start everything at 4 bits and buy the largest error reduction per added
    byte until the predicted output PSNR meets the target; a run of the result checks the prediction and buys
    more bits if it falls short (errors of several layers do not add up exactly).
    """
    sizes = {n: m.val.size for n, m in _weights(mlmodel).items()}
    names = list(sizes)
    base = _mse(_interpret(mlmodel, io, feeds, work), refs)  # fp16, nothing palettized
    cost4 = {n: max(_mse(_interpret(_palettize_only(mlmodel, n, 4), io, feeds, work), refs) - base, 0.0)
             for n in names}
    peak2 = max(float(np.abs(r).max()) ** 2 for ref in refs for r in ref.values())
    budget = peak2 / 10 ** (target_db / 10)
    bits = {n: 4 for n in names}

    def cost(n: str, b: int) -> float:
        return 0.0 if b == 16 else cost4[n] / 16 ** ((b - 4) / 2)

    def gain(n: str) -> float:  # error removed per byte added by moving weight n to its next level
        b = bits[n]
        return (cost(n, b) - cost(n, _NEXT_BITS[b])) / (sizes[n] * (_NEXT_BITS[b] - b) / 8)

    for _ in range(4):
        while base + sum(cost(n, b) for n, b in bits.items()) > budget and any(b < 16 for b in bits.values()):
            best = max((n for n in bits if bits[n] < 16), key=gain)
            bits[best] = _NEXT_BITS[bits[best]]
        measured = _mse(_interpret(compress(mlmodel, "mixed", bits=bits), io, feeds, work), refs)
        if measured <= budget or all(b == 16 for b in bits.values()):
            break
        budget *= budget / measured  # the prediction was optimistic: aim lower by the miss
    return bits


_NEXT_BITS = {4: 6, 6: 8, 8: 16}  # palette levels; 16 keeps the weight in fp16


def _palettize_only(mlmodel, name: str, nbits: int):
    """Only weight ``name`` palettized (the others stay fp16): one sensitivity probe."""
    cto = require("coremltools.optimize.coreml", "coreml")
    with _quiet():
        return cto.palettize_weights(mlmodel, cto.OptimizationConfig(op_name_configs={name: _palette(cto, nbits)}))


def _weights(mlmodel) -> dict:
    cto = require("coremltools.optimize.coreml", "coreml")
    with _quiet():
        return dict(cto.get_weights_metadata(mlmodel, weight_threshold=2048))


def _interpret(mlmodel, io: iospec.IOSpec, feeds: Sequence[dict], work: Path) -> list[dict[str, np.ndarray]]:
    from qwen_edge.runtimes.mil import Program

    path = Path(tempfile.mkdtemp(dir=work)) / "probe.mlpackage"
    with _quiet():
        mlmodel.save(str(path))
    program = Program.load(path)
    return [program.run(fit(f, io)) for f in feeds]


def _mse(outs: Sequence[dict], refs: Sequence[dict]) -> float:
    return max(float(np.mean((o[k].astype(np.float64) - r[k]) ** 2)) for o, r in zip(outs, refs) for k in r)


# -- parity ---------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def torch_outputs(module: nn.Module, io: iospec.IOSpec, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a wrapper on a (package-layout) feed: outputs by ``io``'s names, float32."""
    args = [torch.from_numpy(np.ascontiguousarray(feed[t.name]).astype(np.int64 if t.dtype.startswith("int")
                                                                        else np.float32)) for t in io.inputs]
    out = module(*args)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return {t.name: o.float().numpy() for t, o in zip(io.outputs, outs)}


def fidelity(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """PSNR (peak = the reference's max |value|) and max error relative to that peak; the exporters' measure."""
    from .onnx import fidelity as measure

    return measure(ref, got)


def package_parity(package: Path, io: iospec.IOSpec, feeds: Sequence[dict], refs: Sequence[dict]) -> dict:
    """Worst-case fidelity of ``package`` run by the MIL interpreter against torch's outputs ``refs``."""
    from qwen_edge.runtimes.mil import Program

    program = Program.load(package)
    worst = {"psnr_db": 200.0, "max_rel_error": 0.0}
    for feed, ref in zip(feeds, refs):
        got = program.run(feed)
        for name, r in ref.items():
            f = fidelity(r, got[name])
            worst = {"psnr_db": min(worst["psnr_db"], f["psnr_db"]),
                     "max_rel_error": max(worst["max_rel_error"], f["max_rel_error"])}
    return {**worst, "samples": len(feeds), "by": "qwen-edge MIL interpreter", "precision": program.precision}


def _gate(what: str, figures: dict, min_db: float) -> None:
    if not figures["psnr_db"] >= min_db:
        raise NumericalError(f"{what}: the Core ML package misses its parity gate against torch: PSNR "
                             f"{figures['psnr_db']:.1f} dB < {min_db:.1f} dB (max relative error "
                             f"{figures['max_rel_error']:.2e}); no bundle was written")


# -- chunks: convert one chunk (also what the benchmark drives) ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Options:
    """How packages are made: quantization, deployment target, chunk size limit, enumerated sizes, gates."""

    quant: str = "fp16"
    ios18: bool = False
    chunk_limit: int = DEFAULT_CHUNK_LIMIT
    sizes: tuple[tuple[int, int], ...] = ()  # (height, width) besides the bundle's own
    min_component_psnr: float | None = None
    mixed_target_db: float = MIXED_TARGET_DB
    ane: bool = False  # 2.1 transformer: per-head attention and 1x1-conv linears (measured on a Mac by the user)

    def __post_init__(self):
        if self.quant not in QUANTS:
            raise UsageError(f"unknown Core ML quantization {self.quant!r}; choose one of {', '.join(QUANTS)}")
        if self.quant == "int4" and not self.ios18:
            raise UsageError("--quant int4 is per-block 4-bit, an iOS 18 / macOS 15 feature: add --ios18 "
                             "(or use --quant palette4 for iOS 17)")
        if self.chunk_limit < 1:
            raise UsageError("--chunk-limit must be positive")

    @property
    def gate_db(self) -> float:
        return self.min_component_psnr if self.min_component_psnr is not None else COMPONENT_GATE_DB[self.quant]


def convert_package(module: nn.Module, io: iospec.IOSpec, feeds: Sequence[dict], path: Path, opts: Options,
                    meta: dict[str, str], variants: Sequence[iospec.IOSpec] = (), work: Path | None = None) -> dict:
    """One package: convert, describe, compress, save to ``path``, gate. ``feeds`` are in ``io``'s layout.
    Returns the fidelity figures (and compression details)."""
    refs = [torch_outputs(module, io, f) for f in feeds]
    mlmodel = convert(module, io, feeds[0], quant=opts.quant, ios18=opts.ios18, variants=variants)
    describe(mlmodel, io, meta)
    details: dict = {}
    if opts.quant == "mixed":
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            bits = mixed_bits(mlmodel, io, feeds, refs, Path(tmp), opts.mixed_target_db)
        details = {"palette_bits": bits, "target_psnr_db": opts.mixed_target_db}
        mlmodel = compress(mlmodel, "mixed", bits=bits)
    else:
        mlmodel = compress(mlmodel, opts.quant, ios18=opts.ios18)
    save_package(mlmodel, path)
    del mlmodel
    figures = package_parity(path, io, feeds, refs)
    _gate(f"{io.component} ({path.name})", figures, opts.gate_db)
    if variants:  # the enumerated sizes run the same program on other shapes: check them too
        others = [_variant_feed(v, feeds[0], i) for i, v in enumerate(variants)]
        sized = package_parity(path, io, others, [torch_outputs(module, v, f) for v, f in zip(variants, others)])
        _gate(f"{io.component} ({path.name}, enumerated sizes)", sized, opts.gate_db)
        figures["enumerated_psnr_db"] = sized["psnr_db"]
    return {**figures, "min_psnr_db": opts.gate_db, **details}


def save_package(mlmodel, path: Path) -> None:
    """``mlmodel.save(path)`` without the debug files coremltools adds next to the model (:data:`DEBUG_FILES`)."""
    with _quiet():
        mlmodel.save(str(path))
    for name in DEBUG_FILES:
        (Path(path) / name).unlink(missing_ok=True)


def _variant_feed(io: iospec.IOSpec, base: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """Inputs at another enumerated size: the real ones where the shape is the same, seeded noise elsewhere."""
    rng = np.random.default_rng(seed)
    return {t.name: base[t.name] if base[t.name].shape == t.shape else rng.standard_normal(t.shape).astype(np.float32)
            for t in io.inputs}


def component_packages(writer_path: Callable[[str], Path], spec: ModelSpec, dims: iospec.Dims, name: str,
                       feeds: Sequence[dict], opts: Options, meta: dict[str, str], work: Path,
                       log: Callable[[str], None]) -> list[dict]:
    """Convert component ``name`` chunk by chunk (one chunk when it fits ``opts.chunk_limit``).

    ``feeds``: the component's real inputs (IOSpec layout). Each chunk is loaded alone, run in torch on its
    inputs (the previous chunk's torch outputs as carry), converted and gated, then freed. Returns the
    manifest's chunk entries (relative file, I/O, block range, figures).
    """
    variants = [dataclasses.replace(dims, height=h, width=w) for h, w in opts.sizes]
    if name not in chunks.CHUNKABLE:
        module = _whole(spec, name)
        io = iospec.fold_rank(iospec.components(dims)[name], 5)
        return [_package(writer_path, f"{name}.mlpackage", module, io, [fit(f, io) for f in feeds], opts, meta,
                         [iospec.fold_rank(iospec.components(v)[name], 5) for v in variants], None, work)]
    src = chunks.source(spec, name, ane=opts.ane)
    ranges = plan(spec, name, opts)
    total = ranges[-1][1]
    if len(ranges) > 1:
        log(f"  {name}: {len(ranges)} chunks of blocks {ranges} (limit {chunks._human(opts.chunk_limit)})")
    state = [dict(f) for f in feeds]
    entries, kv_parts = [], []
    for k, (start, stop) in enumerate(ranges):
        io = chunks.chunk_io(dims, name, start, stop, total)
        module = chunks.load_chunk(src, start, stop)
        rel = f"{name}.mlpackage" if len(ranges) == 1 else f"{name}.{k}.mlpackage"
        chunk_feeds = [fit(s, io) for s in state]
        entries.append(_package(writer_path, rel, module, io, chunk_feeds, opts, meta,
                                [chunks.chunk_io(v, name, start, stop, total) for v in variants], (start, stop), work))
        for s, f in zip(state, chunk_feeds):  # the carry for the next chunk, from torch
            out = torch_outputs(module, io, f)
            if name == "text_kv":
                kv_parts.append(out.pop("text_kv"))
            s.update({iospec.carried(k): v for k, v in out.items()})
        del module
        gc.collect()
    return entries


def plan(spec: ModelSpec, name: str, opts: Options) -> list[tuple[int, int]]:
    """The block ranges of component ``name``'s packages under ``opts.chunk_limit`` (from meta-device sizes)."""
    return chunks.plan(chunks.source(spec, name, ane=opts.ane), BYTES_PER_PARAM[opts.quant], opts.chunk_limit)


def _package(writer_path, rel: str, module: nn.Module, io: iospec.IOSpec, feeds: list[dict], opts: Options,
             meta: dict[str, str], variants: list, blocks: tuple[int, int] | None, work: Path) -> dict:
    figures = convert_package(module, io, feeds, writer_path(rel), opts, meta, variants, work)
    entry = {"file": rel, **io.to_json(), "blocks": list(blocks) if blocks else None, "fidelity": figures}
    if opts.sizes:
        entry["enumerated"] = {t.name: sorted({tuple(v.inputs[i].shape) for v in [io, *variants]})
                               for i, t in enumerate(io.inputs) if len({v.inputs[i].shape for v in [io, *variants]}) > 1}
    return entry


def _whole(spec: ModelSpec, name: str) -> nn.Module:
    family = spec.family.name
    if name == "vae_decoder":
        from qwen_edge.vae_v1 import load_vae_v1_decoder
        from qwen_edge.vae_v2 import load_vae_v2_decoder

        return (load_vae_v2_decoder if family == "qwen-image-2.1" else load_vae_v1_decoder)(spec.component("vae"))
    if name == "vae_encoder":
        from qwen_edge.vae_v1 import load_vae_v1_encoder
        from qwen_edge.vae_v2 import load_vae_v2_encoder

        return (load_vae_v2_encoder if family == "qwen-image-2.1" else load_vae_v1_encoder)(spec.component("vae"))
    raise UsageError(f"unknown component {name!r}")


# -- the whole bundle -----------------------------------------------------------------------------------------------


def parse_sizes(text: str, family: str) -> tuple[tuple[int, int], ...]:
    """'512x512,768x512' -> ((512, 512), (768, 512)) (height x width), checked against the family's grid."""
    sizes = []
    for item in (s.strip() for s in str(text).split(",") if s.strip()):
        try:
            h, w = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise UsageError(f"cannot read the size {item!r}; write HEIGHTxWIDTH, e.g. 512x768") from None
        try:
            iospec.check_size(family, h, w)
        except InputError as e:
            raise InputError(f"Core ML cannot enumerate the size {item}: {e}") from None
        sizes.append((h, w))
    if not sizes:
        raise UsageError("--sizes names no size")
    if len(set(sizes)) > MAX_ENUMERATED_SIZES:
        raise InputError(f"Core ML enumerates at most {MAX_ENUMERATED_SIZES} shapes per input, --sizes gives {len(sizes)}")
    return tuple(dict.fromkeys(sizes))


def export_coreml(out: str | Path, model=None, *, quant: str = "fp16", height: int | None = None,
                  width: int | None = None, sizes: Sequence[tuple[int, int]] = (), text_len: int = 256,
                  steps: int = 4, components: Sequence[str] = DEFAULT_COMPONENTS, ios18: bool = False,
                  chunk_limit: int = DEFAULT_CHUNK_LIMIT, ane: bool = False,
                  prompts: Sequence[str] | None = None, seed: int = 0,
                  min_component_psnr: float | None = None, min_image_psnr: float | None = None,
                  log: Callable[[str], None] | None = None) -> bundle_mod.Manifest:
    """Export checkpoint ``model`` (directory or cached repo id; None: the embedded default) to a Core ML bundle
    at ``out``, atomically. Returns the manifest written.

    ``quant``: one of :data:`QUANTS`. ``height``/``width``: the bundle's size; ``sizes``: more (height, width)
    the packages accept through enumerated shapes. ``ios18``: minimum deployment iOS 18 / macOS 15 (needed by
    ``int4``). ``chunk_limit``: package size limit in bytes; bigger components are split at block boundaries.
    ``ane``: the 2.1 transformer's Neural Engine-friendly variant (per-head attention, 1x1-conv linears).
    ``prompts``/``seed``/``steps``: the torch sample run whose real inputs drive the parity gates.
    """
    from . import (
        onnx as onnx_export,  # the bundle pieces every target shares (sample run, tokenizer, manifest)
    )

    log = log or (lambda msg: None)
    opts = Options(quant=quant, ios18=ios18, chunk_limit=chunk_limit, min_component_psnr=min_component_psnr, ane=ane)
    coremltools()
    selected = _check_components(components, steps)
    spec = ModelSpec.from_checkpoint(model if model is not None else default_model())
    height, width = height or spec.default_size, width or spec.default_size
    dims = iospec.dims_from_checkpoint(spec, height, width, text_len)
    opts = dataclasses.replace(opts, sizes=tuple(s for s in sizes if s != (height, width)))
    for name in selected:  # fail fast: a chunk limit below one block is known before any weight is read
        if name in chunks.CHUNKABLE:
            plan(spec, name, opts)
    spec = dataclasses.replace(spec, template=dataclasses.replace(spec.template, max_length=text_len))
    prompts = tuple(prompts or (onnx_export.SAMPLE_PROMPT,))
    feeds, reference, rope, pad_id = _sample_inputs(spec, dims, prompts, steps, seed, log)
    meta = {"qwen_edge.family": dims.family, "qwen_edge.version": qwen_edge.__version__, "qwen_edge.recipe": quant}
    with BundleWriter(out) as writer, tempfile.TemporaryDirectory(dir=writer.root.parent,
                                                                  prefix=f".{writer.out.name}.work.") as work:
        entries = {}
        for name in selected:
            log(f"converting {name} ({quant}{', iOS 18' if ios18 else ''})")
            parts = component_packages(writer.path, spec, dims, name, feeds[name], opts,
                                       {**meta, "qwen_edge.component": name}, Path(work), log)
            entries[name] = _entry(writer, name, iospec.components(dims)[name], parts, quant)
            log(f"  {name}: {entries[name].fidelity['psnr_db']:.1f} dB vs torch (worst package)")
        if ios18:  # one package per text_kv/transformer pair: their common weights once (needs iOS 18)
            from .coreml_share import share_blocks

            entries = share_blocks(writer.root, entries, Path(work), log)
        manifest = onnx_export._manifest(spec, model, dims, rope, "coreml", quant, steps, entries,
                                         onnx_export._tokenizer(writer, spec, pad_id))
        manifest = dataclasses.replace(manifest, created_by=_versions(),
                                       quant={"recipe": quant, "ios18": ios18, "chunk_limit": chunk_limit,
                                              "ane": ane, "sizes": [[height, width], *map(list, opts.sizes)]})
        manifest = _image_gate(writer, manifest, reference, prompts, seed, steps, quant, min_image_psnr, log)
        writer.commit(manifest)
    log(f"wrote {writer.out}")
    return manifest


def _sample_inputs(spec: ModelSpec, dims: iospec.Dims, prompts: Sequence[str], steps: int, seed: int,
                   log: Callable[[str], None]):
    """The gates' inputs: (feeds per component, torch's images or None, rope, pad id).

    Normally the torch fp32 pipeline runs on ``prompts`` and every component's real inputs are recorded. A model
    whose fp32 weights would not fit in half the free memory (a 7B transformer on a 24 GB machine: converting it
    chunk by chunk is the point) gets seeded synthetic inputs instead, the same shapes with real token ids,
    rotary tables and biases; each chunk is still gated against its own torch chunk, but there is no end-to-end
    image gate.
    """
    from . import onnx as onnx_export

    pad_id = onnx_export._pad_id(spec)
    with torch.device("meta"):  # sizes from the configs alone
        transformer = chunks.source(spec, "transformer").build()
        encoder = chunks.source(spec, "text_encoder").build()
    rope = onnx_export._rope(transformer)
    need = 4 * (chunks.count_params(transformer) + chunks.count_params(encoder))  # fp32 bytes
    if need < _available_memory() / 2:
        from qwen_edge.runtimes.torch import TorchComponents

        log(f"sample run: {len(prompts)} prompt(s), {steps} steps at {dims.height}x{dims.width}")
        torch_components = TorchComponents(spec)
        feeds, reference = onnx_export.sample_run(spec, torch_components, dims, rope, pad_id, prompts, steps, seed)
        del torch_components
        gc.collect()
        return feeds, reference, rope, pad_id
    log(f"the torch pipeline needs ~{need / 2**30:.0f} GB in fp32, more than half the free memory: gating each "
        "package on synthetic inputs, without an end-to-end image gate")
    return _synthetic_feeds(spec, dims, rope, pad_id, prompts[0], seed), None, rope, pad_id


def _synthetic_feeds(spec: ModelSpec, dims: iospec.Dims, rope: dict, pad_id: int, prompt: str, seed: int) -> dict:
    from qwen_edge import prompt as prompt_mod
    from qwen_edge.runtimes.onnx import Feeds

    rng = np.random.default_rng(seed)
    feeds = Feeds(dims, rope, pad_id)
    ids, drop, _ = prompt_mod.tokenize(prompt_mod.load_tokenizer(spec.tokenizer_dir), spec.template, prompt)
    n = min(ids.shape[1] - drop, dims.text_len)
    kv_feed, fixed = feeds.prompt(rng.standard_normal((1, n, dims.text_hidden)).astype(np.float32))
    if kv_feed is not None:
        fixed["text_kv"] = rng.standard_normal(iospec.text_kv(dims).outputs[0].shape).astype(np.float32)
    latents = rng.standard_normal((1, dims.tokens, dims.token_channels)).astype(np.float32)
    h, w = dims.height // spec.family.vae_factor, dims.width // spec.family.vae_factor
    return {"text_encoder": [feeds.text_encoder(ids[:, :drop + dims.text_len])], "text_kv": [kv_feed],
            "transformer": [Feeds.step(fixed, latents, 0.75)],
            "vae_decoder": [{"latents": rng.standard_normal((1, dims.z_channels, h, w)).astype(np.float32)}],
            "vae_encoder": [{"image": rng.uniform(-1, 1, (1, dims.encoder_channels, dims.height, dims.width))
                             .astype(np.float32)}]}


def _available_memory() -> int:
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:  # no psutil: assume the reference run fits
        return 1 << 62


def _check_components(components: Sequence[str], steps: int) -> list[str]:
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown or not components:
        raise UsageError(f"unknown component(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(COMPONENTS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UsageError(f"steps must be a positive integer, got {steps!r}")
    out = []
    for c in COMPONENTS:  # pipeline order; 2.1's transformer brings its text_kv
        if c in components:
            out += ["text_kv", c] if c == "transformer" else [c]
    return out


def _entry(writer: BundleWriter, name: str, io: iospec.IOSpec, parts: list[dict], quant: str) -> bundle_mod.Component:
    """The manifest entry: the component's IOSpec, its packages as chained chunks, every package file hashed."""
    files = {}
    for part in parts:
        root = writer.path(part["file"])
        for f in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = f.relative_to(writer.root).as_posix()
            files[rel] = bundle_mod.sha256_file(f)
    worst = min(parts, key=lambda p: p["fidelity"]["psnr_db"])["fidelity"]
    chain = tuple({**p, "file": f"{p['file']}/Manifest.json"} for p in parts)
    return bundle_mod.Component(name=name, file=chain[0]["file"], io=io, files=files, format="mlpackage",
                                opset=None, recipe=quant, fidelity={k: worst[k] for k in ("psnr_db", "max_rel_error")},
                                quant={}, chunks=chain)


def _versions() -> dict:
    return {"qwen_edge": qwen_edge.__version__, "torch": torch.__version__.split("+")[0],
            "coremltools": coremltools().__version__}


def _image_gate(writer: BundleWriter, manifest: bundle_mod.Manifest, reference: list[np.ndarray],
                prompts: Sequence[str], seed: int, steps: int, quant: str, min_db: float | None,
                log: Callable[[str], None]) -> bundle_mod.Manifest:
    """Generate with the unpublished bundle (through the MIL interpreter) and compare with torch's images."""
    from qwen_edge.runtimes.coreml import CoreMLComponents, required_components

    from .onnx import _image, image_psnr

    if reference is None or any(c not in manifest.components for c in required_components(manifest.family)):
        return manifest  # no torch images (too big a model) or a partial bundle: nothing to measure end to end
    min_db = IMAGE_GATE_DB[quant] if min_db is None else min_db
    components = CoreMLComponents(bundle_mod.Bundle(writer.root, manifest), backend="interpreter")
    from qwen_edge.pipeline import Pipeline

    pipe = Pipeline(ModelSpec.from_bundle(manifest, writer.root), components)
    worst = min(image_psnr(_image(pipe, p, manifest.dims, steps, seed), ref) for p, ref in zip(prompts, reference))
    log(f"  image: {worst:.1f} dB vs the torch pipeline ({components.backend_name})")
    if not worst >= min_db:
        raise NumericalError(f"the Core ML bundle's image differs from the torch pipeline's on the same noise: PSNR "
                             f"{worst:.1f} dB < {min_db:.1f} dB; no bundle was written")
    fid = {"image_psnr_db": worst, "min_image_psnr_db": min_db, "reference": "torch fp32 pipeline, same noise",
           "by": components.backend_name, "prompts": list(prompts), "seed": seed, "steps": steps,
           "components": {name: dict(c.fidelity) for name, c in manifest.components.items()}}
    return dataclasses.replace(manifest, fidelity=fid)


# -- verify ---------------------------------------------------------------------------------------------------------


def verify_coreml_bundle(bundle, model=None, prompts: Sequence[str] | None = None, seed: int = 0,
                         backend: str = "auto") -> dict:
    """Per-component and end-to-end fidelity of a Core ML bundle against the torch fp32 pipeline of its checkpoint.

    ``bundle``: a directory or loaded :class:`qwen_edge.bundle.Bundle`; ``model``: the checkpoint (default: the
    one the manifest names). Components are compared on the sampler's real inputs (recorded from the torch
    run); images on the same noise. ``backend``: ``"coreml"`` (macOS), ``"interpreter"`` or ``"auto"``.
    Returns ``{"backend", "components": {name: {psnr_db, max_rel_error}}, "image_psnr_db", "prompts", ...}``.
    """
    from qwen_edge.pipeline import Pipeline
    from qwen_edge.runtimes.coreml import CoreMLComponents
    from qwen_edge.runtimes.torch import TorchComponents

    from . import onnx as onnx_export

    b = bundle if isinstance(bundle, bundle_mod.Bundle) else bundle_mod.load(bundle)
    m = b.manifest
    if m.target != "coreml":
        raise InputError(f"{b.root} is a {m.target} bundle, not a Core ML one")
    source = model if model is not None else m.source.get("model")
    spec = ModelSpec.from_checkpoint(default_model() if source in (None, "embedded default") else source)
    spec = dataclasses.replace(spec, template=dataclasses.replace(spec.template, max_length=m.text_len))
    torch_components = TorchComponents(spec)
    prompts = tuple(prompts or m.fidelity.get("prompts") or (onnx_export.SAMPLE_PROMPT,))
    steps = m.sampler.steps
    feeds, reference = onnx_export.sample_run(spec, torch_components, m.dims, m.rope, m.tokenizer.pad_id, prompts,
                                              steps, seed)
    graphs = onnx_export.graphs(spec, torch_components, [c for c in COMPONENTS if c in m.components])
    components = CoreMLComponents(b, backend=backend)
    figures = {}
    for name, comp in m.components.items():
        worst = {"psnr_db": 200.0, "max_rel_error": 0.0}
        for feed in feeds.get(name, [])[:steps]:
            ref = onnx_export.torch_run(graphs[name], comp.io.input_names, feed)
            got = components.run(name, feed)
            for t, r in zip(comp.io.outputs, ref):
                f = fidelity(r, got[t.name])
                worst = {"psnr_db": min(worst["psnr_db"], f["psnr_db"]),
                         "max_rel_error": max(worst["max_rel_error"], f["max_rel_error"])}
        figures[name] = worst
    pipe = Pipeline(ModelSpec.from_bundle(m, b.root), components)
    images = [onnx_export._image(pipe, p, m.dims, steps, seed) for p in prompts]
    return {"backend": components.backend_name, "components": figures, "prompts": list(prompts), "seed": seed,
            "image_psnr_db": min(onnx_export.image_psnr(a, r) for a, r in zip(images, reference))}


# -- small helpers ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet():
    """coremltools and torch.export print progress bars and warnings; the CLI stays quiet."""
    loggers = [logging.getLogger(n) for n in ("coremltools", "torch.export", "torch._export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with open(os.devnull, "w") as devnull, warnings.catch_warnings(), \
                contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
