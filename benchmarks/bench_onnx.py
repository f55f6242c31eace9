"""torch eager fp32 pipeline vs the ONNX Runtime fp32 bundle, side by side in one run (issue 4).

    python benchmarks/bench_onnx.py                              # the embedded default, else a tiny 2.1 checkpoint
    python benchmarks/bench_onnx.py --model DIR --height 256 --width 256 --runs 5
    python benchmarks/bench_onnx.py --bundle B --model DIR       # reuse an exported bundle of DIR

Exports the checkpoint to an fp32 bundle (unless ``--bundle``), then times end-to-end generations (tokenize ->
encode -> ``--steps`` sampler steps -> decode) of the same prompt and noise on both runtimes, alternating,
after one warm-up each; reports the medians, the speed-up, the images' PSNR, the bundle's size, and the peak
RSS of one generation per runtime (and ``--low-memory``) measured in fresh subprocesses. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROMPT = "a large red circle above a small blue square on a black background"


def default_model(scratch: Path) -> tuple[Path, str]:
    """The embedded default if it exists yet, else a random tiny 2.1 checkpoint (built offline)."""
    from qwen_edge.errors import IntegrityError
    from qwen_edge.spec import default_model as embedded

    try:
        return embedded(), "embedded default"
    except IntegrityError:
        from qwen_edge import testing

        return testing.tiny_checkpoint("qwen-image-2.1", scratch / "tiny21"), "tiny random 2.1 (testing.tiny_checkpoint)"


def median_times(pipes: dict, req, runs: int) -> dict[str, list[float]]:
    times = {name: [] for name in pipes}
    for name, pipe in pipes.items():  # warm-up: first-call allocations, ORT's lazy session creation
        _generate(pipe, req)
    for _ in range(runs):  # alternate so background load hits both alike
        for name, pipe in pipes.items():
            start = time.perf_counter()
            _generate(pipe, req)
            times[name].append(time.perf_counter() - start)
    return times


def _generate(pipe, req) -> np.ndarray:
    *_, last = pipe.generate(req)
    return last.image


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def bundle_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def peak_rss(runtime: str, model: Path, bundle: Path, height: int, width: int, steps: int, low_memory: bool = False) -> float:
    """Peak RSS (MB) of a fresh process generating one image: its VmHWM (ru_maxrss would carry over the
    parent's high-water mark through fork)."""
    code = f"""
from qwen_edge.pipeline import Request
if {runtime!r} == "torch":
    from qwen_edge.pipeline import Pipeline
    pipe = Pipeline.from_pretrained({str(model)!r})
else:
    from qwen_edge.runtimes.onnx import pipeline
    pipe = pipeline({str(bundle)!r}, low_memory={low_memory}, cache=False)
for step in pipe.generate(Request({PROMPT!r}, height={height}, width={width}, steps={steps}, seed=0)):
    pass
print(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 1024  # kB


def main(argv: list[str] | None = None) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix="bench_onnx."))
    try:
        return run(argv, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run(argv: list[str] | None, scratch: Path) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="checkpoint directory (default: embedded default, else tiny 2.1)")
    ap.add_argument("--bundle", type=Path, help="an existing fp32 bundle of --model (default: export one)")
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--text-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, help="threads for both runtimes (default: torch's default, ORT's "
                    "physical cores)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    args = ap.parse_args(argv)

    from qwen_edge.export.onnx import export_bundle
    from qwen_edge.pipeline import Pipeline, Request
    from qwen_edge.runtimes.onnx import pipeline as onnx_pipeline
    from qwen_edge.spec import ModelSpec

    model, what = (args.model, str(args.model)) if args.model else default_model(scratch)
    size = ModelSpec.from_checkpoint(model).default_size
    height, width = args.height or size, args.width or size
    bundle, export_s = args.bundle, None
    if bundle is None:
        bundle = scratch / "bundle"
        start = time.perf_counter()
        export_bundle(bundle, model, height=height, width=width, text_len=args.text_len, steps=args.steps)
        export_s = time.perf_counter() - start
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    pipes = {"torch_fp32_eager": Pipeline.from_pretrained(model),
             "onnx_fp32_bundle": onnx_pipeline(bundle, cache_dir=scratch / "ort-cache", threads=args.threads)}
    req = Request(PROMPT, height=height, width=width, steps=args.steps, seed=0)
    times = median_times(pipes, req, args.runs)
    images = {name: _generate(pipe, req) for name, pipe in pipes.items()}
    med = {name: statistics.median(t) for name, t in times.items()}
    report = {
        "model": what, "load_average_1min": round(__import__("os").getloadavg()[0], 2), "height": height, "width": width, "steps": args.steps, "runs": args.runs,
        "threads": {"torch": __import__("torch").get_num_threads(),
                    "onnxruntime": pipes["onnx_fp32_bundle"].components.threads or "physical cores"},
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "all_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "speedup_onnx_vs_torch": round(med["torch_fp32_eager"] / med["onnx_fp32_bundle"], 2),
        "image_psnr_db": round(psnr(images["onnx_fp32_bundle"], images["torch_fp32_eager"]), 2),
        "bundle_bytes": bundle_bytes(bundle),
        "export_s": None if export_s is None else round(export_s, 1),
    }
    if not args.no_memory:
        from qwen_edge.bundle import load

        comps = load(bundle).manifest.components.values()
        largest = max(sum((bundle / f).stat().st_size for f in c.files) for c in comps)
        report["peak_rss_mb"] = {
            "torch": round(peak_rss("torch", model, bundle, height, width, args.steps), 1),
            "onnx": round(peak_rss("onnx", model, bundle, height, width, args.steps), 1),
            "onnx_low_memory": round(peak_rss("onnx", model, bundle, height, width, args.steps, True), 1),
            "largest_component_mb": round(largest / 2**20, 2),
        }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
