"""This CPU's measured matrix-multiply peak: GEMM microbenchmarks the bench sets achieved FLOP/s against.

Three figures, each the median GFLOP/s of repeated ``n x n x n`` products (2*n^3 FLOPs) after a warm-up:

- ``fp32_numpy``: ``a @ b`` in NumPy (its BLAS, limited to ``threads`` with threadpoolctl when installed);
- ``fp32_ort``: an ONNX Runtime ``MatMul`` session (MLAS, ``threads`` intra-op threads, the options the
  runtime's own sessions use);
- ``int8_ort``: an ONNX Runtime ``MatMulInteger`` session, uint8 activations x int8 constant weights (the
  u8s8 kernel the int8 recipe's ``DynamicQuantizeMatMul`` runs), int32 out; "FLOPs" here are integer
  multiply-adds counted the same way.

``fp32`` is the larger fp32 figure (the peak the bench quotes fractions against). The ORT figures need the
``onnx`` package to build their one-node graphs; without it they are None. No torch.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

DEFAULT_N = 2048
MIN_SECONDS = 0.5  # repeat each product until about this much time is measured (at least 3 runs)


def gemm_peaks(threads: int, n: int = DEFAULT_N) -> dict:
    """{"n", "threads", "fp32_numpy", "fp32_ort", "int8_ort", "fp32"} in GFLOP/s (None where unavailable)."""
    out = {"n": n, "threads": threads, "fp32_numpy": numpy_gflops(n, threads)}
    out.update(ort_gflops(n, threads))
    out["fp32"] = max(v for v in (out["fp32_numpy"], out["fp32_ort"]) if v is not None)
    return out


def numpy_gflops(n: int, threads: int) -> float:
    """fp32 ``a @ b`` throughput of NumPy's BLAS on ``threads`` threads (when threadpoolctl can set them)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    with _blas_threads(threads):
        return 2.0 * n**3 / median_seconds(lambda: a @ b) / 1e9


def ort_gflops(n: int, threads: int) -> dict:
    """{"fp32_ort", "int8_ort"}: ONNX Runtime MatMul (fp32) and MatMulInteger (u8 x s8 -> s32) throughput."""
    try:
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return {"fp32_ort": None, "int8_ort": None}
    import onnxruntime as ort

    rng = np.random.default_rng(1)
    cases = {
        "fp32_ort": ("MatMul", TensorProto.FLOAT, TensorProto.FLOAT, rng.standard_normal((n, n), dtype=np.float32),
                     rng.standard_normal((n, n), dtype=np.float32)),
        "int8_ort": ("MatMulInteger", TensorProto.UINT8, TensorProto.INT32,
                     rng.integers(0, 256, (n, n), dtype=np.uint8), rng.integers(-127, 128, (n, n), dtype=np.int8)),
    }
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (op, a_type, c_type, a, b) in cases.items():
            graph = helper.make_graph([helper.make_node(op, ["a", "b"], ["c"])], name,
                                      [helper.make_tensor_value_info("a", a_type, [n, n])],
                                      [helper.make_tensor_value_info("c", c_type, [n, n])],
                                      [numpy_helper.from_array(b, "b")])
            path = Path(tmp) / f"{name}.onnx"
            path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString())
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            out[name] = 2.0 * n**3 / median_seconds(lambda s=sess, x=a: s.run(None, {"a": x})) / 1e9
    return out


def median_seconds(fn: Callable[[], object], min_seconds: float = MIN_SECONDS, min_runs: int = 3) -> float:
    """Median wall time of ``fn()`` after one warm-up call, over at least ``min_runs`` calls and about
    ``min_seconds`` in total."""
    fn()
    times = []
    while len(times) < min_runs or sum(times) < min_seconds:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextlib.contextmanager
def _blas_threads(threads: int):
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=threads, user_api="blas"):
        yield
