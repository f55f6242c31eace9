"""ONNX Runtime's profiler, summarised per op type: where a graph's time goes (``qwen-edge bench --profile``).

:func:`profile_graph` runs a graph under ``SessionOptions.enable_profiling`` with the runtime's own session
options; :func:`summarize_profile` turns ORT's Chrome-trace events into milliseconds per op type per run and
the share of the step each takes. Torch-free.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

from .errors import InputError

# Op types whose time counts as matrix work in a profile (ORT fuses MatMul+Add into FusedMatMul / Gemm, the int8
# recipe's MatMulInteger into DynamicQuantizeMatMul / MatMulIntegerToFloat, NCHWc convolutions keep "Conv").
MATRIX_OPS = ("MatMul", "Gemm", "MatMulInteger", "QLinearMatMul", "FusedMatMul", "MatMulNBits",
              "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "Conv", "ConvInteger", "QLinearConv", "FusedConv",
              "NhwcConv", "ConvTranspose", "Attention", "MultiHeadAttention")


def profile_graph(model: Path, feed: dict, threads: int, runs: int) -> dict:
    """Run ``model`` ``runs`` times (after one warm-up) under ORT's profiler with the runtime's session options;
    :func:`summarize_profile` of what it recorded."""
    import onnxruntime as ort

    from .runtimes.onnx import session_options

    with tempfile.TemporaryDirectory(prefix="qwen-edge-profile.") as tmp:
        so = session_options(threads)
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "profile")
        sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        for _ in range(1 + runs):
            sess.run(None, {n: feed[n] for n in names})
        events = json.loads(Path(sess.end_profiling()).read_text())
    return summarize_profile(events, skip=1)


def summarize_profile(events: list[dict], skip: int = 1) -> dict:
    """ORT profile events -> time per op type per run: {"runs", "step_ms" (median model_run), "kernel_ms" (sum
    of node kernels per run), "matrix_ms" (of which :data:`MATRIX_OPS`), "ops": [{"op", "ms", "pct", "calls"}]
    descending, "pct" of the step}. The first ``skip`` runs (warm-up) are left out."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])[skip:]
    if not runs:
        raise InputError("the profile holds no measured model_run")
    start = runs[0]["ts"]
    per_op: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= start:
            op = e.get("args", {}).get("op_name", "?")
            per_op[op][0] += e["dur"]
            per_op[op][1] += 1
    n = len(runs)
    step_ms = statistics.median(e["dur"] for e in runs) / 1e3
    ops = sorted(({"op": op, "ms": us / n / 1e3, "calls": calls // n} for op, (us, calls) in per_op.items()),
                 key=lambda o: -o["ms"])
    for o in ops:
        o["pct"] = 100.0 * o["ms"] / step_ms
    kernel = sum(o["ms"] for o in ops)
    matrix = sum(o["ms"] for o in ops if o["op"] in MATRIX_OPS)
    return {"runs": n, "step_ms": step_ms, "kernel_ms": kernel, "matrix_ms": matrix, "ops": ops}
