"""The 2.1 transformer with its modulation precomputed per step (``export --precompute-modulation``) vs as exported.

    python benchmarks/bench_modulation.py [--model DIR] [--quant fp32,int8] [--runs 50] [--threads 1]

Exports the transformer (with text_kv) of a 2.1 checkpoint (default: the embedded model, at its default size)
both ways per recipe, then reports the transformer's bytes on disk (graph + external data; the table .npy
separately) and the median time of one step on ONNX Runtime's CPU provider over the same recorded real inputs
(the sample run's latents at every sigma), the two graphs alternating in one process. Timings on a shared machine
are noisy: compare the two columns of one run, not runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = ("a large red circle above a small blue square on a black background",)


def export(out: Path, model, recipe: str, precompute: bool) -> None:
    from qwen_edge.export.onnx import export_bundle

    export_bundle(out, model, quant=recipe, components=("transformer",), prompts=PROMPTS,
                  precompute_modulation=precompute)


def step_feeds(bundle: Path, model) -> list[dict]:
    """The transformer's real inputs at every sigma (IOSpec layout with sigma), recorded from torch."""
    from qwen_edge import bundle as bundle_mod
    from qwen_edge.quant import calibrate
    from qwen_edge.runtimes.torch import TorchComponents
    from qwen_edge.spec import ModelSpec, default_model

    m = bundle_mod.load(bundle).manifest
    spec = ModelSpec.from_checkpoint(model if model is not None else default_model())
    feeds = calibrate.record(TorchComponents(spec), spec, PROMPTS, m.height, m.width, m.sampler.steps, m.text_len)
    return feeds["transformer"]


def sizes(bundle: Path) -> dict:
    from qwen_edge import bundle as bundle_mod

    comp = bundle_mod.load(bundle).manifest.components["transformer"]
    table = comp.modulation.get("file")
    graph = sum((bundle / f).stat().st_size for f in comp.files if f != table)
    return {"graph_bytes": graph, "table_bytes": (bundle / table).stat().st_size if table else 0}


def session(bundle: Path, threads: int):
    from qwen_edge import bundle as bundle_mod
    from qwen_edge.runtimes.onnx import fit, modulation_table, open_session, tabulated

    b = bundle_mod.load(bundle)
    comp = b.manifest.components["transformer"]
    sess = open_session(b.path(comp.file), "cpu", threads=threads)
    table = modulation_table(b, comp)

    def run(feed):
        feed = tabulated(feed, *table) if table is not None else feed
        return sess.run(None, fit(feed, comp.io.inputs))

    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a 2.1 checkpoint (default: the embedded model)")
    p.add_argument("--quant", default="fp32,int8")
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.quant.split(","):
            roots = {kind: Path(tmp) / f"{recipe}-{kind}" for kind in ("sigma", "table")}
            for kind, root in roots.items():
                export(root, args.model, recipe, kind == "table")
            feeds = step_feeds(roots["sigma"], args.model)
            runs = {kind: session(root, args.threads) for kind, root in roots.items()}
            times = {kind: [] for kind in runs}
            for i in range(args.runs):
                for kind, run in runs.items():
                    start = time.perf_counter()
                    run(feeds[i % len(feeds)])
                    times[kind].append(time.perf_counter() - start)
            results[recipe] = {kind: {**sizes(roots[kind]), "median_step_ms": statistics.median(t) * 1e3}
                               for kind, t in times.items()}
    print(json.dumps(results, indent=2))
    print("| recipe | transformer graph (sigma) | (table) | table .npy | median step (sigma) | (table) |")
    print("|---|---|---|---|---|---|")
    for recipe, r in results.items():
        s, t = r["sigma"], r["table"]
        print(f"| {recipe} | {s['graph_bytes'] / 1e3:.1f} KB | {t['graph_bytes'] / 1e3:.1f} KB "
              f"({t['graph_bytes'] / s['graph_bytes']:.3f}x) | {t['table_bytes'] / 1e3:.1f} KB | "
              f"{s['median_step_ms']:.2f} ms | {t['median_step_ms']:.2f} ms "
              f"({t['median_step_ms'] / s['median_step_ms']:.2f}x) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
