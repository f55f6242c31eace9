"""How the Qwen-Image 2.1 transformer step's cost grows with size and resolution (issue 6): a ~0.6B scale
configuration, random weights (speed does not depend on them), fp32 vs the int8 recipe on ONNX Runtime.

    python benchmarks/bench_scale.py [--runs 3] [--threads N] [--work DIR] [--sizes 256x256,256x512,512x512]

The configuration is 2.1's architecture (single-stream blocks, SwiGLU x3, one shared modulation, 128-wide heads,
axes (16, 56, 56), 64 latent channels at 16x compression, patch 1) at width 1536 (12 heads), 19 blocks, text
states of width 1024: 0.60 B parameters. One step of the ``transformer`` graph (image tokens against the cached
text K/V of 128 text tokens, exactly the bundle's per-step graph) is exported per size through the exporter's own
``export_graph`` (static shapes, external data) and quantized with ``qwen_edge.quant.quantize(..., "int8")``.
Sizes: 256x256, 256x512 and 512x512 images = 256, 512 and 1024 latent tokens.

Per size: FLOPs per step counted from the graph (:mod:`qwen_edge.flops`; the int8 graph counts the same), the
GEMM peaks of :mod:`qwen_edge.peak` measured just before (same threads), then fp32 and int8 sessions (the
runtime's own session options) timed side by side, alternating, median of ``--runs`` after one warm-up each;
achieved GFLOP/s and its fraction of the fp32 and int8 GEMM peaks; the int8 output's PSNR vs fp32. At 512x512
the int8 step is also run under ORT's profiler: time per op type. Exports and quantized models are cached in
``--work`` (default: ``$QWEN_EDGE_CACHE/bench-scale``: 2.4 GB fp32 + 0.6 GB int8 per size); the whole run
took 11 min on 2 cores.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

LAYERS, HEADS, HEAD_DIM, CONTEXT, MLP_RATIO, CHANNELS = 19, 12, 128, 1024, 3, 64
TEXT_LEN = 128
SIZES = ((256, 256), (256, 512), (512, 512))  # 256, 512, 1024 latent tokens
PROFILE_SIZE = (512, 512)
INT8_PRODUCTS = ("MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulInteger")  # ORT's fused int8 GEMMs
SIGMA = 0.75


def config(layers: int = LAYERS):
    from qwen_edge.transformer_v2 import TransformerV2Config

    return TransformerV2Config(in_channels=CHANNELS, out_channels=CHANNELS, num_layers=layers, num_heads=HEADS,
                               head_dim=HEAD_DIM, context_dim=CONTEXT, mlp_ratio=MLP_RATIO, axes_dims=(16, 56, 56))


def dims(height: int, width: int, layers: int = LAYERS):
    from qwen_edge import iospec

    return iospec.Dims(family="qwen-image-2.1", height=height, width=width, text_len=TEXT_LEN, drop=0,
                       text_hidden=CONTEXT, z_channels=CHANNELS, image_channels=4, encoder_channels=3, heads=HEADS,
                       head_dim=HEAD_DIM, layers=layers)


def parameters(layers: int) -> int:
    import torch
    from qwen_edge.transformer_v2 import TransformerV2

    with torch.device("meta"):
        return sum(p.numel() for p in TransformerV2(config(layers)).parameters())


def export_sizes(work: Path, sizes, layers: int, log) -> None:
    """Export every size's step graph not yet in ``work`` (fp32, with its feed saved next to it)."""
    todo = [(h, w) for h, w in sizes if not (_path(work, h, w, "fp32").is_file() and _feed_path(work, h, w).is_file())]
    if not todo:
        return
    import torch
    from qwen_edge import iospec
    from qwen_edge.export.onnx import TransformerV21Graph, export_graph
    from qwen_edge.transformer_v2 import TransformerV2

    torch.manual_seed(0)
    model = TransformerV2(config(layers)).eval()  # torch's default init: random weights
    for h, w in tqdm(todo, desc="export fp32", unit="size", file=sys.stderr):
        d = dims(h, w, layers)
        feed = step_feed(model, d)
        start = time.perf_counter()
        path = _path(work, h, w, "fp32")
        path.parent.mkdir(parents=True, exist_ok=True)
        export_graph(TransformerV21Graph(model), iospec.transformer(d), feed, path, external_data=True)
        np.savez(_feed_path(work, h, w), **feed)
        log(f"exported {h}x{w} in {time.perf_counter() - start:.0f} s")
    del model
    gc.collect()


def step_feed(model, d) -> dict[str, np.ndarray]:
    """The transformer graph's inputs: random text states (128 tokens, no padding) turned into real text K/V by
    the model, random latents, sigma 0.75, the real rotary tables."""
    import torch
    from qwen_edge.runtimes.onnx import Feeds

    rng = np.random.default_rng(0)
    feeds = Feeds(d, {"axes_dims": list(model.config.axes_dims), "theta": model.config.theta})
    kv_feed, fixed = feeds.prompt(rng.standard_normal((1, TEXT_LEN, CONTEXT), dtype=np.float32))
    with torch.inference_mode():
        fixed["text_kv"] = model.encode_text(*(torch.from_numpy(kv_feed[k]) for k in
                                               ("text", "rope_cos", "rope_sin", "text_bias"))).numpy()
    latents = rng.standard_normal((1, d.tokens, d.token_channels), dtype=np.float32)
    return Feeds.step(fixed, latents, SIGMA)


def quantize_sizes(work: Path, sizes, log) -> dict:
    """int8 recipe of every size (cached); returns the quantizer's facts per size."""
    from qwen_edge.quant import quantize

    facts = {}
    for h, w in tqdm(sizes, desc="quantize int8", unit="size", file=sys.stderr):
        src, dst = _path(work, h, w, "fp32"), _path(work, h, w, "int8")
        stamp = dst.with_suffix(".json")
        if not (dst.is_file() and stamp.is_file()):
            start = time.perf_counter()
            stamp.unlink(missing_ok=True)
            result = quantize("transformer", src, dst, "int8")
            stamp.write_text(json.dumps(result))
            log(f"quantized {h}x{w} in {time.perf_counter() - start:.0f} s")
        facts[(h, w)] = json.loads(stamp.read_text())
    return facts


def measure(work: Path, h: int, w: int, threads: int, runs: int) -> dict:
    """Side-by-side fp32 / int8 step times at one size, FLOPs, peaks, PSNR."""
    import onnxruntime as ort
    from qwen_edge.flops import count
    from qwen_edge.peak import gemm_peaks
    from qwen_edge.quant.sensitivity import psnr
    from qwen_edge.runtimes.onnx import session_options

    paths = {r: _path(work, h, w, r) for r in ("fp32", "int8")}
    with np.load(_feed_path(work, h, w)) as data:
        feed = {k: data[k] for k in data.files}
    flops = {r: count(p) for r, p in paths.items()}
    peaks = gemm_peaks(threads)
    sessions, outputs, times = {}, {}, {r: [] for r in paths}
    for r, p in paths.items():
        start = time.perf_counter()
        sessions[r] = ort.InferenceSession(str(p), session_options(threads), providers=["CPUExecutionProvider"])
        load_s = time.perf_counter() - start
        outputs[r] = sessions[r].run(None, feed)[0]  # warm-up
        times[r + "_load_s"] = load_s
    for _ in tqdm(range(runs), desc=f"{h}x{w} fp32/int8", unit="run", file=sys.stderr, leave=False):
        for r, sess in sessions.items():
            start = time.perf_counter()
            sess.run(None, feed)
            times[r].append(time.perf_counter() - start)
    del sessions
    gc.collect()
    med = {r: statistics.median(times[r]) for r in paths}
    total = flops["fp32"].total
    return {"height": h, "width": w, "tokens": dims(h, w).tokens, "flops": total,
            "flops_weights": flops["fp32"].weights, "flops_int8_graph": flops["int8"].total,
            "flops_by_op": flops["fp32"].by_op, "gemm_peak_gflops": peaks, "step_s": med, "all_s": times,
            "gflops": {r: total / med[r] / 1e9 for r in paths},
            "fraction_of_fp32_peak": {r: total / med[r] / 1e9 / peaks["fp32"] for r in paths},
            "fraction_of_int8_peak": {r: total / med[r] / 1e9 / peaks["int8_ort"] for r in paths},
            "int8_speedup": med["fp32"] / med["int8"], "int8_psnr_db": psnr(outputs["fp32"], outputs["int8"])}


def profile(work: Path, h: int, w: int, threads: int, runs: int) -> dict:
    from qwen_edge.op_profile import profile_graph

    with np.load(_feed_path(work, h, w)) as data:
        feed = {k: data[k] for k in data.files}
    return profile_graph(_path(work, h, w, "int8"), feed, threads, runs)


def _path(work: Path, h: int, w: int, recipe: str) -> Path:
    return work / f"{h}x{w}" / f"transformer_{recipe}.onnx"


def _feed_path(work: Path, h: int, w: int) -> Path:
    return work / f"{h}x{w}" / "feed.npz"


def _sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        h, _, w = item.strip().partition("x")
        if not (h.isdigit() and w.isdigit()) or int(h) % 16 or int(w) % 16:
            raise SystemExit(f"bench_scale: --sizes takes HEIGHTxWIDTH multiples of 16, got {item!r}")
        out.append((int(h), int(w)))
    return out


def table(results: list[dict], params: int, layers: int, facts: dict, prof: dict | None, threads: int,
          runs: int) -> str:
    lines = [f"Qwen-Image 2.1 scale configuration: {params / 1e9:.2f} B parameters ({layers} blocks, width "
             f"{HEADS * HEAD_DIM}, {HEADS} heads x {HEAD_DIM}, text {TEXT_LEN} tokens), one transformer step, "
             f"{threads} threads, median of {runs} alternating runs",
             "",
             "| image | latent tokens | GFLOP/step | fp32 s/step | int8 s/step | int8 speed-up | int8 GFLOP/s | "
             "% of fp32 GEMM peak | % of int8 GEMM peak | int8 size | int8 PSNR vs fp32 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        p = r["gemm_peak_gflops"]
        ratio = facts[(r["height"], r["width"])]["size_ratio"]
        lines.append(f"| {r['height']}x{r['width']} | {r['tokens']} | {r['flops'] / 1e9:.1f} | "
                     f"{r['step_s']['fp32']:.2f} "
                     f"| {r['step_s']['int8']:.2f} | {r['int8_speedup']:.2f}x | {r['gflops']['int8']:.1f} | "
                     f"{100 * r['fraction_of_fp32_peak']['int8']:.0f}% (of {p['fp32']:.1f}) | "
                     f"{100 * r['fraction_of_int8_peak']['int8']:.0f}% (of {p['int8_ort']:.1f}) | {ratio:.3f}x | "
                     f"{r['int8_psnr_db']:.1f} dB |")
    lines.append("")
    lines.append("fp32 step: " + ", ".join(f"{r['height']}x{r['width']} {r['gflops']['fp32']:.1f} GFLOP/s = "
                                           f"{100 * r['fraction_of_fp32_peak']['fp32']:.0f}% of the fp32 peak"
                                           for r in results))
    if prof:
        h, w = PROFILE_SIZE
        lines += ["", f"ORT profile of the int8 step at {h}x{w} ({prof['runs']} runs): {prof['step_ms']:.0f} ms "
                      f"per step, "
                      f"node kernels {prof['kernel_ms']:.0f} ms, matrix ops {prof['matrix_ms']:.0f} ms "
                      f"({100 * prof['matrix_ms'] / prof['step_ms']:.0f}%)", "",
                  "| op type | ms/step | % of step | calls/step |", "|---|---|---|---|"]
        for o in prof["ops"][:10]:
            lines.append(f"| {o['op']} | {o['ms']:.1f} | {o['pct']:.1f}% | {o['calls']} |")
        rest = prof["ops"][10:]
        if rest:
            lines.append(f"| {len(rest)} other op types | {sum(o['ms'] for o in rest):.1f} | "
                         f"{sum(o['pct'] for o in rest):.1f}% | {sum(o['calls'] for o in rest)} |")
        at = next((r for r in results if (r["height"], r["width"]) == PROFILE_SIZE), None)
        if at:
            lines += ["", time_split(prof, at)]
    return "\n".join(lines)


def time_split(prof: dict, r: dict) -> str:
    """Where the int8 step's time goes: the int8 weight products, the fp32 attention products, the rest."""
    ms = {o["op"]: o["ms"] for o in prof["ops"]}
    linear = sum(ms.get(op, 0.0) for op in INT8_PRODUCTS)
    attention = sum(ms.get(op, 0.0) for op in ("MatMul", "FusedMatMul"))  # what the int8 recipe leaves in fp32
    rest = prof["step_ms"] - linear - attention
    w, a = r["flops_weights"], r["flops"] - r["flops_weights"]
    peaks = r["gemm_peak_gflops"]
    return (f"Where the int8 step goes: weight products (int8 kernels {', '.join(INT8_PRODUCTS)}) "
            f"{w / 1e9:.0f} GFLOP in {linear:.0f} ms = {w / linear / 1e6:.0f} GFLOP/s "
            f"({100 * w / linear / 1e6 / peaks['int8_ort']:.0f}% of the int8 peak), "
            f"{100 * linear / prof['step_ms']:.0f}% of the step; attention products (activation x activation, "
            f"fp32 MatMul/FusedMatMul) {a / 1e9:.0f} GFLOP in {attention:.0f} ms = {a / attention / 1e6:.0f} GFLOP/s "
            f"({100 * a / attention / 1e6 / peaks['fp32']:.0f}% of the fp32 peak), "
            f"{100 * attention / prof['step_ms']:.0f}% of the step; everything else (element-wise, norms, softmax, "
            f"activation quantization, copies) {rest:.0f} ms, {100 * rest / prof['step_ms']:.0f}%.")


def main(argv: list[str] | None = None) -> int:
    from qwen_edge.bench import machine
    from qwen_edge.runtimes.onnx import default_cache_dir, physical_cores

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="timed steps per recipe and size (default 3)")
    ap.add_argument("--threads", type=int, help="intra-op threads (default: the physical cores)")
    ap.add_argument("--work", type=Path, help="cache of exported/quantized graphs (default "
                    "$QWEN_EDGE_CACHE/bench-scale)")
    ap.add_argument("--sizes", default=",".join(f"{h}x{w}" for h, w in SIZES))
    ap.add_argument("--profile-runs", type=int, default=2, help="profiled int8 steps at 512x512 (0: no profile)")
    ap.add_argument("--layers", type=int, default=LAYERS, help=f"transformer blocks (default {LAYERS}: 0.6 B; fewer "
                    "for a quick look)")
    ap.add_argument("--json", type=Path, help="also write every figure here")
    args = ap.parse_args(argv)
    threads = args.threads or physical_cores()
    work = (args.work or default_cache_dir() / "bench-scale") / f"{args.layers}-layers"
    sizes = _sizes(args.sizes)

    def log(msg: str) -> None:
        print(f"bench_scale: {msg}", file=sys.stderr)

    start = time.perf_counter()
    export_sizes(work, sizes, args.layers, log)
    facts = quantize_sizes(work, sizes, log)
    params = parameters(args.layers)
    results = []
    for h, w in sizes:
        results.append(measure(work, h, w, threads, args.runs))
        log(f"{h}x{w}: fp32 {results[-1]['step_s']['fp32']:.2f} s, int8 {results[-1]['step_s']['int8']:.2f} s")
    prof = None
    if args.profile_runs and PROFILE_SIZE in sizes:
        prof = profile(work, *PROFILE_SIZE, threads, args.profile_runs)
    print(table(results, params, args.layers, facts, prof, threads, args.runs))
    info = machine()
    print(f"\n{info['cpu']}, {info['physical_cores']} cores, load average {info['load_average_1min']} at the end; "
          f"total {time.perf_counter() - start:.0f} s")
    if args.json:
        report = {"parameters": params, "layers": args.layers, "threads": threads, "runs": args.runs,
                  "machine": info, "results": results,
                  "quant": {f"{h}x{w}": f for (h, w), f in facts.items()}, "profile_int8": prof}
        args.json.write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
