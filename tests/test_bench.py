"""qwen-edge bench (issue 6): the FLOP counter on graphs of known cost, the bench on a tiny bundle, bad input.

Speed figures are never asserted here (they belong to benchmarks/ and the README); only that every figure is
present, positive and finite, and that the counts are exact.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
from qwen_edge import bench as bench_mod
from qwen_edge import bundle as bundle_mod
from qwen_edge import flops
from qwen_edge.op_profile import summarize_profile
from qwen_edge.cli import main

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

F = TensorProto.FLOAT


def _weight(name: str, *shape: int, seed: int = 0):
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.1, name)


def _model(nodes, inputs, outputs, inits, opset: int = 21, domains=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    ops = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)]
    return helper.make_model(graph, opset_imports=ops)


def _mlp_attention_graph():
    """x (1, 16, 64) -> MatMul (64, 128) -> Relu -> MatMul (128, 64) = y; y @ y^T (batched activations)."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="down"),
             helper.make_node("Transpose", ["y"], ["yt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["y", "yt"], ["s"], name="scores")]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, [1, 16, 64])],
                   [helper.make_tensor_value_info("s", F, [1, 16, 16])],
                   [_weight("w1", 64, 128), _weight("w2", 128, 64)])
    want = 2 * 16 * 128 * 64 + 2 * 16 * 64 * 128 + 2 * 16 * 16 * 64  # up, down, scores
    return model, want


def test_flops_of_matrix_products_are_exact():
    model, want = _mlp_attention_graph()
    counted = flops.count(model)
    assert counted.total == want == 557056
    assert counted.by_op == {"MatMul": want} and counted.nodes == 3 and counted.unknown == ()
    assert counted.weights == 2 * 2 * 16 * 128 * 64  # up and down; the scores multiply two activations


def test_flops_of_gemm_and_convolutions_are_exact():
    nodes = [helper.make_node("Gemm", ["a", "b"], ["g"], transA=1),  # a (32, 8) transposed: K = 32
             helper.make_node("Conv", ["x", "wc"], ["c"], pads=[1, 1, 1, 1]),  # (1, 3, 8, 8) -> (1, 4, 8, 8)
             helper.make_node("Conv", ["c", "wd"], ["d"], pads=[1, 1, 1, 1], group=4),  # depthwise 3x3
             helper.make_node("ConvTranspose", ["d", "wt"], ["u"], strides=[2, 2])]  # (1, 4, 8, 8) -> (1, 2, 16, 16)
    inputs = [helper.make_tensor_value_info("a", F, [32, 8]), helper.make_tensor_value_info("x", F, [1, 3, 8, 8])]
    outputs = [helper.make_tensor_value_info("g", F, [8, 10]), helper.make_tensor_value_info("u", F, [1, 2, 16, 16])]
    weights = [_weight("b", 32, 10), _weight("wc", 4, 3, 3, 3), _weight("wd", 4, 1, 3, 3), _weight("wt", 4, 2, 2, 2)]
    model = _model(nodes, inputs, outputs, weights)
    counted = flops.count(model)
    gemm, conv, depthwise, transposed = 2 * 80 * 32, 2 * 256 * 27, 2 * 256 * 9, 2 * 256 * 8
    assert counted.by_op == {"Gemm": gemm, "Conv": conv + depthwise, "ConvTranspose": transposed}
    assert counted.total == gemm + conv + depthwise + transposed


def test_flops_propagate_through_onnx_runtime_contrib_ops():
    """ONNX's shape inference does not know MatMulNBits: its output shape comes from the counter, and the
    MatMul after it is counted too."""
    blob = numpy_helper.from_array(np.zeros((32, 2, 16), np.uint8), "q")  # N 32, K 64 in 2 blocks of 32, 4 bits
    nodes = [helper.make_node("MatMulNBits", ["x", "q", "scales"], ["h"], domain="com.microsoft", K=64, N=32, bits=4,
                              block_size=32),
             helper.make_node("MatMul", ["h", "w"], ["y"])]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, [1, 16, 64])],
                   [helper.make_tensor_value_info("y", F, None)],
                   [blob, numpy_helper.from_array(np.ones(64, np.float32), "scales"), _weight("w", 32, 8)],
                   domains=("com.microsoft",))
    counted = flops.count(model)
    assert counted.by_op == {"MatMulNBits": 2 * 16 * 32 * 64, "MatMul": 2 * 16 * 8 * 32} and counted.unknown == ()


@pytest.mark.parametrize("recipe", ["int8", "int4"])
def test_quantized_graphs_count_the_same_flops(recipe, tmp_path):
    """The quantizers rewrite the products (MatMulIntegerToFloat, MatMulNBits), not the work: same count as fp32."""
    from qwen_edge.quant import quantize

    model, want = _mlp_attention_graph()
    src, dst = tmp_path / "fp32.onnx", tmp_path / f"{recipe}.onnx"
    onnx.save(model, str(src))
    quantize("transformer", src, dst, recipe)
    ops = {n.op_type for n in onnx.load(str(dst)).graph.node}
    assert ("MatMulIntegerToFloat" if recipe == "int8" else "MatMulNBits") in ops
    counted = flops.count(dst)
    assert counted.total == want and counted.weights == flops.count(src).weights


def test_profile_summary_per_op_type():
    events = [{"cat": "Session", "name": "model_run", "ts": 0, "dur": 1000},  # warm-up, skipped
              {"cat": "Node", "name": "a_kernel_time", "ts": 10, "dur": 900, "args": {"op_name": "MatMul"}},
              {"cat": "Session", "name": "model_run", "ts": 2000, "dur": 100},
              {"cat": "Node", "name": "a_kernel_time", "ts": 2010, "dur": 60, "args": {"op_name": "MatMul"}},
              {"cat": "Node", "name": "b_kernel_time", "ts": 2070, "dur": 20, "args": {"op_name": "Softmax"}}]
    s = summarize_profile(events)
    assert s["runs"] == 1 and s["step_ms"] == pytest.approx(0.1)
    assert [(o["op"], round(o["pct"])) for o in s["ops"]] == [("MatMul", 60), ("Softmax", 20)]
    assert s["matrix_ms"] == pytest.approx(0.06) and s["kernel_ms"] == pytest.approx(0.08)


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_on_a_tiny_bundle(bundle21):
    runs = 2
    r = bench_mod.bench(bundle21, runs=runs, warmup=1, threads=1, profile=True, gemm_n=256)
    b = bundle_mod.load(bundle21)
    on_disk = sum(p.stat().st_size for p in bundle21.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert r["size_bytes"]["total"] == on_disk and set(r["size_bytes"]["components"]) == set(b.manifest.components)
    assert r["steps"] == b.manifest.sampler.steps and r["threads"] == 1
    cold = r["cold_start"]
    assert all(_positive(cold[k]) for k in ("s", "first_s", "imported_s", "loaded_s", "image_s"))
    assert cold["imported_s"] < cold["loaded_s"] < cold["s"] < cold["image_s"]
    lat = r["latency_s"]
    assert set(lat["components"]) == {"text_encoder", "text_kv", "transformer", "vae_decoder"}
    assert lat["components"]["transformer"]["n"] == runs * r["steps"] and lat["end_to_end"]["n"] == runs
    stats = [lat["end_to_end"], *lat["components"].values()]
    assert all(_positive(v["median"]) and v["min"] <= v["median"] for v in stats)
    rss = r["peak_rss_mb"]
    assert all(_positive(v) for v in rss.values()) and rss["baseline"] <= rss["generate"]
    assert set(r["flops"]) == set(b.manifest.components) and all(_positive(v) for v in r["flops"].values())
    assert r["flops"]["transformer"] == flops.count(bundle21 / "transformer.onnx").total
    assert all(_positive(r["gemm_peak_gflops"][k]) for k in ("fp32_numpy", "fp32_ort", "int8_ort", "fp32"))
    a = r["achieved"]
    assert _positive(a["transformer_step_gflops"]) and _positive(a["fraction_of_fp32_peak"])
    assert a["fraction_of_fp32_peak"] == pytest.approx(a["transformer_step_gflops"] / r["gemm_peak_gflops"]["fp32"])
    prof = r["profile"]["transformer"]
    assert prof["runs"] == runs and prof["ops"] and _positive(prof["step_ms"])
    assert 0 < prof["matrix_ms"] <= prof["kernel_ms"] <= 1.05 * prof["step_ms"]
    assert "MatMul" in {o["op"] for o in prof["ops"]}
    assert "transformer step" in bench_mod.format_report(r)


def test_bench_onnx_path_imports_no_torch(bundle21):
    code = ("import sys; from qwen_edge.bench import bench; "
            f"r = bench({str(bundle21)!r}, runs=1, warmup=0, threads=1, cold_start=False, memory=False, peak=False); "
            "assert r['flops']['transformer'] > 0; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.strip() == "[]"


def _one_line_error(capsys, code: int, rc: int, match: str) -> None:
    err = capsys.readouterr().err.strip()
    assert rc == code and err.startswith("qwen-edge: error:") and "\n" not in err and match in err, (rc, err)


def test_cli_bad_input(bundle21, tmp_path, capsys):
    _one_line_error(capsys, 4, main(["bench", "--bundle", str(tmp_path / "missing")]), "does not exist")
    tampered = tmp_path / "tampered"
    shutil.copytree(bundle21, tampered)
    data = bytearray((tampered / "transformer.onnx").read_bytes())
    data[-1] ^= 1
    (tampered / "transformer.onnx").write_bytes(bytes(data))
    _one_line_error(capsys, 4, main(["bench", "--bundle", str(tampered)]), "sha256")
    _one_line_error(capsys, 2, main(["bench", "--bundle", str(bundle21), "--runs", "0"]), "runs")
    _one_line_error(capsys, 2, main(["bench", "--bundle", str(bundle21), "--runtime", "torch", "--profile"]), "profile")
    _one_line_error(capsys, 2, main(["bench", "--bundle", str(bundle21), "--runtime", "torch", "--device", "npu"]),
                    "cpu only")
    _one_line_error(capsys, 2, main(["bench", "--bundle", str(bundle21), "--model", str(tmp_path)]), "--runtime torch")
    _one_line_error(capsys, 2, main(["bench"]), "--bundle")


def test_component_rss_reports_each_process_file_backed_pages(bundle21):
    from qwen_edge.fresh_process import component_rss, file_rss_mb, latency_feeds, peak_rss_mb

    here = file_rss_mb()
    assert here is None or 0 < here < peak_rss_mb()  # None only where /proc lacks RssFile
    files = {}
    feeds = latency_feeds(bundle21, threads=1)
    peaks = component_rss(bundle21, {"text_kv": feeds["text_kv"]}, threads=1, file_mb=files)
    assert set(peaks) == set(files) == {"baseline", "text_kv"}
    assert all(0 < files[k] < peaks[k] for k in peaks) and peaks["baseline"] <= peaks["text_kv"]
