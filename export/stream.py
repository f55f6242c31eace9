"""Streaming ONNX export of the 2.1 graphs: the fp32 model is never in memory (issue 4, "Scale").

The normal exporter (:mod:`qwen_edge.export.onnx`) loads the torch model, exports it in fp32 and quantizes the
file; for the 7.1B Qwen-Image-2.1 transformer that is 28 GB of fp32 weights, more than the machines the issue
targets hold (the 8B Qwen3-VL text encoder: 32 GB). This path reaches the same graph in three passes, none of which
holds more than one weight (the text encoder's own parts, its embedding table and chunked reference, are in
:mod:`qwen_edge.export.stream_text`):

1. **Trace.** The model is built on the meta device and exported by the same dynamo exporter through the same
   wrapper (:class:`~qwen_edge.export.onnx.TransformerV21Graph`, :class:`~qwen_edge.export.onnx.TextKVGraph`,
   :class:`~qwen_edge.export.onnx.TextEncoderGraph`), then the passes ``export_graph`` runs
   (``ONNXProgram.optimize``, :func:`qwen_edge.export.compact.fold_constant_paths`). Vector parameters (norm
   scales, a few KB) and the few matrices that only meet constants (2.1 text_kv's t = 0 modulation: 85 M
   parameters of 7.1 B, folded into one row) are read before, so the passes fold them exactly as in a normal
   export; every other weight matrix is a data-less graph input meanwhile, so the graph holds its *name* only.
2. **Fold.** What the optimizer does to a weight matrix when it has the data, ``Transpose(W)`` folded into the
   MatMul's constant, is done here by name (:func:`fold_transposes`); the transpose happens when the weight is
   read. For int8, :func:`dynamic_int8` then rewrites the graph as ``quantize_dynamic`` does: ``Gemm`` to
   ``MatMul`` (its ``replace_gemm_with_matmul``) and each MatMul with a weight to its dynamic pattern
   (``DynamicQuantizeLinear``, ``MatMulInteger``, ``Cast``, two ``Mul``; ORT fuses them at load to
   ``DynamicQuantizeMatMul`` / ``MatMulIntegerToFloat``), with its tensor names; an embedding table's ``Gather``
   reads the uint8 table and is followed by a ``DequantizeLinear`` (its ``GatherQuant``); and the int8 recipe's
   per-token activations (:func:`qwen_edge.quant.per_token.per_token`) replace the per-tensor ones.
3. **Stream.** Each weight is read alone from the (sharded, bf16) safetensors, cast to float32, transposed,
   quantized per output channel with ONNX Runtime's own primitives (:func:`quantize_per_channel`; an embedding
   table per tensor) and appended to the external data file by ``onnx.external_data_helper``; its weighted column
   sums (:func:`qwen_edge.quant.per_token.weighted_colsums`, one float per output channel) stay in the graph.

The result is the graph ``export_graph`` + ``qwen_edge.quant.quantize(..., "int8")`` write, computing the same
outputs (tests/test_export_stream.py), so runtime, verify and bench run it unchanged. Its parity gate needs no
fp32 model either: :func:`reference` runs the torch model a chunk of blocks at a time
(:func:`qwen_edge.export.coreml_chunks.load_chunk`). A bundle's VAE decoder (small) is exported normally, on the
latents the streamed graphs sample (:func:`decoder_feeds`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from qwen_edge import iospec
from qwen_edge.checkpoint import read_json, weight_files
from qwen_edge.errors import InputError, IntegrityError, UsageError

from .coreml_chunks import Source, load_chunk, plan

RECIPES = ("fp32", "int8")
GRAPHS = ("text_kv", "transformer")  # the 2.1 "transformer" component: text K/V once per prompt, then one step
STREAMABLE = ("text_encoder", *GRAPHS)
# What ``export_bundle(stream=True)`` writes: text encoder and transformer streamed, the (small) decoder exported
# normally on the latents the streamed graphs sample.
STREAMED_COMPONENTS = ("text_encoder", "transformer", "vae_decoder")
WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Gather": 0}  # where a streamed weight may enter a node
PREFIX = "model."  # the wrappers hold the model as ``self.model``: graph initializer = PREFIX + parameter name
CHUNK_BYTES = 2 << 30  # torch reference: fp32 weights loaded at a time
INLINE_LIMIT = 64 << 20  # a traced graph holding a bigger initializer did not fold what it should have
# Offsets of big tensors in the data file aligned as onnx's own external-data writer does (64 KB, the mmap
# allocation granularity ORT needs to map a tensor instead of copying it).
ALIGN, ALIGN_FROM = 64 << 10, 1 << 20
FLOAT = 1  # onnx.TensorProto.FLOAT

Feed = dict[str, np.ndarray]
Log = Callable[[str], None]


@dataclass(frozen=True)
class Weight:
    """A weight matrix the graph names but does not hold: the checkpoint parameter it is read from, whether it
    enters the graph transposed (a folded ``Transpose``, or a ``Gemm(transB=1)`` turned into a MatMul), and whether
    it is an embedding table a ``Gather`` reads (int8: quantized per tensor, not per channel)."""

    key: str
    transpose: bool = False
    table: bool = False


# -- the checkpoint, one tensor at a time -------------------------------------------------------------------------


def transformer_source(folder: Path) -> Source:
    """The 2.1 transformer of a diffusers ``transformer/`` folder (config.json + safetensors), built on demand."""
    from qwen_edge import transformer_v2 as t2

    folder = Path(folder)
    cfg = t2.TransformerV2Config.from_diffusers(read_json(folder / "config.json"))
    if not cfg.causal_condition:
        raise UsageError("streamed export of 2.1 needs causal_condition=True (the text K/V cache)")
    return Source("transformer", "qwen-image-2.1", lambda: t2.TransformerV2(cfg), folder, t2.sanitize)


class Checkpoint:
    """Where every (sanitized) parameter of ``src`` lives in its safetensors files, from the headers only; tensors
    are then read one at a time, each file opened per read so that its memory map never outlives one tensor."""

    def __init__(self, src: Source):
        from safetensors import safe_open

        self.src = src
        self.where: dict[str, tuple[Path, str]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for f in weight_files(src.folder):
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118  (a safe_open handle, not a dict)
                    meta = torch.empty(handle.get_slice(key).get_shape(), device="meta")
                    for name, t in src.sanitize(key, meta):
                        self.where[name], self.shapes[name] = (f, key), tuple(t.shape)

    def check(self, wanted: dict[str, tuple[int, ...]]) -> None:
        """InputError naming every wanted parameter the checkpoint lacks or holds in another shape."""
        missing = sorted(k for k in wanted if k not in self.shapes)
        wrong = sorted(f"{k} {self.shapes[k]} != {s}" for k, s in wanted.items()
                       if k in self.shapes and self.shapes[k] != s)
        if missing or wrong:
            few = ", ".join((missing + wrong)[:6]) + (" ..." if len(missing) + len(wrong) > 6 else "")
            raise InputError(f"{self.src.folder} does not match the {self.src.family} {self.src.component}: "
                             f"{len(missing)} missing, {len(wrong)} mis-shaped ({few})")

    def read(self, name: str, transpose: bool = False) -> np.ndarray:
        """Parameter ``name`` as float32 NumPy (bf16/fp16 upcast exactly, as the torch loader does); a matrix
        ``transpose``d on the way (torch's blocked copy: ~5x faster than NumPy's for a 4096 x 12288 weight)."""
        from safetensors import safe_open

        f, key = self.where[name]
        with safe_open(str(f), framework="pt") as handle:
            tensor = handle.get_tensor(key)
        tensor = next(t for n, t in self.src.sanitize(key, tensor) if n == name).float()
        return (tensor.t().contiguous() if transpose else tensor).numpy()


# -- 1. trace on the meta device ----------------------------------------------------------------------------------


def wrapper(graph: str, model: torch.nn.Module) -> torch.nn.Module:
    """The exporter's own wrapper of ``graph`` (rank-6 text K/V, sigma input: the ``onnx`` target's graphs)."""
    from .onnx import TextEncoderGraph, TextKVGraph, TransformerV21Graph

    cls = {"text_encoder": TextEncoderGraph, "text_kv": TextKVGraph, "transformer": TransformerV21Graph}[graph]
    return cls(model).eval()


def trace(src: Source, ckpt: Checkpoint, graph: str, io: iospec.IOSpec, opset: int):
    """``graph`` exported from the meta-device model and optimised by the exporter's passes, every weight matrix
    left as a data-less graph input. Returns (the onnx ModelProto without those inputs, {input name: parameter})."""
    from onnx_ir import serde

    from . import compact
    from .onnx import quiet_exporter

    with torch.device("meta"):
        module = wrapper(graph, src.build())
    params = dict(module.named_parameters())
    ckpt.check({n.removeprefix(PREFIX): tuple(p.shape) for n, p in params.items()})  # before the (slow) trace
    args = tuple(torch.empty(t.shape, dtype=getattr(torch, t.dtype), device="meta") for t in io.inputs)
    with quiet_exporter():
        program = torch.onnx.export(module, args, input_names=io.input_names, output_names=io.output_names,
                                    opset_version=opset, dynamo=True, optimize=False, verbose=False)
        leaves = _detach_weights(program.model.graph, params, ckpt)
        program.optimize()  # what export(optimize=True) runs: constant folding, fusions, CSE, names
        compact.fold_constant_paths(program.model)  # what export_graph runs next
    model = serde.serialize_model(program.model)
    _check_inline(model)
    used = {x for n in model.graph.node for x in n.input}
    inputs = [v for v in model.graph.input if v.name not in leaves]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    return model, {name: key for name, key in leaves.items() if name in used}  # text_kv skips the last block's


def _detach_weights(graph, params: dict[str, torch.nn.Parameter], ckpt: Checkpoint) -> dict[str, str]:
    """Give vector parameters and matrices on constant paths their checkpoint data; turn every other matrix into a
    graph input without data. Returns {input name: parameter name}."""
    import onnx_ir as ir

    constant = constant_path_weights(graph, {n for n, p in params.items() if p.ndim >= 2})
    leaves = {}
    for name, value in list(graph.initializers.items()):
        param = params.get(name)
        if param is None:
            if _is_meta(value.const_value):
                raise IntegrityError(f"{name}: a constant of the traced graph has no data (a buffer built on the "
                                     "meta device); the streaming exporter reads parameters only")
        elif param.ndim < 2 or name in constant:  # read now: folded exactly as in a normal export
            value.const_value = ir.tensor(ckpt.read(name.removeprefix(PREFIX)), name=name)
        else:
            graph.initializers.pop(name)
            value.const_value = None
            graph.inputs.append(value)
            leaves[name] = name.removeprefix(PREFIX)
    return leaves


def constant_path_weights(graph, matrices: set[str]) -> set[str]:
    """The weight matrices an (unoptimised ``onnx_ir``) graph combines with constants alone, through any op but a
    lone ``Transpose`` (the per-step weights' own reformatting, which meets an activation next)."""
    const = set(graph.initializers)
    alias: dict[str, str] = {}  # Transpose(W) output -> W
    found = set()
    for node in graph:
        names = _value_inputs(node)
        if node.op_type == "Transpose" and len(names) == 1 and names[0] in matrices:
            alias[node.outputs[0].name] = names[0]
            const.add(node.outputs[0].name)
        elif all(n in const for n in names):
            const.update(v.name for v in node.outputs)
            found.update(alias.get(n, n) for n in names if alias.get(n, n) in matrices)
    return found


def _value_inputs(node) -> list[str]:
    """The inputs whose values (not only dtype or static shape) a node's outputs depend on."""
    if node.op_type == "CastLike":  # the second input gives the dtype: text.new_zeros(1) is a constant
        return [node.inputs[0].name]
    if node.op_type in ("Shape", "Size") and node.inputs[0].shape is not None and node.inputs[0].shape.is_static():
        return []
    return [v.name for v in node.inputs if v is not None]


def _check_inline(model) -> None:
    """The traced graph holds no big tensor: every weight matrix is streamed or was folded into a small constant."""
    for t in model.graph.initializer:
        if len(t.raw_data) > INLINE_LIMIT:
            raise IntegrityError(f"{t.name}: the traced graph holds a {len(t.raw_data) >> 20} MB constant; the "
                                 "streaming exporter only keeps weights it streams or folds into small constants")


def _is_meta(tensor) -> bool:
    raw = getattr(tensor, "raw", None)
    return isinstance(raw, torch.Tensor) and raw.is_meta


# -- 2. fold by name ------------------------------------------------------------------------------------------------


def fold_transposes(graph, leaves: dict[str, str]) -> dict[str, Weight]:
    """The exporter optimizer's fold of ``Transpose(W, perm=[1, 0])`` into the MatMul's constant, by name: the
    Transpose's output becomes the weight, read transposed. Weights a node uses directly (``Gemm``'s B, the table
    of an embedding's ``Gather``) keep their names. Returns {graph tensor name: Weight} in graph order;
    IntegrityError for a weight used any other way."""
    weights, nodes = {}, []
    for node in graph.node:
        if node.op_type == "Transpose" and node.input[0] in leaves and _ints(node, "perm") == [1, 0]:
            weights[node.output[0]] = Weight(leaves[node.input[0]], transpose=True)
            continue
        x = node.input[WEIGHT_INPUT[node.op_type]] if node.op_type in WEIGHT_INPUT else None
        if x in leaves:
            weights[x] = Weight(leaves[x], table=node.op_type == "Gather")
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    _check_uses(graph, {**leaves, **weights}, WEIGHT_INPUT)
    return weights


def dynamic_int8(graph, weights: dict[str, Weight]) -> tuple[dict[str, Weight], set[str]]:
    """``quantize_dynamic(op_types=[MatMul, Gemm, Gather], MatMulConstBOnly, nodes_to_exclude=boundary layers)`` on
    the weights by name: plain Gemms become MatMuls on ``<B>_Transposed``, then every MatMul on a weight but the
    int8 recipe's fp32 boundary layers (:func:`qwen_edge.quant.recipes.boundary_nodes`) becomes ORT's dynamic
    pattern, and every embedding table's Gather reads it quantized (:func:`qwen_edge.export.stream_text.
    dequantized_gathers`). Returns the weights under their new names (a quantized one is written as
    ``<name>_quantized``, ``_scale``, ``_zero_point``) and the names of those that stay float."""
    from qwen_edge.quant.recipes import boundary_nodes

    from .stream_text import dequantized_gathers

    weights = _gemms_as_matmuls(graph, weights)
    kept = set(boundary_nodes(graph, set(weights)))
    kept_weights = {n.input[1] for n in graph.node if n.name in kept}
    nodes, quantized = [], set()
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in weights or node.name in kept:
            nodes.append(node)
            continue
        if node.input[0] not in quantized:
            nodes.append(_dynamic_quantize(node.input[0]))
            quantized.add(node.input[0])
        nodes += _matmul_integer(node)
    del graph.node[:]
    graph.node.extend(nodes)
    dequantized_gathers(graph, {name for name, w in weights.items() if w.table})
    _check_uses(graph, {f"{w}_quantized": None for w in weights if w not in kept_weights},
                {"MatMulInteger": 1, "Gather": 0})
    return weights, kept_weights


def _gemms_as_matmuls(graph, weights: dict[str, Weight]) -> dict[str, Weight]:
    """ORT's ``ONNXModel.replace_gemm_with_matmul`` for Gemms whose B is a weight (alpha = beta = 1, no transA)."""
    from onnx import helper

    out, nodes = dict(weights), []
    for node in graph.node:
        b = node.input[1] if node.op_type == "Gemm" and len(node.input) > 1 else None
        if b not in weights or _float(node, "alpha", 1.0) != 1.0 or _float(node, "beta", 1.0) != 1.0 or \
                _int(node, "transA", 0):
            nodes.append(node)
            continue
        if _int(node, "transB", 0):
            w = weights[b]
            b = f"{b}_Transposed"
            out[b] = dataclasses.replace(w, transpose=not w.transpose)
        bias = len(node.input) > 2 and node.input[2]
        mm_out = node.output[0] + ("_MatMul" if bias else "")
        nodes.append(helper.make_node("MatMul", [node.input[0], b], [mm_out], node.name + "_MatMul"))
        if bias:
            nodes.append(helper.make_node("Add", [mm_out, node.input[2]], list(node.output), node.name + "_Add"))
    del graph.node[:]
    graph.node.extend(nodes)
    used = {x for n in graph.node for x in n.input}
    return {name: w for name, w in out.items() if name in used}


def _dynamic_quantize(x: str):
    """ORT's dynamic uint8 input quantization node (``_get_dynamic_input_quantization_params``, opset > 10)."""
    from onnx import helper

    return helper.make_node("DynamicQuantizeLinear", [x], [f"{x}_quantized", f"{x}_scale", f"{x}_zero_point"],
                            f"{x}_QuantizeLinear")


def _matmul_integer(node) -> list:
    """ORT's ``MatMulInteger`` operator quantizer output for one MatMul: same ops, names and order."""
    from onnx import helper

    x, w, out = node.input[0], node.input[1], node.output[0]
    q, scales = f"{out}_output_quantized", f"{node.name}_quant_scales_mul"
    return [
        helper.make_node("MatMulInteger", [f"{x}_quantized", f"{w}_quantized", f"{x}_zero_point", f"{w}_zero_point"],
                         [q], f"{node.name}_quant"),
        helper.make_node("Cast", [q], [f"{q}_cast_output"], f"{q}_cast", to=FLOAT),
        helper.make_node("Mul", [f"{x}_scale", f"{w}_scale"], [f"{scales}:0"], scales),
        helper.make_node("Mul", [f"{q}_cast_output", f"{scales}:0"], [out], f"{node.name}_quant_output_scale_mul"),
    ]


def _check_uses(graph, names: dict, uses: dict[str, int]) -> None:
    """IntegrityError unless every use of ``names`` is input ``uses[op_type]`` of a node of one of those types."""
    for node in graph.node:
        for i, x in enumerate(node.input):
            if x in names and uses.get(node.op_type) != i:
                allowed = ", ".join(f"input {j} of {op}" for op, j in uses.items())
                raise IntegrityError(f"weight {x} feeds input {i} of a {node.op_type} node ({node.name}); the "
                                     f"streaming exporter handles weights that are {allowed}")


def _ints(node, name: str) -> list[int]:
    return next((list(a.ints) for a in node.attribute if a.name == name), [])


def _int(node, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _float(node, name: str, default: float) -> float:
    return next((a.f for a in node.attribute if a.name == name), default)


# -- 3. stream the weights --------------------------------------------------------------------------------------------


def quantize_per_channel(w: np.ndarray, reduce_range: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(K, N) float32 -> (int8 (K, N), scale (N,) float32, zero point (N,) int8): symmetric int8 per output
    channel, as ``quantize_dynamic(per_channel=True, weight_type=QInt8)`` quantizes a MatMul weight (axis -1).
    ORT's own arithmetic: each channel's scale from ``compute_scale_zp`` on its min/max, the values from
    ``quantize_nparray``, vectorised over the channels instead of its per-channel loop (same elementwise ops)."""
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import (
        compute_scale_zp,
        get_qmin_qmax_for_qType,
        quantize_nparray,
    )

    qmin, qmax = get_qmin_qmax_for_qType(TensorProto.INT8, reduce_range, symmetric=True)
    params = [compute_scale_zp(lo, hi, qmin, qmax, symmetric=True) for lo, hi in zip(w.min(axis=0), w.max(axis=0))]
    zero_point = np.array([z for z, _ in params], np.int8)  # (N,)
    scale = np.array([s for _, s in params], np.float32)  # (N,)
    return quantize_nparray(TensorProto.INT8, w, scale, zero_point), scale, zero_point


def write(model, weights: dict[str, Weight], ckpt: Checkpoint, path: Path, quantized: bool,
          reduce_range: bool = False, log: Log | None = None, keep: set[str] = frozenset()) -> dict:
    """Read, transpose, (quantize: all but ``keep``) and append each weight to ``<path name>.data``, then save
    ``model`` to ``path``. One weight (and its int8 copy) is alive at a time. Returns the facts for the manifest."""
    import onnx

    data = path.with_name(path.name + ".data")
    data.write_bytes(b"")
    for i, (name, w) in enumerate(weights.items()):
        model.graph.initializer.extend(_stream_one(name, w, ckpt, data, quantized and name not in keep,
                                                   reduce_range))
        if log and (i + 1) % 32 == 0:
            log(f"  {i + 1}/{len(weights)} weights streamed")
    onnx.save_model(model, str(path))
    return {"streamed": True, "weights_streamed": len(weights),
            "source": "safetensors, one tensor at a time (qwen_edge.export.stream)"}


def _stream_one(name: str, w: Weight, ckpt: Checkpoint, data: Path, quantized: bool, reduce_range: bool) -> list:
    """One weight's initializers: its data appended to ``data``, int8 (an embedding table: uint8) with its (small)
    scale and zero point."""
    from onnx import numpy_helper

    from .stream_text import quantize_table

    array = ckpt.read(w.key, w.transpose)  # (K, N): what the MatMul multiplies by; a table (vocab, hidden)
    if not quantized:
        return [_external(array, name, data)]
    if w.table:
        q, scale, zero_point = quantize_table(array)
        extra = []
    else:
        from qwen_edge.quant.per_token import weighted_colsums

        q, scale, zero_point = quantize_per_channel(array, reduce_range)
        extra = [numpy_helper.from_array(weighted_colsums(q, scale, zero_point), f"{name}_colsum")]
    return [_external(q, f"{name}_quantized", data), numpy_helper.from_array(scale, f"{name}_scale"),
            numpy_helper.from_array(zero_point, f"{name}_zero_point"), *extra]


def _external(array: np.ndarray, name: str, data: Path):
    """A TensorProto whose bytes are appended to ``data`` (64 KB-aligned when big) instead of held."""
    from onnx import external_data_helper, numpy_helper

    tensor = numpy_helper.from_array(array, name)
    size = data.stat().st_size
    offset = -(-size // ALIGN) * ALIGN if len(tensor.raw_data) >= ALIGN_FROM else None
    external_data_helper.set_external_data(tensor, data.name, offset=offset)
    external_data_helper.save_external_data(tensor, str(data.parent))
    tensor.ClearField("raw_data")
    return tensor


def int8_facts(reduce_range: bool) -> dict:
    """What the int8 recipe's facts say (:func:`qwen_edge.quant.recipes.int8`), for the same graph."""
    from qwen_edge.quant.recipes import Options, int8_facts as recipe_facts

    return {"recipe": "int8", **recipe_facts(Options(reduce_range=reduce_range))}


# -- a whole graph, and the bundle's transformer component ---------------------------------------------------------


def export_streamed(src: Source, graph: str, io: iospec.IOSpec, path: Path, recipe: str, *, opset: int = 21,
                    reduce_range: bool = False, ckpt: Checkpoint | None = None, log: Log | None = None) -> dict:
    """Export ``graph`` ("text_encoder" of a text encoder ``src``; "text_kv" or "transformer" of the 2.1
    transformer) to ``path`` (+ ``path.data``) in ``recipe`` ("fp32" or "int8"), streaming its weights. Returns
    the facts for the manifest."""
    from .onnx import _check_static

    if recipe not in RECIPES:
        raise UsageError(f"the streaming exporter writes {' or '.join(RECIPES)} graphs, not {recipe}")
    if graph not in STREAMABLE:
        raise UsageError(f"the streaming exporter exports {', '.join(STREAMABLE)}, not {graph}")
    ckpt = ckpt or Checkpoint(src)
    model, leaves = trace(src, ckpt, graph, io, opset)
    weights = fold_transposes(model.graph, leaves)
    kept: set[str] = set()
    if recipe == "int8":
        from qwen_edge.quant.per_token import per_token

        weights, kept = dynamic_int8(model.graph, weights)
        per_token(model)  # reads the <W>_colsum initializers write() adds
    if log:
        log(f"  {graph}: traced, {len(weights)} weights to stream")
    facts = write(model, weights, ckpt, path, recipe == "int8", reduce_range, log, keep=kept)
    _check_static(path, io)
    facts = {**facts, "kept_fp32": len(kept)} if kept else facts
    if recipe == "int8" and any(w.table for w in weights.values()):
        facts["embedding_table"] = "uint8 per tensor, asymmetric (quantize_dynamic's Gather), dequantized after it"
    return {**(int8_facts(reduce_range) if recipe == "int8" else {"recipe": "fp32"}), **facts}


def check_request(family: str, target: str, recipe: str, components: Sequence[str], **options) -> None:
    """One-line UsageError for what ``export_bundle(stream=True)`` does not do; ``options``: flags that must be off."""
    if family != "qwen-image-2.1":
        raise UsageError(f"--stream exports qwen-image-2.1 checkpoints; this checkpoint is {family}")
    if target != "onnx":
        raise UsageError(f"--stream writes --target onnx graphs, not {target}")
    if recipe not in RECIPES:
        raise UsageError(f"--stream writes {' or '.join(RECIPES)} graphs (quantized as they stream), not {recipe}")
    if not set(components) <= set(STREAMED_COMPONENTS):
        raise UsageError(f"--stream exports {', '.join(STREAMED_COMPONENTS)}; export "
                         f"{', '.join(c for c in components if c not in STREAMED_COMPONENTS)} without --stream")
    if "vae_decoder" in components and not {"text_encoder", "transformer"} <= set(components):
        raise UsageError("--stream exports vae_decoder only with text_encoder and transformer (its sample latents "
                         "come from their streamed graphs); export it alone without --stream")
    from .onnx import refuse_with

    refuse_with("--stream", **options)


def export_graphs(path_of: Callable[[str], Path], src: Source, dims: iospec.Dims, rope: dict, recipe: str,
                  sigma: float, *, opset: int = 21, log: Log | None = None):
    """Both graphs of the 2.1 transformer streamed to ``path_of("<graph>.onnx")``, one after the other; yields
    (graph, facts, :func:`parity` figures vs the chunked torch model on :func:`gate_feeds`' inputs at ``sigma``)
    after each, so a caller can stop at the first that misses its gate."""
    log = log or (lambda msg: None)
    ckpt = Checkpoint(src)
    io = iospec.components(dims)
    log("torch reference for the parity gates, a chunk of blocks at a time")
    feeds, refs = gate_feeds(src, dims, rope, sigma)
    for graph in GRAPHS:
        log(f"exporting {graph} (streamed)")
        path = path_of(f"{graph}.onnx")
        facts = export_streamed(src, graph, io[graph], path, recipe, opset=opset, ckpt=ckpt, log=log)
        yield graph, facts, parity(path, io[graph], [feeds[graph]], [refs[graph]])


# -- the parity gate without the fp32 model ----------------------------------------------------------------------


@torch.inference_mode()
def reference(src: Source, graph: str, io: iospec.IOSpec, feed: Feed, chunk_bytes: int = CHUNK_BYTES) -> np.ndarray:
    """The torch fp32 output of ``graph`` on ``feed`` (its IOSpec layout), computed a chunk of consecutive blocks
    at a time (:func:`~qwen_edge.export.coreml_chunks.load_chunk`): the memory of one chunk, not of the model."""
    src = dataclasses.replace(src, component=graph)
    ranges = plan(src, 4, chunk_bytes)
    args = [torch.from_numpy(np.ascontiguousarray(feed[n])) for n in io.input_names]
    if graph == "text_kv":
        out = _text_kv_chunks(src, ranges, *args)  # (2 * layers, 1, H, T, Dh)
    else:
        latents, text_kv, *rest = args
        out = _step_chunks(src, ranges, latents, text_kv.flatten(0, 1), *rest)  # the chunks' rank-5 K/V
    return out.reshape(io.outputs[0].shape).float().numpy()


def _text_kv_chunks(src: Source, ranges, text, cos, sin, bias) -> torch.Tensor:
    """:class:`TextKVChunk` chain: each chunk returns its layers' K/V and hands (text hidden, modulation) on."""
    kv, state = [], None
    for start, stop in ranges:
        chunk = load_chunk(src, start, stop)
        out = chunk(text, cos, sin, bias) if state is None else chunk(*state, cos, sin, bias)
        if chunk.last:
            kv.append(out)
        else:
            kv.append(out[0])
            state = tuple(out[1:]) if state is None else (out[1], state[1])  # (hidden, modulation)
    return torch.cat(kv)


def _step_chunks(src: Source, ranges, latents, text_kv, sigma, cos, sin, bias) -> torch.Tensor:
    """:class:`TransformerV2Chunk` chain: the first chunk makes (hidden, modulation, temb), later ones update hidden."""
    state = None
    for start, stop in ranges:
        chunk = load_chunk(src, start, stop)
        first = state is None
        out = chunk(latents, text_kv, sigma, cos, sin, bias) if first else chunk(*state, text_kv, cos, sin, bias)
        if chunk.last:
            return out  # (1, N, C)
        state = tuple(out) if first else (out, *state[1:])
    raise IntegrityError("the chunk plan did not reach the last block")


def gate_feeds(src: Source, dims: iospec.Dims, rope: dict, sigma: float, seed: int = 0,
               chunk_bytes: int = CHUNK_BYTES) -> tuple[dict[str, Feed], dict[str, np.ndarray]]:
    """Sample inputs of both graphs and their torch references: random text states (all ``text_len`` tokens real)
    through the chunked torch text K/V, random latents at ``sigma``. Returns (feeds, reference outputs)."""
    from qwen_edge.runtimes.onnx import Feeds

    rng = np.random.default_rng(seed)
    io = iospec.components(dims)
    kv_feed, fixed = Feeds(dims, rope).prompt(rng.standard_normal((1, dims.text_len, dims.text_hidden), np.float32))
    text_kv = reference(src, "text_kv", io["text_kv"], kv_feed, chunk_bytes)
    latents = rng.standard_normal((1, dims.tokens, dims.token_channels), np.float32)
    step = Feeds.step({**fixed, "text_kv": text_kv}, latents, sigma)
    return ({"text_kv": kv_feed, "transformer": step},
            {"text_kv": text_kv, "transformer": reference(src, "transformer", io["transformer"], step, chunk_bytes)})


def parity(path: Path, io: iospec.IOSpec, feeds: Sequence[Feed], refs: Sequence[np.ndarray],
           reference: str = "torch fp32, a chunk of blocks at a time") -> dict:
    """Worst :func:`qwen_edge.export.onnx.fidelity` over ``feeds`` of the graph at ``path`` in ONNX Runtime (CPU,
    one session) vs ``refs`` (what ``reference`` computed)."""
    from qwen_edge.runtimes.onnx import open_session

    from .onnx import fidelity, worst

    sess = open_session(path, "cpu", name=io.component)
    figures = [fidelity(ref, sess.run(io.output_names, {n: f[n] for n in io.input_names})[0])
               for f, ref in zip(feeds, refs)]
    return {**worst(figures), "samples": len(figures), "reference": reference}


# -- the VAE decoder's sample inputs, from the streamed graphs -----------------------------------------------------


def decoder_feeds(path_of: Callable[[str], Path], spec, dims: iospec.Dims, rope: dict, pad_id: int,
                  prompts: Sequence[str], steps: int, seed: int) -> list[Feed]:
    """The VAE decoder's real inputs without the torch model: each prompt generated by the pipeline (``steps``,
    ``seed``) on the streamed graphs at ``path_of("<graph>.onnx")`` in ONNX Runtime, one session open at a time,
    keeping the latents it decodes. They gate and calibrate the decoder as the torch sample run's latents do."""
    from qwen_edge.pipeline import Pipeline
    from qwen_edge.runtimes.onnx import GraphComponents

    from .onnx import _image

    recorder = _LatentRecorder(GraphComponents(dims, rope, _runner(path_of, iospec.components(dims)), pad_id))
    pipe = Pipeline(spec, recorder)
    for prompt in prompts:
        _image(pipe, prompt, dims, steps, seed)
    return recorder.latents


def _runner(path_of: Callable[[str], Path], io: dict[str, iospec.IOSpec]):
    """run(graph, feed) -> {output: array} over the graph files, only the graph last run keeping its session."""
    from qwen_edge.runtimes.onnx import open_session

    sessions = {}

    def run(name: str, feed: Feed) -> Feed:
        if name not in sessions:
            sessions.clear()  # the previous graph's weights go before the next one's load
            sessions[name] = open_session(path_of(f"{name}.onnx"), "cpu", name=name, low_memory=True)
        outs = sessions[name].run(io[name].output_names, {n: feed[n] for n in io[name].input_names})
        return dict(zip(io[name].output_names, outs))

    return run


class _LatentRecorder:
    """Pipeline components that encode and denoise with ``graphs`` and keep what decode is handed instead of
    decoding: the decoder being exported is what those latents are for, so the image returned is blank."""

    def __init__(self, graphs):
        self.graphs, self.latents = graphs, []

    def encode_text(self, ids: np.ndarray) -> np.ndarray:
        return self.graphs.encode_text(ids)

    def denoiser(self, text: np.ndarray, h: int, w: int):
        return self.graphs.denoiser(text, h, w)

    def decode(self, z: np.ndarray) -> np.ndarray:
        self.latents.append({"latents": np.ascontiguousarray(z, np.float32)})  # (1, C, h, w)
        return np.zeros((1, 3, *z.shape[2:]), np.float32)  # never looked at
