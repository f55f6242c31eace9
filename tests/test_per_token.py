"""The int8 recipe's per-token activations (``qwen_edge.quant.per_token``) against ONNX Runtime's own quantizer.

Reference: ORT's ``DynamicQuantizeLinear`` run on each row alone gives that row's uint8 values, scale and zero point;
the product of those dequantized rows with ``quantize_dynamic``'s dequantized int8 weights (float64) is what the
rewritten graph must compute, to float32 rounding. Real ONNX Runtime sessions, no mocks.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from qwen_edge.quant import quantize

K, N = 48, 40


def _prelude(path, w, b):
    """As :func:`_linear`, with one fp32 layer in front so the quantized layer does not read the graph input (the
    int8 recipe keeps a layer reading the graph's input in fp32)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["h"], "prelude"),
         helper.make_node("MatMul", ["h", "w"], ["xw"], "layer_MatMul"),
         helper.make_node("Add", ["xw", "b"], ["y"], "layer_Add"),
         helper.make_node("Tanh", ["y"], ["out"], "tail")],
        "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "rows", K])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))


def _session(model):
    """A CPU session on a model file's path or on a ``ModelProto``."""
    import onnxruntime as ort

    source = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def _ort_row_quantizer():
    """ORT's DynamicQuantizeLinear as a session: one row -> (uint8 row, scale, zero point)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])], "dql",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
                              [helper.make_tensor_value_info(n, t, None)
                               for n, t in (("q", TensorProto.UINT8), ("s", TensorProto.FLOAT),
                                            ("z", TensorProto.UINT8))])
    sess = _session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    return lambda row: sess.run(None, {"x": row})


def _weights(path):
    """The int8 weight, its per-channel scales and zero points as ``quantize_dynamic`` wrote them."""
    import onnx
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    return inits["w_quantized"], inits["w_scale"], inits["w_zero_point"]


@pytest.fixture(scope="module")
def layer(tmp_path_factory):
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.2, (K, N)).astype(np.float32)
    b = rng.normal(0, 0.1, N).astype(np.float32)
    folder = tmp_path_factory.mktemp("per_token")
    _prelude(folder / "fp32.onnx", w, b)
    for grid in ("token", "tensor"):
        quantize("transformer", folder / "fp32.onnx", folder / f"{grid}.onnx", "int8", activations=grid)
    return folder, w, b


def _rows(rng, shape):
    """Heavy-tailed rows: each row's magnitude differs by up to 1000x, some rows all positive, one all zero."""
    x = rng.normal(0, 1, shape).astype(np.float32) * np.exp(rng.uniform(-3.5, 3.5, shape[:-1] + (1,)))
    x = x.astype(np.float32)
    x.reshape(-1, K)[1] = np.abs(x.reshape(-1, K)[1])  # min > 0: the grid still holds 0
    x.reshape(-1, K)[2] = 0.0
    return x


@pytest.mark.parametrize("shape", [(1, 7, K), (3, 5, K)])
def test_per_token_is_ort_dynamic_quantization_row_by_row(layer, shape):
    folder, _, b = layer
    x = _rows(np.random.default_rng(1), shape)
    got = _session(folder / "token.onnx").run(None, {"x": x})[0]

    quantize_row = _ort_row_quantizer()
    wq, ws, wz = _weights(folder / "token.onnx")
    w = (wq.astype(np.float64) - wz) * ws
    rows = []
    for row in x.reshape(-1, K):
        q, s, z = quantize_row(row)
        rows.append(((q.astype(np.float64) - z) * s) @ w)
    want = np.tanh(np.stack(rows).reshape(shape[:-1] + (N,)) + b)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


def test_per_token_beats_per_tensor_on_uneven_rows(layer):
    folder, w, b = layer
    x = _rows(np.random.default_rng(2), (1, 32, K))
    exact = np.tanh(x.astype(np.float64) @ w + b)
    err = {grid: np.abs(_session(folder / f"{grid}.onnx").run(None, {"x": x})[0] - exact)
           for grid in ("token", "tensor")}
    # small rows: per tensor, their values fall between a few grid steps of the largest row's range
    small = np.abs(x).max(-1)[0] < np.abs(x).max() / 100
    assert small.sum() >= 3
    assert err["token"][0][small].max() * 20 < err["tensor"][0][small].max()
    assert err["token"].max() <= err["tensor"].max()


def test_per_token_graph_is_what_ort_fuses_and_runs(layer, tmp_path):
    """The integer product stays ORT's u8s8 kernel (MatMulIntegerToFloat), no float MatMul on the weight."""
    import onnx
    import onnxruntime as ort

    folder, *_ = layer
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(folder / "token.onnx"), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert "MatMulIntegerToFloat" in ops and "MatMul" not in ops and "DynamicQuantizeLinear" not in ops
