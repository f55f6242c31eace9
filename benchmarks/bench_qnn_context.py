"""Precompiled QNN contexts (``export --target qnn --qnn-context``) vs compiling the QDQ graphs at load.

    python benchmarks/bench_qnn_context.py --bundle B [--runs 5]     # a QNN bundle exported with --qnn-context
    python benchmarks/bench_qnn_context.py [--model DIR] [--runs 5]   # exports one first (default: the embedded model)

Per component: the median time to open an NPU session (QNN execution provider, HTP backend, CPU fallback
disabled) from the EPContext model and from the QDQ graph, alternating, in this process. Then the first
image: a fresh pipeline opening every session and generating once, with the contexts and with the manifest's
contexts removed (a copy of the bundle), alternating; the two images must be identical. On x86 Linux the HTP
backend is an emulator: compile times are the host's, execution times say nothing about a phone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROMPT = "a large red circle above a small blue square on a black background"


def open_times(bundle: Path, runs: int) -> dict[str, dict[str, float]]:
    """Median seconds to open each component's NPU session from its context and from its graph."""
    from qwen_edge import bundle as bundle_mod
    from qwen_edge.export import qnn

    b = bundle_mod.load(bundle)
    out = {}
    for name, comp in b.manifest.components.items():
        files = {"context": b.path(comp.context["file"]), "graph": b.path(comp.file)}
        times = {kind: [] for kind in files}
        for _ in range(runs):
            for kind, path in files.items():
                start = time.perf_counter()
                qnn.session(path)
                times[kind].append(time.perf_counter() - start)
        out[name] = {kind: statistics.median(t) for kind, t in times.items()}
    return out


def without_contexts(bundle: Path, dst: Path) -> Path:
    shutil.copytree(bundle, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    for comp in manifest["components"].values():
        comp.pop("context", None)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def first_image(bundle: Path) -> tuple[float, np.ndarray]:
    from qwen_edge.pipeline import Request
    from qwen_edge.runtimes.onnx import pipeline

    start = time.perf_counter()
    pipe = pipeline(bundle, device="npu", cache=False)
    m = pipe.components.bundle.manifest
    *_, last = pipe.generate(Request(PROMPT, m.height, m.width, steps=m.sampler.steps, seed=0))
    return time.perf_counter() - start, last.image


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, help="a QNN bundle with contexts (default: export one)")
    p.add_argument("--model", help="checkpoint to export when no --bundle is given (default: the embedded model)")
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle
        if bundle is None:
            from qwen_edge.export.onnx import export_bundle

            bundle = Path(tmp) / "qnn"
            export_bundle(bundle, args.model, target="qnn", qnn_context=True,
                          log=lambda msg: print(msg, file=sys.stderr))
        opens = open_times(bundle, args.runs)
        plain = without_contexts(bundle, Path(tmp) / "plain")
        first = {"context": [], "graph": []}
        images = {}
        for _ in range(args.runs):
            for kind, root in (("context", bundle), ("graph", plain)):
                seconds, images[kind] = first_image(root)
                first[kind].append(seconds)
    same = bool(np.array_equal(images["context"], images["graph"]))
    result = {"session_open_s": opens, "first_image_s": {k: statistics.median(v) for k, v in first.items()},
              "identical_images": same, "runs": args.runs}
    print(json.dumps(result, indent=2))
    print("| component | open from context | compile the QDQ graph | ratio |\n|---|---|---|---|")
    for name, t in opens.items():
        print(f"| {name} | {t['context'] * 1e3:.0f} ms | {t['graph'] * 1e3:.0f} ms | {t['graph'] / t['context']:.1f}x |")
    f = result["first_image_s"]
    print(f"| first image (fresh pipeline) | {f['context']:.2f} s | {f['graph']:.2f} s | "
          f"{f['graph'] / f['context']:.2f}x |")
    print(f"images identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
