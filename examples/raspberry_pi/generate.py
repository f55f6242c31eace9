"""Generate an image from a qwen-edge bundle on a Raspberry Pi (or any ARM64 / x86-64 CPU), without PyTorch.

Uses only the torch-free runtime (``qwen_edge.runtimes.onnx``: ONNX Runtime, NumPy, tokenizers, Pillow) with
``low_memory=True``: one component's session in memory at a time, ONNX Runtime's memory arena off. See README.md
next to this file for the whole path (export on a build machine, copy, run).

    python generate.py BUNDLE "a red circle above a blue square" --seed 1 --output out.png [--threads 4]

Prints where each second went (load, text encoder, steps, decoder) and the peak resident memory on stderr.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

from qwen_edge.errors import QwenEdgeError, UsageError
from qwen_edge.image import save_png
from qwen_edge.pipeline import Request
from qwen_edge.runtimes.onnx import pipeline


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, as the qwen-edge command line does
        raise UsageError(message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path, help="a bundle from qwen-edge export (int8 recommended on a Pi)")
    p.add_argument("prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", "-o", type=Path, default=Path("out.png"))
    p.add_argument("--threads", type=int, help="ONNX Runtime threads (default: the physical cores, 4 on a Pi 4/5)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 checks (saves a read of every file)")
    args = p.parse_args(argv)
    if args.output.suffix.lower() != ".png":
        raise UsageError(f"--output must be a .png file, not {args.output.name!r}")
    if args.seed < 0 or (args.threads is not None and args.threads < 1):
        raise UsageError("--seed must be >= 0 and --threads >= 1")
    return args


def generate(args: argparse.Namespace) -> dict[str, float]:
    """Load, generate, save; returns seconds per phase."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    pipe = pipeline(args.bundle, low_memory=True, verify=not args.no_verify, threads=args.threads)
    height, width = pipe.spec.fixed_size
    steps = pipe.components.bundle.manifest.sampler.steps
    times, last = {"check bundle": time.perf_counter() - t0}, time.perf_counter()
    req = Request(prompt=args.prompt, height=height, width=width, steps=steps, seed=args.seed)
    image = None
    for step in tqdm(pipe.generate(req), total=steps, desc="sampling", unit="step", leave=False,
                     disable=not sys.stderr.isatty()):
        now = time.perf_counter()
        name = "text encoder + step 1" if step.index == 0 else f"step {step.index + 1}"
        times[name if step.image is None else f"{name} + decoder"] = now - last
        last, image = now, step.image
    for note in pipe.warnings:
        print(f"generate.py: warning: {note}", file=sys.stderr)
    save_png(image, args.output)
    times["total"] = time.perf_counter() - t0
    return times


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        times = generate(args)
    except QwenEdgeError as e:  # bad input: one line, the qwen-edge exit code (2 usage, 3 input, 4 integrity...)
        print(f"generate.py: error: {e}", file=sys.stderr)
        return e.exit_code
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    phases = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in times.items())
    print(f"generate.py: {phases}; peak RSS {peak_mb:.0f} MB", file=sys.stderr)
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
