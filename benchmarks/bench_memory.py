"""Issue 4's memory figure: ``--low-memory`` peak RSS <= 1.2x (largest component + its activations).

    python benchmarks/bench_memory.py [--model DIR|default] [--recipes fp32,int8] [--repeat 3] [--threads 1]
                                      [--work DIR] [--json FILE]

On the embedded default the weights are a few MB against a ~59 MB Python + ONNX Runtime + tokenizer baseline, so
the ratio is noise; by default this measures a random Qwen-Image 2.1 checkpoint where the transformer and text
encoder dominate (``benchmarks/random_checkpoint.py``'s defaults: a 29M-parameter transformer and a 13M-parameter
text encoder, built into ``--work`` on first use; ``--model DIR`` measures another checkpoint, ``--model default``
the embedded one). Bundles are exported (128x128, 4 steps, text_len 32) and cached as ``bench_default.py`` does.

Per recipe, ``--repeat`` times, fresh processes (:mod:`qwen_edge.fresh_process`) give the peak RSS (VmHWM) of: a
generation, a ``--low-memory`` generation, each graph alone on its real input (the baseline's state plus that one
session and one call), and the baseline (imports, the bundle read, the tokenizer, no session). The figure is
``(low-memory - baseline) / (largest graph alone - baseline)``; medians over the repeats are printed, with the
ratio's range. Last column: the same ratio with each process's file-backed RSS at its end (``RssFile``: mapped
library code and data) taken off its peak. A low-memory generation has run every graph's kernels, so more of
ONNX Runtime's code is resident than in a process that ran the largest graph alone; those pages are clean and
shared, the kernel drops them under pressure. The peak is in the last graph, after every such page was touched.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts, run from anywhere

import bench_default
import random_checkpoint

TARGET = 1.2
RECIPES = ("fp32", "int8")


def checkpoint(model: str | None, work: Path) -> Path | None:
    """The checkpoint to export: ``model``; None for the embedded default; by default the random 2.1 in ``work``
    (built once)."""
    if model == "default":
        return None
    if model is not None:
        path = Path(model)
        if not (path / "model_index.json").is_file():
            raise SystemExit(f"bench_memory: {path} is not a checkpoint folder (no model_index.json)")
        return path
    path = work / "random-2.1"
    if not path.is_dir():  # built aside and renamed, so an interrupted build is never taken for a checkpoint
        print(f"bench_memory: building the random 2.1 checkpoint in {path}", file=sys.stderr)
        partial = work / "random-2.1.partial"
        shutil.rmtree(partial, ignore_errors=True)
        random_checkpoint.build(partial).rename(path)
    return path


def measure(bundle: Path, threads: int, cache: Path, repeat: int) -> dict:
    """:func:`bench_default.memory` ``repeat`` times: the median of every figure, every run's ratio, and the
    largest graph's bundle files in MB."""
    runs = [bench_default.memory(bundle, threads, cache) for _ in range(repeat)]
    keys = [k for k in runs[0] if k not in ("largest_graph", "ratio", "ratio_anon", "file_mb")]  # processes: MB
    figures = {k: statistics.median(r[k] for r in runs) for k in keys}
    largest = max((k for k in keys if k not in ("generate", "low_memory", "baseline")), key=figures.get)
    figures["ratio"] = (figures["low_memory"] - figures["baseline"]) / (figures[largest] - figures["baseline"])
    anon = [r["ratio_anon"] for r in runs if "ratio_anon" in r]
    return {**figures, "largest_graph": largest, "ratios": [r["ratio"] for r in runs],
            "ratio_anon": statistics.median(anon) if anon else None, "runs": runs,
            "largest_files_mb": _files_mb(bundle, largest)}


def _files_mb(bundle: Path, name: str) -> float:
    from qwen_edge import bundle as bundle_mod

    b = bundle_mod.load(bundle, verify=False)
    return sum(b.path(f).stat().st_size for f in b.component(name).files) / bench_default.MB


def table(results: dict) -> str:
    lines = [("| recipe | baseline | largest graph alone (its files) | --low-memory generation | normal generation "
              "| (low-memory - baseline) / (largest alone - baseline) | target <= 1.2x "
              "| the same net of file-backed pages |"),
             "|---|---|---|---|---|---|---|---|"]
    for recipe, r in results.items():
        alone = r[r["largest_graph"]]
        lines.append(f"| {recipe} | {r['baseline']:.1f} MB | {r['largest_graph']} {alone:.1f} MB "
                     f"({r['largest_files_mb']:.1f} MB) | {r['low_memory']:.1f} MB | {r['generate']:.1f} MB | "
                     f"({r['low_memory']:.1f} - {r['baseline']:.1f}) / ({alone:.1f} - {r['baseline']:.1f}) = "
                     f"{r['ratio']:.2f}x (runs {min(r['ratios']):.2f}-{max(r['ratios']):.2f}) | "
                     f"{'met' if r['ratio'] <= TARGET else 'NOT met'} | "
                     + (f"{r['ratio_anon']:.2f}x |" if r["ratio_anon"] is not None else "— |"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from qwen_edge.bench import machine
    from qwen_edge.runtimes.onnx import default_cache_dir, physical_cores

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint folder, or 'default' (the embedded one); default: a random 2.1")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--repeat", type=int, default=3, help="fresh-process rounds per recipe (default 3)")
    ap.add_argument("--threads", type=int, help="ONNX Runtime threads (default: the physical cores)")
    ap.add_argument("--work", type=Path, help="checkpoint and bundle cache (default $QWEN_EDGE_CACHE/bench-memory)")
    ap.add_argument("--json", type=Path, help="also write every figure here")
    args = ap.parse_args(argv)
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in bench_default.RECIPES]
    if unknown or not recipes or args.repeat < 1 or (args.threads is not None and args.threads < 1):
        raise SystemExit(f"bench_memory: unknown recipe(s) {unknown}, no recipe, or --repeat/--threads < 1")
    threads = args.threads or physical_cores()
    work = args.work or default_cache_dir() / "bench-memory"
    work.mkdir(parents=True, exist_ok=True)
    model = checkpoint(args.model, work)
    start = time.perf_counter()
    bundles = bench_default.export_all(work, recipes, 32, model=model)
    failed = {r: f["error"] for r, f in bundles.items() if f["bundle"] is None}
    if failed:
        raise SystemExit(f"bench_memory: export failed: {failed}")
    results = {r: measure(f["bundle"], threads, work / "ort-cache", args.repeat) for r, f in bundles.items()}
    info = machine()
    print(f"Peak RSS (VmHWM, MB) of fresh processes, {model or 'the embedded default'}, 128x128, 4 steps, threads: "
          f"{threads}, median of {args.repeat}; {info['cpu']}, load average {info['load_average_1min']}; "
          f"{time.perf_counter() - start:.0f} s\n")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"model": str(model or "embedded default"), "threads": threads,
                                         "machine": info, "memory": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
