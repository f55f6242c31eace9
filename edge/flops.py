"""Multiply-add FLOPs of an ONNX graph, counted from the graph itself (issue 6).

Static-shape graphs only (every bundle graph is): ``onnx.shape_inference`` gives every tensor's shape, and
each matrix product or convolution node adds ``2 * M * N * K``:

- matrix products (``MatMul``, ``Gemm``, ``MatMulInteger``, ``QLinearMatMul``, ``FusedMatMul``, and ONNX
  Runtime's ``MatMulNBits``, ``DynamicQuantizeMatMul``, ``MatMulIntegerToFloat``): ``2 * numel(Y) * K``,
  K the reduced dimension, so batched products (the attention's Q.K^T and P.V) count every batch;
- convolutions (``Conv``, ``ConvInteger``, ``QLinearConv``, ``FusedConv``): ``2 * numel(Y) * C_in/group *
  kernel area``; ``ConvTranspose``: ``2 * numel(X) * C_out/group * kernel area``.

Bias additions, norms, softmax and element-wise ops are not counted: the figure is the matrix work a GEMM
peak can be set against. ``weights`` is the part whose second operand is constant (a weight, possibly cast or
dequantized): the linear layers and convolutions, as opposed to products of two activations (attention). ONNX's shape inference does not know ONNX Runtime's contrib ops (the int4 recipe's
``MatMulNBits``, ...), so their output shapes are computed here and fed back until nothing changes.

Needs the ``onnx`` package (``pip install 'qwen-edge[onnx]'``); no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import IntegrityError, require

MATMUL_OPS = ("MatMul", "Gemm", "MatMulInteger", "QLinearMatMul", "FusedMatMul", "MatMulNBits",
              "DynamicQuantizeMatMul", "MatMulIntegerToFloat")
CONV_OPS = ("Conv", "ConvInteger", "QLinearConv", "FusedConv", "NhwcConv")
COUNTED = MATMUL_OPS + CONV_OPS + ("ConvTranspose",)
_WEIGHT_INPUT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3, "FusedConv": 1, "NhwcConv": 1, "ConvTranspose": 1}
_ROUNDS = 8  # contrib-op shape propagation rounds (each round unblocks the ops downstream of the last)


@dataclass(frozen=True)
class Flops:
    """FLOPs of one graph: ``total``, per op type, and the nodes whose shapes stayed unknown (not counted)."""

    total: float
    by_op: dict[str, float] = field(default_factory=dict)
    nodes: int = 0  # counted nodes
    unknown: tuple[str, ...] = ()  # matrix/conv nodes whose shapes stayed unknown, and opaque EPContext nodes
    weights: float = 0.0  # of total: products with a constant operand (linear layers, convolutions)

    def to_json(self) -> dict:
        return {"total": self.total, "by_op": dict(self.by_op), "nodes": self.nodes, "unknown": list(self.unknown),
                "weights": self.weights}


def count(model) -> Flops:
    """FLOPs of one run of ``model`` (a path to an .onnx file or an ``onnx.ModelProto``); external weights are
    not read, only their shapes."""
    onnx = require("onnx", "onnx")
    if not isinstance(model, onnx.ModelProto):
        path = Path(model)
        if not path.is_file():
            raise IntegrityError(f"{path} does not exist")
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # protobuf's DecodeError and friends: not an ONNX file
            raise IntegrityError(f"{path.name} is not a readable ONNX model ({e})") from None
    shapes = infer_shapes(model)
    const = constants(model.graph)
    total, weights, by_op, nodes, unknown = 0.0, 0.0, {}, 0, []
    for node in _nodes(model.graph):
        if node.op_type == "EPContext":  # a precompiled NPU graph: opaque, nothing to count
            unknown.append(node.name or node.op_type)
        if node.op_type not in COUNTED:
            continue
        flops = node_flops(node, shapes)
        if flops is None:
            unknown.append(node.name or node.op_type)
            continue
        total += flops
        weights += flops if _second_operand(node) in const else 0.0
        by_op[node.op_type] = by_op.get(node.op_type, 0.0) + flops
        nodes += 1
    return Flops(total, by_op, nodes, tuple(unknown), weights)


def constants(graph) -> set[str]:
    """Names of tensors computed from initializers and Constant nodes alone (casts, dequantized weights)."""
    const = {t.name for t in graph.initializer}
    for node in graph.node:
        ins = [x for x in node.input if x]
        if node.op_type == "Constant" or (ins and all(x in const for x in ins)):
            const.update(node.output)
    return const


def _second_operand(node) -> str:
    """The weight-side input of a matrix product or convolution."""
    index = _WEIGHT_INPUT.get(node.op_type, 3 if node.op_type == "QLinearMatMul" else 1)
    return node.input[index] if len(node.input) > index else ""


def infer_shapes(model) -> dict[str, list[int]]:
    """Tensor name -> static shape (dims of unknown size as 0), for inputs, initializers and every inferred value,
    contrib-op outputs included. ``model`` is not modified."""
    onnx = require("onnx", "onnx")
    work = onnx.ModelProto()
    work.CopyFrom(model)
    for _ in range(_ROUNDS):
        inferred = onnx.shape_inference.infer_shapes(work, data_prop=True)  # Shape -> Reshape chains (per_token)
        shapes, types = _collect(inferred.graph)
        added = 0
        for node in _nodes(inferred.graph):
            if not node.output or node.output[0] in shapes:
                continue
            got = _contrib_shape(node, shapes, types)
            if got is not None:
                shape, elem = got
                work.graph.value_info.append(onnx.helper.make_tensor_value_info(node.output[0], elem, shape))
                added += 1
        if not added:
            return shapes
    return shapes


def node_flops(node, shapes: dict[str, list[int]]) -> float | None:
    """FLOPs of one matrix-product or convolution node, or None when a shape it needs is unknown."""
    out = _known(shapes.get(node.output[0]))
    if out is None:
        return None
    op = node.op_type
    if op == "MatMulNBits":
        return 2.0 * _numel(out) * _attr(node, "K")
    if op in MATMUL_OPS:
        a = _known(shapes.get(node.input[0]))
        if a is None:
            return None
        trans_a = _attr(node, "transA", 0) if op in ("Gemm", "FusedMatMul") else 0
        k = a[-2] if trans_a else a[-1]
        return 2.0 * _numel(out) * k
    w = _known(shapes.get(node.input[_WEIGHT_INPUT[op]]))
    if w is None:
        return None
    if op == "ConvTranspose":
        x = _known(shapes.get(node.input[0]))
        return None if x is None else 2.0 * _numel(x) * _numel(w[1:])
    return 2.0 * _numel(out) * _numel(w[1:])  # w: (C_out, C_in/group, *kernel)


# -- helpers ------------------------------------------------------------------------------------------------


def _nodes(graph):
    """Every node, subgraphs (If/Loop bodies) included."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _nodes(attr.g)
            for sub in attr.graphs:
                yield from _nodes(sub)


def _collect(graph) -> tuple[dict[str, list[int]], dict[str, int]]:
    shapes, types = {}, {}
    for v in [*graph.input, *graph.value_info, *graph.output]:
        t = v.type.tensor_type
        if t.HasField("shape"):
            shapes[v.name] = [d.dim_value if d.HasField("dim_value") else 0 for d in t.shape.dim]
            types[v.name] = t.elem_type
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
        types[init.name] = init.data_type
    return shapes, types


def _contrib_shape(node, shapes: dict, types: dict) -> tuple[list[int], int] | None:
    """(output shape, element type) of an ONNX Runtime contrib op whose inputs' shapes are known."""
    op = node.op_type
    a = _known(shapes.get(node.input[0])) if node.input else None
    if a is None:
        return None
    if op == "MatMulNBits":
        return a[:-1] + [_attr(node, "N")], types.get(node.input[0], 1)
    if op in ("DynamicQuantizeMatMul", "MatMulIntegerToFloat", "FusedMatMul"):
        b = _known(shapes.get(node.input[1]))
        if b is None:
            return None
        a_t = a[:-2] + [a[-1], a[-2]] if _attr(node, "transA", 0) and len(a) >= 2 else a
        b_t = b[:-2] + [b[-1], b[-2]] if _attr(node, "transB", 0) and len(b) >= 2 else b
        batch = _broadcast(a_t[:-2], b_t[:-2])
        rows = [a_t[-2]] if len(a_t) >= 2 else []
        return batch + rows + [b_t[-1]], 1  # float32 out
    if op == "GatherBlockQuantized":
        data, scales = _known(shapes.get(node.input[0])), _known(shapes.get(node.input[2]))
        idx = _known(shapes.get(node.input[1]))
        if data is None or idx is None or scales is None:
            return None
        axis = _attr(node, "gather_axis", 0) % len(data)
        unpacked = data[:-1] + [data[-1] * 8 // _attr(node, "bits", 4)] if types.get(node.input[0]) == 2 else data
        return unpacked[:axis] + idx + unpacked[axis + 1:], types.get(node.input[2], 1)
    return None


def _broadcast(a: list[int], b: list[int]) -> list[int]:
    n = max(len(a), len(b))
    a, b = [1] * (n - len(a)) + a, [1] * (n - len(b)) + b
    return [max(x, y) for x, y in zip(a, b)]


def _known(shape: list[int] | None) -> list[int] | None:
    return shape if shape is not None and all(d > 0 for d in shape) else None


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _attr(node, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return a.i
    if default is None:
        raise IntegrityError(f"node {node.name or node.op_type} ({node.op_type}) lacks its {name!r} attribute")
    return default
