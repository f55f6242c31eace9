"""One full-width Qwen-Image v1 transformer block at 256x256: fp32 vs int8 ONNX Runtime, per step.

The bar (from the issue's discussion): a well-optimised C++ runtime runs one such block (dim 3072,
24 heads x 128, FFN 12288; 256 image + 160 text tokens) in ~2.35 s per step with bf16 weights on a
2-core AVX2 machine; qwen-edge's int8 path should clearly beat it with int8 *compute*.

What runs: ``qwen_edge.transformer_v1.TransformerV1`` with ``num_layers=1`` and the real widths (random
weights, torch's default init): the block with the model's stem (time embedding, modulation, input
projections), exported as the first chunk of a deeper model (``qwen_edge.export.coreml_chunks``'s
``TransformerV1Chunk``, IOSpec ``iospec.chunk``), which returns both streams. Exported as a whole 1-layer
model the graph would lose the block's text stream as dead code (its text MLP and output projection,
~27 of the ~96 GFLOP), which every block but the last of the real 60 computes. Quantized with
``qwen_edge.quant.quantize``. Sessions get the same threads; the recipes run interleaved (fp32, int8,
fp32, ...) so machine load hits both alike; the figure is the median of ``--runs``. Achieved GFLOP/s
counts the graph's MatMul/Gemm FLOPs (shape inference on the exported model) and is set against an
fp32 GEMM of the block's largest shape measured in the same run.

    python benchmarks/bench_int8_block.py [--runs 7] [--threads 2] [--recipes int8,int8:tensor,int4] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

BAR_SECONDS = 2.35  # the C++ runtime, bf16 weights, one block at 256x256, per step
HEIGHT = WIDTH = 256
TEXT_LEN = 160


def dims():
    from qwen_edge import iospec

    return iospec.Dims(family="qwen-image", height=HEIGHT, width=WIDTH, text_len=TEXT_LEN, drop=34, text_hidden=3584,
                       z_channels=16, image_channels=3, encoder_channels=3, heads=24, head_dim=128, layers=2)


def block_io():
    """Block 0 of 2: the transformer's inputs in, the carry (image and text streams, temb) out."""
    from qwen_edge import iospec

    return iospec.chunk(dims(), "transformer", 0, 1, 2)


def example_feeds(spec, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs in the IOSpec's order: random latents/text, sigma 0.75, real rotary tables, no padding."""
    from qwen_edge.rope_v1 import rope_v1

    rng = np.random.default_rng(seed)
    h, w = HEIGHT // 16, WIDTH // 16
    arrays = [rng.standard_normal(spec.inputs[0].shape, dtype=np.float32),
              rng.standard_normal(spec.inputs[1].shape, dtype=np.float32),
              np.array([0.75], np.float32), *rope_v1(TEXT_LEN, h, w),
              np.zeros(spec.inputs[-1].shape, np.float32)]
    return {t.name: a for t, a in zip(spec.inputs, arrays)}


def export_block(path: Path, feeds: dict[str, np.ndarray]) -> None:
    import torch
    from qwen_edge.export.coreml_chunks import TransformerV1Chunk
    from qwen_edge.export.onnx import export_graph
    from qwen_edge.transformer_v1 import TransformerV1, TransformerV1Config, _Block

    cfg = TransformerV1Config(num_layers=1)
    torch.manual_seed(0)
    model = TransformerV1(cfg).eval()
    with torch.device("meta"):  # a stand-in second block, never run: makes block 0 a middle block
        model.transformer_blocks.append(_Block(cfg))
    export_graph(TransformerV1Chunk(model, 0, 1).eval(), block_io(), feeds, path, external_data=True)


def matmul_flops(path: Path) -> float:
    """2*M*K*N summed over the graph's matrix products (:func:`qwen_edge.flops.count`, shapes from ONNX shape
    inference; the block has no convolutions)."""
    from qwen_edge.flops import count

    return count(path).total


def session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def gemm_gflops(threads: int, m: int = 416, k: int = 3072, n: int = 12288, runs: int = 5) -> dict[str, float]:
    """GEMM throughput of ORT on the block's largest shape (same threads): fp32 MatMul, and the same
    MatMul through the int8 recipe (dynamic u8s8)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from qwen_edge.quant import quantize

    rng = np.random.default_rng(1)
    b = numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32) * 0.02, "b")
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"], name="gemm")], "gemm",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [m, n])], [b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    a = rng.standard_normal((m, k), dtype=np.float32)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"fp32": Path(tmp) / "gemm.onnx", "int8": Path(tmp) / "gemm_int8.onnx"}
        onnx.save(model, str(paths["fp32"]))
        quantize("transformer", paths["fp32"], paths["int8"], "int8")
        for name, path in paths.items():
            sess = session(path, threads)
            sess.run(None, {"a": a})
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                sess.run(None, {"a": a})
                times.append(time.perf_counter() - t)
            out[name] = 2.0 * m * k * n / statistics.median(times) / 1e9
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--recipes", default="int8", help="comma-separated quant recipes to set against fp32; "
                        "int8:tensor is int8 with quantize_dynamic's per-tensor activations (default: per token)")
    parser.add_argument("--workdir", type=Path, help="keep the exported models here (default: a temp dir)")
    args = parser.parse_args(argv)

    from qwen_edge.quant import quantize
    from qwen_edge.quant.sensitivity import psnr

    recipes = [r for r in args.recipes.split(",") if r]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        spec = block_io()
        feeds = example_feeds(spec)
        models = {"fp32": work / "block_fp32.onnx"}
        if not models["fp32"].is_file():
            t = time.perf_counter()
            export_block(models["fp32"], feeds)
            print(f"exported in {time.perf_counter() - t:.0f} s")
        facts = {}
        for recipe in recipes:
            models[recipe] = work / f"block_{recipe.replace(':', '_')}.onnx"
            t = time.perf_counter()
            name, _, grid = recipe.partition(":")
            facts[recipe] = quantize("transformer", models["fp32"], models[recipe], name,
                                     **({"activations": grid} if grid else {}))
            print(f"{recipe}: quantized in {time.perf_counter() - t:.0f} s, ops {facts[recipe]['ops']}")
        flops = matmul_flops(models["fp32"])
        sessions = {name: session(path, args.threads) for name, path in models.items()}
        outputs = {name: s.run(None, feeds) for name, s in sessions.items()}  # warm-up
        times = {name: [] for name in sessions}
        for _ in range(args.runs):
            for name, s in sessions.items():
                t = time.perf_counter()
                s.run(None, feeds)
                times[name].append(time.perf_counter() - t)
        gemm = gemm_gflops(args.threads)
    report(models, facts, times, outputs, flops, gemm, args, psnr)
    return 0


def report(models, facts, times, outputs, flops, gemm, args, psnr) -> None:
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"\nOne v1 block (dim 3072, FFN 12288) at {HEIGHT}x{WIDTH}: 256 image + {TEXT_LEN} text tokens, "
          f"{args.threads} threads, median of {args.runs}; MatMul FLOPs {flops / 1e9:.1f} G; ORT GEMM "
          f"416x3072x12288: fp32 {gemm['fp32']:.1f} GFLOP/s, int8 {gemm['int8']:.1f} GFLOP/s")
    print("| model | s/step | vs fp32 | vs 2.35 s bar | GFLOP/s | % of fp32 GEMM | size ratio | PSNR vs fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, t in med.items():
        ratio = facts[name]["size_ratio"] if name in facts else 1.0
        quality = min(psnr(r, o) for r, o in zip(outputs["fp32"], outputs[name])) if name != "fp32" else float("inf")
        print(f"| {name} | {t:.3f} | {med['fp32'] / t:.2f}x | {BAR_SECONDS / t:.2f}x | {flops / t / 1e9:.1f} | "
              f"{100 * flops / t / 1e9 / gemm['fp32']:.0f}% | {ratio:.3f} | {quality:.1f} dB |")
    print(json.dumps({"seconds": med, "all": times, "flops": flops, "gemm_gflops": gemm, "threads": args.threads}))


if __name__ == "__main__":
    raise SystemExit(main())
