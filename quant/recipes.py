"""Quantization recipes over ONNX files, built from ONNX Runtime's own tools.

One function per recipe, each ``(component, src, dst, calibration, options) -> facts``: ``src`` is an fp32
ONNX model exported per :mod:`qwen_edge.iospec`, ``dst`` the file to write (external data next to it when
the model is large), the facts a JSON-ready dict for the bundle manifest. No quantizer is written here:

- ``fp16``: ``onnxruntime.transformers.float16.convert_float_to_float16`` with fp32 I/O, keeping in fp32 the
  ops and nodes where Qwen-Image overflows or loses precision in half precision (norm statistics,
  softmax, the timestep/modulation path, the final norm and projection).
- ``int8``: ``quantize_dynamic``: per-channel symmetric int8 weights for MatMul/Gemm/Gather, uint8
  activations quantized on the fly, so ORT runs integer kernels (``MatMulIntegerToFloat``,
  ``DynamicQuantizeMatMul``) rather than dequantizing weights to fp32; then each product's input gets one grid
  per token instead of one per tensor (:mod:`qwen_edge.quant.per_token`; ``Options.activations``). Convolutions:
  ORT's dynamic ``ConvInteger`` is ~5x *slower* than its fp32 Conv on x86, so with calibration feeds the convolutions
  are quantized statically instead (QDQ, uint8 activations, per-channel int8 weights: ORT fuses them into
  ``QLinearConv``), except the thin ones (fewer than 16 output channels, :func:`thin_convs`), where ORT's
  QLinearConv loses to fp32; without calibration they all stay fp32.
- ``int4``: ``MatMulNBitsQuantizer``: block-wise symmetric 4-bit weights (block 32/64/128; by default per weight
  the largest of 64 and 32 that divides its K, :func:`block_for`) with int8
  activations inside ``MatMulNBits`` (accuracy level 4), embedding tables as ``GatherBlockQuantized``. The
  VAE components take the ``int8`` recipe (the issue: "VAE stays int8").
- ``w8a32``: weight-only int8, the int8 the issue defines: ``MatMulNBitsQuantizer`` at 8 bits (blocks of
  ``block_size`` along K, symmetric) with float32 compute (accuracy level 1: ORT dequantizes block by block
  inside the kernel, never a whole fp32 weight), embedding tables through ``quantize_dynamic`` (a Gather's
  table is weight-only by nature). No activation is quantized, so there is none of ``int8``'s per-tensor
  activation error (embedded default's worst image: 27.1 -> 32.0 dB) and none of its integer-kernel speed:
  ORT 1.32's 8-bit ``MatMulNBits`` in fp32 is *slower* than fp32 MatMul on this CPU (a full-width v1 block at 1
  thread: 3.30 s/step vs fp32 0.93 and int8 0.26, ``benchmarks/bench_int8_block.py --recipes int8,w8a32``).
  It is the fidelity recipe for 4x smaller weights; ``int8`` is the speed one. VAE components take ``int8``.
- ``w8a16``: static QDQ for the QNN HTP backend through ``onnxruntime.quantization.execution_providers.qnn``
  (``qnn_preprocess_model``, ``get_qnn_qdq_config``): uint8 weights (per output channel in linear layers,
  which become 1x1 Convs because HTP takes MatMul weights per tensor only; per tensor elsewhere), uint16 activations
  calibrated on recorded sampler trajectories (:func:`qwen_edge.quant.calibrate.record`); the graph
  fusions and mask ranges the HTP backend needs are in :mod:`qwen_edge.export.qnn`.
- ``mixed`` lives in :mod:`qwen_edge.quant.sensitivity`.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from qwen_edge.errors import InputError, IntegrityError, require

VAE_COMPONENTS = ("vae_decoder", "vae_encoder")
COMPONENTS = ("text_encoder", "text_kv", "transformer") + VAE_COMPONENTS
BLOCK_SIZES = (32, 64, 128)
# The default block (Options.block_size None): per weight, the first of these that divides its K, so no block is
# padded (MatMulNBits pads K up to a whole block: a 96-wide layer in blocks of 64 stores and computes 128).
AUTO_BLOCKS = (64, 32)
# Above this the protobuf limit (2 GB) is near: weights go to an external data file next to the model.
EXTERNAL_DATA_BYTES = 1 << 30

# fp16: op types whose outputs overflow or lose too much in half precision. Norm statistics (x**2 sums
# reach 65504 when activations are ~256; Qwen-Image's residual stream gets far larger), softmax, and the
# transcendental functions of the sinusoidal timestep embedding (arguments up to sigma * 1000).
FP16_KEEP_OPS = ("LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
                 "RMSNormalization", "GroupNormalization", "InstanceNormalization", "ReduceMean", "ReduceL2",
                 "ReduceSumSquare", "LpNormalization", "Pow", "Sqrt", "Reciprocal", "Softmax", "Exp", "Sin", "Cos")
ACTIVATION_GRIDS = ("token", "tensor")  # int8's dynamic activation quantization: per row, or per tensor
# w8a16: calibrated activation ranges are widened this many times (see widened_ranges).
ACTIVATION_MARGIN = 4.0
_FLOAT32_RANGE = (float(np.finfo(np.float32).min), float(np.finfo(np.float32).max))  # a mask's lowest x 4 stays finite
FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto data types
NORM_OPS = ("LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization", "RMSNormalization",
            "GroupNormalization", "InstanceNormalization", "ReduceMean", "ReduceL2", "LpNormalization")


@dataclass(frozen=True)
class Options:
    """Recipe knobs. ``block_size``: int4 / w8a32 block length along K (None: per weight, :func:`block_for`);
    ``target_psnr``: the ``mixed`` recipe's goal (dB, component output vs fp32 on the calibration feeds);
    ``reduce_range``: 7-bit int8 weights, for x86 CPUs without VNNI where ORT's u8s8 kernels can saturate (costs
    ~6 dB); ``activations``: the int8 recipe's activation grid (also of ``mixed``'s int8 layers), ``"token"`` (one
    per row, :mod:`qwen_edge.quant.per_token`) or ``"tensor"`` (``quantize_dynamic``'s one per call: faster on tiny
    graphs; session 5's embedded default's worst image 27.1 dB vs 30.9 per token)."""

    block_size: int | None = None
    target_psnr: float = 35.0
    reduce_range: bool = False
    activations: str = "token"

    def __post_init__(self):
        if self.activations not in ACTIVATION_GRIDS:
            grids = ", ".join(ACTIVATION_GRIDS)
            raise InputError(f"int8 activations must be one of {grids}, got {self.activations}")
        if self.block_size is not None and self.block_size not in BLOCK_SIZES:
            sizes = ", ".join(map(str, BLOCK_SIZES))
            raise InputError(f"int4 block size must be one of {sizes}, got {self.block_size}")


# -- the recipes --------------------------------------------------------------------------------------------


def fp16(component: str, src: Path, dst: Path, calibration, opts: Options) -> dict:
    """Half-precision weights and compute, fp32 I/O; overflow-prone ops and nodes stay fp32."""
    f16 = require("onnxruntime.transformers.float16", "onnx")
    onnx = require("onnx", "onnx")
    model = onnx.load(str(src))
    keep_nodes = sorted(scalar_path(model.graph) | tail(model.graph))
    ops = list(f16.DEFAULT_OP_BLOCK_LIST) + list(FP16_KEEP_OPS)
    model = f16.convert_float_to_float16(model, keep_io_types=True, op_block_list=ops, node_block_list=keep_nodes)
    _merge_fp32_islands(model.graph)
    stored = _store_half(model.graph)
    save(model, dst)
    return {"weights": "float16", "compute": "float16, fp32 I/O",
            "kept_fp32": {"op_types": list(FP16_KEEP_OPS), "nodes": len(keep_nodes),
                          "weights_stored_fp16": stored,
                          "why": "norm statistics, softmax, the timestep/modulation path and the final "
                                 "norm + projection overflow or lose precision in fp16"}}


def _store_half(graph) -> int:
    """Store the weight matrices of the fp32-kept nodes in fp16, cast back to fp32 when the session loads.

    The kept path is mostly v1's modulation (a third of its weights): fp32 arithmetic on fp16-rounded
    weights costs nothing measurable (~85 dB on the output), and the file halves. Small tensors (the
    timestep frequencies, whose rounding costs 45 dB) and vectors stay fp32. Returns how many were stored.
    """
    onnx = require("onnx", "onnx")
    from onnx import numpy_helper

    stored = 0
    infos = {v.name: v for v in graph.value_info}
    for tensor in [t for t in graph.initializer if t.data_type == FLOAT and len(t.dims) == 2 and min(t.dims) >= 16]:
        if tensor.name in infos:  # the converter may have typed the name fp16; it stays an fp32 tensor
            infos[tensor.name].type.tensor_type.elem_type = FLOAT
        half = numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name + "_fp16")
        graph.initializer.remove(tensor)
        graph.initializer.append(half)
        graph.node.insert(0, onnx.helper.make_node("Cast", [half.name], [tensor.name], name=tensor.name + "_to_fp32",
                                                   to=FLOAT))
        stored += 1
    return stored


def _merge_fp32_islands(graph) -> None:
    """Remove the converter's fp32 -> fp16 -> fp32 round trips, so chains of kept nodes stay fp32.

    The converter treats every kept node as an island: its fp32 output is cast to fp16 and cast back for
    the next kept node. Along the timestep path that rounds sigma * 1000 * freq to fp16 (errors of ~0.5
    rad in the sinusoid: the output drops to ~37 dB); the graph inputs (sigma, rotary tables) likewise.
    Each ``Cast(to=float)`` of a ``Cast(to=float16)`` of a float32 tensor becomes an Identity of it.
    """
    types = {v.name: v.type.tensor_type.elem_type for v in list(graph.input) + list(graph.value_info)}
    types.update({t.name: t.data_type for t in graph.initializer})
    to_half = {n.output[0]: n.input[0] for n in graph.node
               if n.op_type == "Cast" and _cast_to(n) == FLOAT16 and types.get(n.input[0]) == FLOAT}
    for node in graph.node:
        if node.op_type == "Cast" and _cast_to(node) == FLOAT and node.input[0] in to_half:
            node.op_type, node.input[0] = "Identity", to_half[node.input[0]]
            del node.attribute[:]
    used = {x for n in graph.node for x in n.input} | {o.name for o in graph.output}
    for n in [n for n in graph.node if n.op_type == "Cast" and n.output[0] in to_half and n.output[0] not in used]:
        graph.node.remove(n)


def _cast_to(node) -> int:
    return next((a.i for a in node.attribute if a.name == "to"), 0)


def int8(component: str, src: Path, dst: Path, calibration, opts: Options) -> dict:
    """Per-channel int8 weights with int8 compute (activations quantized per call, per token by default); convs
    static when calibrated."""
    q = require("onnxruntime.quantization", "onnx")
    facts = int8_facts(opts)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        staged = src
        if calibration and has_op(src, "Conv"):
            staged = Path(tmp) / "convs.onnx"
            thin = thin_convs(src)
            _static_convs(src, staged, calibration, q, exclude=thin)
            facts["convolutions"] = "QDQ static: uint8 calibrated activations, int8 per-channel weights (QLinearConv)"
            if thin:
                facts["convolutions_fp32"] = {"nodes": thin, "why": f"fewer than {THIN_CONV} output channels: "
                                              "ORT's QLinearConv is slower than its fp32 Conv there"}
        elif has_op(src, "Conv"):
            facts["convolutions"] = "float32 (ConvInteger is slower than fp32 Conv on CPU; pass calibration feeds)"
        kept = boundary_layers(src)
        with quiet():
            dynamic_int8(staged, dst, opts.activations, op_types_to_quantize=["MatMul", "Gemm", "Gather"],
                         reduce_range=opts.reduce_range, nodes_to_exclude=kept,
                         use_external_data_format=_large(staged), extra_options={"MatMulConstBOnly": True})
    if kept:
        facts["kept_fp32"] = kept_facts(kept)
    return facts


def dynamic_int8(src: Path, dst: Path, activations: str, **options) -> None:
    """``quantize_dynamic`` (per-channel symmetric int8 weights, ``options`` passed on) from ``src`` to ``dst``, then,
    for ``activations="token"``, the per-token rewrite of its graph (:mod:`qwen_edge.quant.per_token`)."""
    q = require("onnxruntime.quantization", "onnx")
    kwargs = {"per_channel": True, "weight_type": q.QuantType.QInt8, **options}
    if activations == "tensor":
        q.quantize_dynamic(str(src), str(dst), **kwargs)
        return
    from .per_token import rewrite_file

    with tempfile.TemporaryDirectory(dir=Path(dst).parent) as tmp:
        staged = Path(tmp) / "dynamic.onnx"
        q.quantize_dynamic(str(src), str(staged), **kwargs)
        rewrite_file(staged, Path(dst))


def int8_facts(opts: Options) -> dict:
    """The manifest's description of the int8 recipe's matrix products (also the streaming exporter's)."""
    if opts.activations == "token":
        act = "uint8, quantized per call and per token (row): own scale and zero point (qwen_edge.quant.per_token)"
        compute = "integer (MatMulIntegerToFloat, scaled per row)"
    else:
        act = "uint8, quantized per call (dynamic, per tensor)"
        compute = "integer (DynamicQuantizeMatMul / MatMulIntegerToFloat)"
    return {"weights": "int8 symmetric per-channel", "activations": act, "compute": compute,
            "reduce_range": opts.reduce_range}


def kept_facts(kept: list[str]) -> dict:
    """The manifest's record of the boundary layers a recipe kept in fp32 (:func:`boundary_layers`)."""
    return {"nodes": kept, "why": "the linear layers reading the graph's inputs (img_in) and writing its outputs "
                                  "(proj_out) cost the most per byte"}


def boundary_layers(path: Path) -> list[str]:
    """Names of the linear layers (MatMul/Gemm with a weight initializer) that read a graph input directly, and
    of the last one of the final layers (:func:`tail`): the transformer's ``img_in`` and ``proj_out``.

    Why: on the embedded default they are the most sensitive layers of the transformer measured one at a time
    (45 and 47 dB on the step output vs 48-76 dB for every other layer), and the image PSNR over 50 held-out
    prompts with only the transformer int8 went from 26.7 to 30.5 dB (worst) keeping them fp32, for 18 KB.
    """
    onnx = require("onnx", "onnx")
    graph = onnx.load(str(path), load_external_data=False).graph
    return boundary_nodes(graph, {t.name for t in graph.initializer})


def boundary_nodes(graph, weights: set[str]) -> list[str]:
    """:func:`boundary_layers` of a ``GraphProto`` whose weight tensors are named by ``weights`` (initializers,
    or the data-less weight inputs of :mod:`qwen_edge.export.stream`'s traced graph). Only graphs whose input meets a
    linear layer directly (the transformer's latents) have them: the text encoder's input is token ids, and its
    last MLP projection is neither sensitive like ``proj_out`` nor small (on big21 keeping it took int8 from
    0.256x to 0.270x of fp32)."""
    inputs = {i.name for i in graph.input} - weights
    linear = [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and any(x in weights for x in n.input)]
    first = [n.name for n in linear if any(x in inputs for x in n.input)]
    if not first:
        return []
    last = [n.name for n in linear if n.name in tail(graph)][-1:]  # nodes are in topological order
    return first + [n for n in last if n not in first]


THIN_CONV = 16  # output channels below which a convolution stays fp32 in the int8 recipe (thin_convs)


def thin_convs(path: Path) -> list[str]:
    """Names of the convolutions with fewer than :data:`THIN_CONV` output channels: the int8 recipe keeps them fp32.

    Why: ORT's ``QLinearConv`` (NHWC, uint8) computes a few output channels per pixel slower than its fp32 Conv
    (NCHWc) does, and pays a quantize, a dequantize and layout transposes around them at full resolution. On the
    embedded default's decoder the last stage (8 and 4 channels at 128x128) took 0.85-1.23 ms per conv in int8 vs
    0.35-0.79 ms in fp32, and keeping its six convolutions fp32 (5.6 K weights) made the int8 decoder 0.91x the fp32
    one's time instead of 1.07x and raised its parity with torch from 38.8 to 44.4 dB (scratch A/B, session 12's
    Xeon, one thread). On a full-size VAE only the output convolution (4 channels) is this thin.
    """
    onnx = require("onnx", "onnx")
    graph = onnx.load(str(path), load_external_data=False).graph
    shapes = {t.name: t.dims for t in graph.initializer}
    return [n.name for n in graph.node
            if n.op_type == "Conv" and len(shapes.get(n.input[1], ())) == 4 and shapes[n.input[1]][0] < THIN_CONV]


def _static_convs(src: Path, dst: Path, calibration, q, exclude: list[str] | None = None) -> None:
    from .calibrate import reader

    with quiet():
        q.quantize_static(str(src), str(dst), reader(calibration), quant_format=q.QuantFormat.QDQ,
                          op_types_to_quantize=["Conv"], per_channel=True, activation_type=q.QuantType.QUInt8,
                          weight_type=q.QuantType.QInt8, nodes_to_exclude=exclude or [],
                          use_external_data_format=_large(src))


def int4(component: str, src: Path, dst: Path, calibration, opts: Options) -> dict:
    """Block-wise 4-bit MatMul weights (MatMulNBits) and embeddings; the VAE takes the int8 recipe."""
    if component in VAE_COMPONENTS:
        return {**int8(component, src, dst, calibration, opts), "note": "VAE components stay int8"}
    model = canonical(src)
    kept = boundary_nodes(model.graph, {t.name for t in model.graph.initializer})
    blocks = quantize_nbits(model, 4, opts.block_size, keep=kept)
    save(model, dst)
    facts = {"weights": f"int4 symmetric, {_blocks_text(blocks)} along K (MatMulNBits, GatherBlockQuantized)",
             "activations": "int8 inside MatMulNBits (accuracy_level 4)", **block_facts(opts.block_size, blocks)}
    if kept:  # as int8 keeps them, for the same reason (boundary_layers); at 4 bits they cost even more
        facts["kept_fp32"] = kept_facts(kept)
    return facts


def w8a32(component: str, src: Path, dst: Path, calibration, opts: Options) -> dict:
    """Weight-only int8: 8-bit block-wise MatMul weights computed in fp32, int8 embedding tables; VAE: int8."""
    if component in VAE_COMPONENTS:
        return {**int8(component, src, dst, calibration, opts), "note": "VAE components take the int8 recipe"}
    q = require("onnxruntime.quantization", "onnx")
    model = canonical(src)
    blocks = quantize_nbits(model, 8, opts.block_size, op_types=("MatMul",), accuracy_level=1)
    gathers = [n.name for n in model.graph.node if n.op_type == "Gather"]
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        staged = Path(tmp) / "nbits.onnx"
        save(model, staged if gathers else dst)
        if gathers:  # MatMulNBits takes Gather tables at 4 bits only; quantize_dynamic's int8 table is weight-only
            with quiet():
                q.quantize_dynamic(str(staged), str(dst), op_types_to_quantize=["Gather"], per_channel=True,
                                   weight_type=q.QuantType.QInt8, use_external_data_format=_large(staged))
    return {"weights": f"int8 symmetric, {_blocks_text(blocks)} along K (MatMulNBits bits=8); embedding "
                       "tables int8 per row", "activations": "float32 (weight-only)",
            "compute": "float32 (accuracy_level 1: weights dequantized block by block inside the kernel)",
            **block_facts(opts.block_size, blocks)}


def w8a16(component: str, src: Path, dst: Path, calibration, opts: Options) -> dict:
    """Static QDQ for the QNN HTP NPU: uint8 per-tensor weights, uint16 activations, calibrated."""
    if not calibration:
        raise InputError("w8a16 needs calibration feeds (qwen_edge.quant.calibrate.record)")
    onnx = require("onnx", "qnn")
    q = require("onnxruntime.quantization", "qnn")
    qnn = require("onnxruntime.quantization.execution_providers.qnn", "qnn")
    check_static(src)
    from qwen_edge.export.qnn import MASK_MARGIN, fuse_for_htp, linears_as_convs, masked_softmax_ranges

    from .calibrate import reader

    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp, quiet():
        pre = Path(tmp) / "pre.onnx"
        large = _large(src)
        # qnn_preprocess_model fuses patterns HTP runs natively (LayerNorm, Gelu, ...); it writes nothing
        # when there is nothing to change.
        staged = pre if qnn.qnn_preprocess_model(str(src), str(pre), save_as_external_data=large) else src
        model = onnx.load(str(staged))
        fused = fuse_for_htp(model)
        convs = linears_as_convs(model)  # per-channel weights: HTP quantizes MatMul weights per tensor only
        if fused or convs:
            staged = Path(tmp) / "fused.onnx"
            save(model, staged)
        masked = masked_softmax_ranges(staged, calibration, Path(tmp)) or {}
        per_channel = {w: [{"axis": 0}] for w in convs}  # ORT's per-channel weights: symmetric, output axis
        overrides = {**widened_ranges(staged, calibration, Path(tmp), q), **masked, **per_channel}
        cfg = qnn.get_qnn_qdq_config(str(staged), reader(calibration), activation_type=q.QuantType.QUInt16,
                                     weight_type=q.QuantType.QUInt8, per_channel=False, init_overrides=overrides)
        _fixed_params_win(cfg.extra_options.get("TensorQuantOverrides", {}))
        cfg.use_external_data_format = large
        with np.errstate(over="ignore"):  # a float32-lowest mask saturating to the clamped range divides to inf
            q.quantize(str(staged), str(dst), cfg)
    return {"weights": "uint8 (QDQ): per output channel in linear layers (as 1x1 Conv), per tensor elsewhere",
            "linear_layers_as_conv": len(convs), "activations": "uint16 per-tensor (QDQ), calibrated",
            "calibration_feeds": len(calibration), "target": "QNN HTP (Qualcomm w8a16)",
            "masked_softmax_inputs": len(masked), "activation_range_margin": ACTIVATION_MARGIN,
            "softmax_mask_margin": MASK_MARGIN}


def widened_ranges(model: Path, calibration, tmp: Path, q) -> dict:
    """Every calibrated activation's min/max range (ORT's MinMax calibrator) scaled by :data:`ACTIVATION_MARGIN`,
    as ``TensorQuantOverrides``.

    Why: min/max over a few calibration prompts clips what they never showed. The embedded default's
    transformer calibrated without a black-background prompt clipped on black backgrounds (image 18.3 dB on
    such held-out prompts, 44 dB mean). 16-bit activations have resolution to spare (a step of range/65535,
    ~96 dB), so a 4x wider range (-12 dB of resolution, still far below the 8-bit weights' error) keeps
    unseen inputs from saturating. Scaling keeps 0 exact and one-sided ranges one-sided.
    """
    from .calibrate import reader

    calibrator = q.create_calibrator(str(model), augmented_model_path=str(tmp / "augmented.onnx"),
                                     use_external_data_format=_large(model))
    calibrator.collect_data(reader(calibration))
    out = {}
    for name, data in calibrator.compute_data().data.items():
        lo, hi = (float(np.squeeze(v)) for v in data.range_value)
        if np.isfinite(lo) and np.isfinite(hi) and hi > lo:
            wide = np.clip([min(lo, 0.0) * ACTIVATION_MARGIN, max(hi, 0.0) * ACTIVATION_MARGIN], *_FLOAT32_RANGE)
            out[name] = [{"rmin": np.array(wide[0], np.float32), "rmax": np.array(wide[1], np.float32)}]
    return out


def _fixed_params_win(overrides: dict) -> None:
    """Where ``get_qnn_qdq_config`` pins a tensor's scale and zero point (ops whose output quantization the HTP
    backend fixes), drop the widened range merged into the same override: ORT refuses both in one entry."""
    for entries in overrides.values():
        for entry in entries:
            if "scale" in entry or "zero_point" in entry:
                entry.pop("rmin", None)
                entry.pop("rmax", None)


# -- ONNX Runtime tool wrappers shared with the mixed recipe ------------------------------------------------


def canonical(src: Path):
    """The model with every Gemm rewritten as MatMul (+ Add) by ORT's own pass, so one weight-quantizer
    sees every linear layer (v1's modulation Linears export as Gemm and hold a third of its weights)."""
    onnx = require("onnx", "onnx")
    from onnxruntime.quantization.onnx_model import ONNXModel

    model = onnx.load(str(src))
    wrapped = ONNXModel(model)
    wrapped.replace_gemm_with_matmul()
    wrapped.remove_unused_constant()
    return wrapped.model


def quantize_nbits(model, bits: int, block_size: int | None, nodes: list[str] | None = None, keep=(),
                   op_types=("MatMul", "Gather"), accuracy_level: int = 4) -> dict[int, int]:
    """``MatMulNBitsQuantizer`` in place: MatMul weights and embedding tables (``nodes`` only, when given), except
    the nodes named in ``keep``. ``accuracy_level`` 4: int8 activations inside the kernel; 1: float32 compute.
    ``block_size`` None: each weight in blocks of :func:`block_for` its K (one quantizer pass per block size).
    Returns {block size: weights quantized with it}."""
    with root_logger_kept():
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    widths = quantizable_widths(model.graph, op_types)
    chosen = [n for n in widths if n not in keep and (nodes is None or n in nodes)]
    groups: dict[int, list[str]] = {}
    for name in chosen:
        groups.setdefault(block_for(widths[name], block_size), []).append(name)
    for block, group in sorted(groups.items()):
        # nodes_to_include only adds to the op-type selection; restricting takes nodes_to_exclude.
        exclude = [n.name for n in model.graph.node if n.op_type in op_types and n.name not in group]
        quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=True,
                                         accuracy_level=accuracy_level, nodes_to_exclude=exclude,
                                         op_types_to_quantize=tuple(op_types),
                                         quant_axes=tuple((op, {"MatMul": 0, "Gather": 1}[op]) for op in op_types))
        with quiet():
            quantizer.process()
    return {block: len(group) for block, group in sorted(groups.items())}


def block_for(k: int, block_size: int | None = None) -> int:
    """The block length along K for a weight whose blocked axis is ``k`` long: ``block_size`` when given, else the
    first of :data:`AUTO_BLOCKS` that divides ``k`` (no padded block), else the largest of them."""
    if block_size is not None:
        return block_size
    return next((b for b in AUTO_BLOCKS if k % b == 0), AUTO_BLOCKS[0])


def quantizable_widths(graph, op_types=("MatMul", "Gather")) -> dict[str, int]:
    """{node name: length of its blocked axis} for the MatMul nodes with a constant 2-D weight (K, its rows) and
    Gather nodes with a constant 2-D table (its width) among ``op_types``: what MatMulNBitsQuantizer quantizes."""
    dims = {t.name: list(t.dims) for t in graph.initializer}
    out = {}
    for n in graph.node:
        if n.op_type == "MatMul" and "MatMul" in op_types and len(dims.get(n.input[1], ())) == 2:
            out[n.name] = dims[n.input[1]][0]
        elif n.op_type == "Gather" and "Gather" in op_types and len(dims.get(n.input[0], ())) == 2:
            out[n.name] = dims[n.input[0]][1]
    return out


def block_facts(block_size: int | None, blocks: dict[int, int]) -> dict:
    """The manifest's record of the blocks: the option as given (``"auto"`` for None) and the weights per block."""
    return {"block_size": "auto" if block_size is None else block_size,
            "blocks": {str(b): n for b, n in blocks.items()}}


def _blocks_text(blocks: dict[int, int]) -> str:
    return "blocks of " + " / ".join(str(b) for b in blocks) if blocks else "no weights"


@contextlib.contextmanager
def root_logger_kept():
    """Undo what the body does to the root logger. ORT modules call ``logging.basicConfig(level=INFO)`` when first
    imported (``quantization.matmul_nbits_quantizer``, ``tools.ort_format_model``); left alone, every later INFO
    record of the process (onnx_ir's passes during an export: hundreds of lines) reaches the user's terminal."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


@contextlib.contextmanager
def quiet():
    """Silence ORT quantization's advisory root-logger warnings ("consider pre-processing") for one call."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


# -- graph facts --------------------------------------------------------------------------------------------


def scalar_path(graph) -> set[str]:
    """Names of nodes computed only from scalar graph inputs (and constants): the timestep embedding and
    the modulation it drives, which depend on sigma alone. Found structurally, so no I/O name is spelled."""
    const = {t.name for t in graph.initializer}
    derived = {i.name for i in graph.input if _numel(i) == 1}
    path = set()
    for node in graph.node:
        ins = [x for x in node.input if x]
        if all(x in const or x in derived for x in ins):
            if any(x in derived for x in ins):
                path.add(node.name)
                derived.update(node.output)
            else:
                const.update(node.output)
    return path


def tail(graph) -> set[str]:
    """Names of the final layers: from the last normalisation node to the outputs (final norm, its
    modulation, the output projection)."""
    nodes = list(graph.node)
    norms = [i for i, n in enumerate(nodes) if n.op_type in NORM_OPS]
    if not norms:
        return set()
    start = norms[-1]
    producer = {out: i for i, n in enumerate(nodes) for out in n.output}
    todo = [producer[o.name] for o in graph.output if o.name in producer]
    seen: set[int] = set()
    while todo:
        i = todo.pop()
        if i in seen or i < start:
            continue
        seen.add(i)
        todo += [producer[x] for x in nodes[i].input if x in producer]
    return {nodes[i].name for i in seen}


def op_counts(path: Path) -> dict[str, int]:
    """Op types of a model file (external data not loaded)."""
    onnx = require("onnx", "onnx")
    return dict(Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node))


def has_op(path: Path, op_type: str) -> bool:
    return op_type in op_counts(path)


def check_static(path: Path) -> None:
    """Refuse a model with symbolic dimensions (the QNN HTP backend compiles static shapes only)."""
    onnx = require("onnx", "onnx")
    graph = onnx.load(str(path), load_external_data=False).graph
    for value in list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            raise InputError(f"{path.name}: {value.name} has a dynamic shape; the QNN target needs static shapes "
                             "(export with fixed --height/--width/--text-len)")


def files_of(path: Path) -> list[Path]:
    """The model file and every external data file it references."""
    onnx = require("onnx", "onnx")
    model = onnx.load(str(path), load_external_data=False)
    extra = {e.value for t in _all_tensors(model.graph) for e in t.external_data if e.key == "location"}
    files = [path] + [path.parent / name for name in sorted(extra)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise IntegrityError(f"{path.name} references missing external data: {', '.join(missing)}")
    return files


def model_bytes(path: Path) -> int:
    """Bytes on disk of a model and its external data."""
    return sum(f.stat().st_size for f in files_of(path))


def save(model, dst: Path) -> None:
    """Write ``model``; weights go to ``<dst name>.data`` next to it when the model is large."""
    onnx = require("onnx", "onnx")
    dst = Path(dst)
    large = sum(len(t.raw_data) for t in model.graph.initializer) > EXTERNAL_DATA_BYTES
    if large:
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=dst.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(dst))


def _large(path: Path) -> bool:
    return model_bytes(Path(path)) > EXTERNAL_DATA_BYTES


def _numel(value) -> int:
    n = 1
    for d in value.type.tensor_type.shape.dim:
        if not d.HasField("dim_value"):
            return -1
        n *= d.dim_value
    return n


def _all_tensors(graph):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
