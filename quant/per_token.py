"""Per-token activations for the int8 recipe: one uint8 grid per row of a matrix product's input.

``quantize_dynamic`` quantizes each MatMul input on the fly with one scale and zero point for the whole tensor
(``DynamicQuantizeLinear``). A transformer's linear inputs are heavy-tailed across tokens: on the embedded default the
feed-forward output projection reads inputs whose max is 25-37x their RMS, and a per-tensor uint8 grid keeps 24-26 dB
of them where a per-token grid keeps 34 dB (every other linear input: 35-41 -> 38-46 dB). Per-token dynamic
quantization is the standard remedy (LLM.int8, SmoothQuant) but ONNX Runtime has neither an option nor a kernel for
it: ``MatMulInteger`` takes one zero point for A, and ``DynamicQuantizeMatMul`` / ``MatMulIntegerToFloat`` one scale.

So :func:`per_token` rewrites the graph ``quantize_dynamic`` (or the streaming exporter, which writes the same
nodes) produced, with standard ONNX ops around ORT's own integer product. For an input X (rows r, width K), the
weight's int8 columns Wq (zero points wz, scales ws):

    s_r = (max(X_r, 0) - min(X_r, 0)) / 255        z_r = round(-min(X_r, 0) / s_r)       (uint8, per row)
    Xq = QuantizeLinear(X, s, z, axis=rows)                                                      (uint8)
    Y  = s_r * MatMulIntegerToFloat(Xq, Wq, 1, ws, -, wz) - (z_r * s_r) * c,   c_n = ws_n * sum_k (Wq_kn - wz_n)

which is exactly sum_k (Xq_rk - z_r) * s_r * (Wq_kn - wz_n) * ws_n, the dequantized product: the integer GEMM is still
ORT's u8s8 kernel, and the zero point's term is a rank-1 correction (a broadcast ``Mul``) with ``c`` computed once
at export (:func:`weighted_colsums`, an initializer ``<W>_colsum`` next to ``<W>_scale``). Leading dimensions are
kept (rows are every leading index), so batch and dynamic shapes work; ONNX Runtime folds the shape ops of static
graphs.

Cost: ~20 small ops per quantized input and 4 per product instead of one fused op. On a full-width v1 block that is
3% (``python benchmarks/bench_int8_block.py --runs 5 --threads 1 --recipes int8,int8:tensor``: 0.394 vs 0.383 s per
step, fp32 1.050); on the tiny embedded default it is op overhead (a scratch timing of its transformer step, 1
thread: 1.36 ms per tensor, 1.88 per token, fp32 1.70). What it buys there (session 5's default): the worst of 50
held-out images 27.1 -> 30.9 dB vs torch fp32, mean 40.7 -> 42.5 (``benchmarks/bench_default.py``).
``Options(activations="tensor")`` keeps ``quantize_dynamic``'s graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from qwen_edge.errors import IntegrityError, require

MS_DOMAIN = "com.microsoft"
_EPS = np.float32(1e-12)  # an all-zero row: any positive scale; its zero point is 0 and its product 0


def weighted_colsums(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    """``c_n = scale_n * sum_k (q_kn - zero_point_n)`` of an int8 weight (K, N), as a float32 row (1, N). Exact: the sum
    is taken in int64, then scaled in float64 and rounded once."""
    s = np.asarray(q, np.int64).sum(axis=0) - q.shape[0] * np.asarray(zero_point, np.int64)
    return (s * np.asarray(scale, np.float64)).astype(np.float32).reshape(1, -1)


def rewrite_file(src: Path, dst: Path) -> int:
    """``quantize_dynamic``'s int8 model at ``src`` -> the per-token model at ``dst`` (:func:`add_colsums`, then
    :func:`per_token`; external data kept when the model is large). Returns the inputs rewritten."""
    from .recipes import save

    model = require("onnx", "onnx").load(str(src))
    add_colsums(model.graph)
    count = per_token(model)
    save(model, dst)
    return count


def add_colsums(graph) -> None:
    """:func:`weighted_colsums` of every ``<W>_quantized`` int8 weight a ``MatMulInteger`` reads, as ``<W>_colsum``
    initializers (the graph's initializers must hold their data: loaded with external data)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in graph.initializer}
    for node in graph.node:
        w = node.input[1].removesuffix("_quantized") if node.op_type == "MatMulInteger" else None
        if w is None or node.input[1] not in inits or f"{w}_colsum" in inits:
            continue
        arrays = [numpy_helper.to_array(inits[f"{w}{suffix}"]) for suffix in ("_quantized", "_scale", "_zero_point")]
        inits[f"{w}_colsum"] = numpy_helper.from_array(weighted_colsums(*arrays), f"{w}_colsum")
        graph.initializer.append(inits[f"{w}_colsum"])


def per_token(model) -> int:
    """Rewrite every ``DynamicQuantizeLinear`` -> ``MatMulInteger`` -> ``Cast`` -> ``Mul`` group of
    ``quantize_dynamic``'s int8 graph in ``model`` for per-row activation scales and zero points (module docstring).
    Needs ``<W>_colsum`` for every weight (:func:`add_colsums`, or the streaming exporter's). Returns the number of
    inputs rewritten; a group not in that exact shape is an :class:`IntegrityError` naming it."""
    from onnx import helper, numpy_helper

    graph = model.graph
    old = list(graph.node)  # one set of node objects: they are matched by identity below
    readers: dict[str, list] = {}
    for node in old:
        for x in node.input:
            readers.setdefault(x, []).append(node)
    replace: dict[int, list] = {}  # id(node) -> the nodes standing in its place (node names may be empty)
    drop: set[int] = set()
    taken = set(readers) | {o for n in old for o in n.output} | {t.name for t in graph.initializer}
    for node in old:
        if node.op_type == "DynamicQuantizeLinear":
            x, (xq, xs, xz) = node.input[0], node.output
            p = f"tok{len(replace)}"  # short names: the added nodes are ~10% of a tiny graph's bytes otherwise
            if any(name.startswith(p + "_") for name in taken):
                raise IntegrityError(f"per-token int8: the graph already names tensors {p}_*")
            replace[id(node)] = _quantize_rows(x, xq, p) + [
                n for j, mm in enumerate(readers.get(xq, []))
                for n in _product(mm, readers, xs, xz, p, f"{p}_{j}", drop)]
    if not replace:
        return 0
    if taken & set(_CONSTS):
        raise IntegrityError(f"per-token int8: the graph already names {sorted(taken & set(_CONSTS))}")
    nodes = [n for node in old if id(node) not in drop for n in replace.get(id(node), [node])]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(numpy_helper.from_array(np.asarray(v), k) for k, v in _CONSTS.items())
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return len(replace)


_CONSTS = {"pt_rows": np.array([-1], np.int64), "pt_axis1": np.array([1], np.int64), "pt_zero": np.float32(0),
           "pt_255": np.float32(255), "pt_eps": _EPS, "pt_one": np.float32(1)}


def _quantize_rows(x: str, xq: str, p: str) -> list:
    """X (..., K) -> uint8 ``xq``, and per row (..., 1) its scale ``<p>_row_scale`` and zero point x scale
    ``<p>_row_offset``. Rows are every leading index, flattened for ``QuantizeLinear``'s per-axis form."""
    from onnx import TensorProto, helper

    def n(op, ins, out, **kw):  # unnamed: ONNX Runtime names them; the tensors carry the <p>_ prefix
        return helper.make_node(op, ins, [out], **kw)

    return [
        n("Shape", [x], f"{p}_shape"),
        n("Shape", [x], f"{p}_width", start=-1),
        n("Shape", [x], f"{p}_lead", end=-1),
        n("Concat", ["pt_rows", f"{p}_width"], f"{p}_2d", axis=0),
        n("Concat", [f"{p}_lead", "pt_axis1"], f"{p}_col", axis=0),
        n("Reshape", [x, f"{p}_2d"], f"{p}_rows"),                                 # (R, K)
        n("ReduceMax", [f"{p}_rows", "pt_axis1"], f"{p}_max", keepdims=0),
        n("ReduceMin", [f"{p}_rows", "pt_axis1"], f"{p}_min", keepdims=0),
        n("Max", [f"{p}_max", "pt_zero"], f"{p}_hi"),                               # the grid holds 0 exactly
        n("Min", [f"{p}_min", "pt_zero"], f"{p}_lo"),
        n("Sub", [f"{p}_hi", f"{p}_lo"], f"{p}_range"),
        n("Div", [f"{p}_range", "pt_255"], f"{p}_step"),                         # DynamicQuantizeLinear's scale
        n("Max", [f"{p}_step", "pt_eps"], f"{p}_s"),                                # (R,)
        n("Neg", [f"{p}_lo"], f"{p}_neg_lo"),
        n("QuantizeLinear", [f"{p}_neg_lo", f"{p}_s"], f"{p}_z", axis=0),           # uint8 round(-lo / s), (R,)
        n("QuantizeLinear", [f"{p}_rows", f"{p}_s", f"{p}_z"], f"{p}_rows_q", axis=0),
        n("Reshape", [f"{p}_rows_q", f"{p}_shape"], xq),
        n("Cast", [f"{p}_z"], f"{p}_zf", to=TensorProto.FLOAT),
        n("Mul", [f"{p}_zf", f"{p}_s"], f"{p}_offset"),
        n("Reshape", [f"{p}_s", f"{p}_col"], f"{p}_row_scale"),
        n("Reshape", [f"{p}_offset", f"{p}_col"], f"{p}_row_offset"),
    ]


def _product(mm, readers: dict, xs: str, xz: str, p: str, base: str, drop: set[int]) -> list:
    """One ``MatMulInteger`` group of ``quantize_dynamic`` -> ``MatMulIntegerToFloat`` scaled per row, corrected for
    the row zero points; the group's Cast and both Muls are dropped, the last Mul's output name kept."""
    from onnx import helper

    def only(name, op):
        got = readers.get(name, [])
        if len(got) != 1 or got[0].op_type != op:
            raise IntegrityError(f"per-token int8: {mm.name}: expected one {op} reading {name}, found "
                                 f"{[g.op_type for g in got]}")
        return got[0]

    if mm.op_type != "MatMulInteger" or list(mm.input[2:3]) != [xz]:
        raise IntegrityError(f"per-token int8: {mm.name} ({mm.op_type}) reads a dynamically quantized input "
                             "but is not quantize_dynamic's MatMulInteger")
    w = mm.input[1].removesuffix("_quantized")
    cast = only(mm.output[0], "Cast")
    scales = [n for n in readers.get(xs, []) if n.op_type == "Mul" and f"{w}_scale" in n.input]
    out = only(cast.output[0], "Mul")
    if len(scales) != 1 or scales[0].output[0] not in out.input:
        raise IntegrityError(f"per-token int8: {mm.name}: its product is not scaled by {xs} x {w}_scale")
    drop.update(map(id, (mm, cast, scales[0], out)))
    wz = mm.input[3] if len(mm.input) > 3 else ""
    return [  # the product keeps the MatMulInteger's node name (profiles name the layer)
        helper.make_node("MatMulIntegerToFloat", [mm.input[0], mm.input[1], "pt_one", f"{w}_scale", "", wz],
                         [f"{base}_float"], mm.name, domain=MS_DOMAIN),
        helper.make_node("Mul", [f"{base}_float", f"{p}_row_scale"], [f"{base}_scaled"]),
        helper.make_node("Mul", [f"{p}_row_offset", f"{w}_colsum"], [f"{base}_offset"]),  # (.., R, N)
        helper.make_node("Sub", [f"{base}_scaled", f"{base}_offset"], [out.output[0]]),
    ]
