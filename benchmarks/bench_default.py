"""The embedded default model on every runtime and quant recipe, side by side in one run (issues 4 and 6).

    python benchmarks/bench_default.py [--prompts 50] [--runs 5] [--threads N] [--work DIR] [--json FILE] [--fresh]
                                       [--recipes fp32,fp16,int8,w8a32,int4,mixed,w8a16] [--text-len 32]
                                       [--model DIR] [--sizes-only] [--int4-block 32|64|128]

1. Exports the embedded default (``edge/assets/default``, 128x128, 4 steps) to a bundle per recipe with
   ``qwen_edge.export.onnx.export_bundle``: fp32, fp16, int8, w8a32, int4, mixed and w8a16 (``--target qnn``, the QNN
   HTP recipe; when the HTP check refuses a graph, the same w8a16 recipe is exported for ``--target onnx`` and
   the refusal is reported; a bundle that misses the exporter's parity gates is exported with them off and
   flagged, so every recipe is measured). Calibration and the gates use four training-split prompts. Bundles are
   cached in ``--work`` (default ``$QWEN_EDGE_CACHE/bench-default``) and re-exported when the model's files
   change (``--fresh``: always), so after the model is replaced the same command measures the new one.
2. Speed: torch fp32 eager (``Pipeline.from_pretrained``, the baseline users would otherwise run) and every
   bundle on ONNX Runtime's CPU provider, same prompt and seed, ``--threads`` threads each; ``--warmup``
   untimed generations each, then ``--runs`` rounds alternating over all of them; medians of the end-to-end
   time (tokenize -> text encoder -> 4 steps -> VAE decoder) and of each component (``qwen_edge.bench.Timed``).
3. Quality over ``--prompts`` held-out prompts (``qwen_edge.train.evaluate.heldout_prompts``, seed = index): image
   PSNR of every bundle vs the torch fp32 pipeline on the same noise (mean and worst), and whole-prompt accuracy
   by ``qwen_edge.world.evaluate_many``; an accuracy gap to fp32 is quoted with its paired standard error (over 50
   prompts ~4 points: read the accuracy targets with ``--prompts 1000``, ~1).
4. Memory: peak RSS of fresh processes (``qwen_edge.fresh_process``): one generation, one ``--low-memory``
   generation, each graph alone on its real input, and the baseline (imports, bundle read, no session). The
   issue's figure is ``(low-memory peak - baseline) / (largest single-graph peak - baseline)``.
5. NPU: the w8a16 bundle's graphs on the QNN HTP backend (x86 emulation, CPU fallback off): per graph, the
   median of 3 calls, or the backend's one-line refusal.

Prints markdown tables and the issue-4 targets (met / not met); ``--json`` also writes every figure.
``--sizes-only`` stops after step 1 and prints the bundle sizes (per component, the weights 2.1's text_kv and
transformer share counted once in the total) against fp32 and the size targets; with ``--model DIR`` the bundles
are exported from another checkpoint (e.g. ``benchmarks/random_checkpoint.py``'s larger random 2.1, where the
transformer and text encoder dominate as in real checkpoints; the other steps assume the embedded default).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

RECIPES = ("fp32", "fp16", "int8", "w8a32", "int4", "mixed", "w8a16")
PROMPT = "a large red circle above a small blue square on a black background"
TORCH = "torch fp32 eager"
MB = 2**20
# Issue 4: fidelity vs torch fp32 on the same noise (dB), accuracy within (points) of fp32, speed, size, memory.
# The issue defines int8 as weight-only: w8a32 is that; int8 (int8 compute) is held to the same figures.
PSNR_TARGET = {"fp32": 45.0, "fp16": 40.0, "int8": 30.0, "w8a32": 30.0, "w8a16": 28.0}
ACCURACY_WITHIN = {"int4": 5.0, "int8": 2.0, "w8a32": 2.0}
SIZE_TARGET = {"int8": 0.27, "int4": 0.16}


def log(msg: str) -> None:
    print(f"bench_default: {msg}", file=sys.stderr)


# -- 1. bundles -------------------------------------------------------------------------------------------------


def fingerprint(folder: Path) -> str:
    """sha256 over every file of the checkpoint (names and bytes): changes when the model is replaced."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def export_all(work: Path, recipes, text_len: int, fresh: bool = False, model: Path | None = None,
               int4_block: int | None = None) -> dict[str, dict]:
    """{recipe: {"bundle": Path | None, "target", "export_s", "error"/"note"}}, exporting what the cache lacks
    (everything with ``fresh``) from ``model`` (None: the embedded default); ``int4_block``: the int4 bundle's
    ``--block-size`` (None: the exporter's per-weight default). A w8a16 bundle that fell back to
    ``--target onnx`` is not reused: the QNN export is tried again, in case the HTP backend (or qwen-edge) now
    runs every graph."""
    from qwen_edge.export.onnx import world_calibration
    from qwen_edge.spec import default_model

    model_key = fingerprint(model or default_model())
    out = {}
    for recipe in tqdm(recipes, desc="bundles", unit="recipe", file=sys.stderr):
        # the exporter's own default prompts for the embedded default on this recipe's target: every background
        calibration = list(world_calibration("qnn" if recipe == "w8a16" else "onnx"))
        block = int4_block if recipe == "int4" else None
        key = {"model": model_key, "text_len": text_len, "steps": 4, "prompts": calibration,
               **({"block_size": block} if block else {})}
        stamp = work / f"{recipe}.json"
        cached = json.loads(stamp.read_text()) if stamp.is_file() else None
        fallback = recipe == "w8a16" and (cached or {}).get("target") != "qnn"
        if (not fresh and not fallback and cached and cached.get("key") == key and cached.get("bundle")
                and Path(cached["bundle"]).is_dir()):
            out[recipe] = {**cached, "bundle": cached["bundle"] and Path(cached["bundle"])}
            continue
        out[recipe] = _export(work, recipe, text_len, calibration, model, block)
        stamp.write_text(json.dumps({**out[recipe], "key": key,
                                     "bundle": out[recipe]["bundle"] and str(out[recipe]["bundle"])}))
    return out


def _export(work: Path, recipe: str, text_len: int, calibration, model: Path | None = None,
            block_size: int | None = None) -> dict:
    """Export one recipe as ``qwen-edge export`` does. A bundle that misses the exporter's parity gates is
    exported again with the gates off, so its figures can still be measured (and the miss is noted); w8a16 is
    exported for ``--target onnx`` when the QNN HTP check refuses a graph."""
    from qwen_edge.errors import NumericalError, QwenEdgeError
    from qwen_edge.export.onnx import export_bundle

    target, gates, notes = ("qnn" if recipe == "w8a16" else "onnx"), {}, []
    while True:
        start = time.perf_counter()
        try:
            export_bundle(work / recipe, model, target=target, quant=recipe, text_len=text_len, steps=4,
                          prompts=calibration, block_size=block_size, log=lambda m: log(f"{recipe}: {m}"), **gates)
            return {"bundle": work / recipe, "target": target, "export_s": round(time.perf_counter() - start, 1),
                    "note": "; ".join(notes) or None, "error": None}
        except NumericalError as e:
            if gates:
                return {"bundle": None, "target": target, "note": "; ".join(notes) or None, "error": str(e)}
            notes.append(f"misses the exporter's gate ({e}); exported with the gates off to measure it anyway")
            gates = {"min_component_psnr": 0.0, "min_image_psnr": 0.0}
        except QwenEdgeError as e:
            if target != "qnn":
                return {"bundle": None, "target": target, "note": "; ".join(notes) or None, "error": str(e)}
            notes.append(f"--target qnn refused ({e}); exported for --target onnx (CPU gates only)")
            target = "onnx"
        log(notes[-1])


# -- 2. speed ---------------------------------------------------------------------------------------------------


def pipelines(bundles: dict[str, dict], threads: int, cache: Path) -> dict:
    """name -> pipeline with timed components: torch fp32 eager first, then every exported bundle on the CPU."""
    import torch
    from qwen_edge.bench import Timed
    from qwen_edge.pipeline import Pipeline
    from qwen_edge.runtimes.onnx import pipeline

    torch.set_num_threads(threads)
    pipes = {TORCH: Pipeline.from_pretrained()}
    for recipe, facts in bundles.items():
        if facts["bundle"] is not None:
            pipes[recipe] = pipeline(facts["bundle"], threads=threads, cache_dir=cache)
    for pipe in pipes.values():
        pipe.components = Timed(pipe.components)
    return pipes


def speed(pipes: dict, runs: int, warmup: int) -> dict:
    """Alternating end-to-end timings; {name: {"end_to_end": [s...], "components": {key: median s}}}."""
    from qwen_edge.pipeline import Request

    req = Request(PROMPT, height=128, width=128, steps=4, seed=0)
    for pipe in pipes.values():
        for _ in range(warmup):
            _image(pipe, req)
        pipe.components.times.clear()
    times = {name: [] for name in pipes}
    for _ in tqdm(range(runs), desc="speed (alternating)", unit="round", file=sys.stderr):
        for name, pipe in pipes.items():
            start = time.perf_counter()
            _image(pipe, req)
            times[name].append(time.perf_counter() - start)
    return {name: {"end_to_end": times[name],
                   "components": {k: statistics.median(v) for k, v in pipe.components.times.items()}}
            for name, pipe in pipes.items()}


def _image(pipe, req) -> np.ndarray:
    *_, last = pipe.generate(req)
    return last.image


# -- 3. quality -------------------------------------------------------------------------------------------------


def quality(pipes: dict, n: int) -> dict:
    """Per pipeline: PSNR vs torch fp32 (mean, worst and which prompt, every prompt's) and evaluate_many's accuracy
    over n held-out prompts."""
    from qwen_edge.export.onnx import image_psnr
    from qwen_edge.pipeline import Request
    from qwen_edge.train.evaluate import heldout_prompts
    from qwen_edge.world import evaluate, summarize

    texts = heldout_prompts(n)
    images = {name: [] for name in pipes}
    for i, text in enumerate(tqdm(texts, desc="held-out prompts", unit="prompt", file=sys.stderr)):
        req = Request(text, height=128, width=128, steps=4, seed=i)
        for name, pipe in pipes.items():
            images[name].append(_image(pipe, req))
    out = {}
    for name, imgs in images.items():
        results = [evaluate(im, t) for im, t in zip(imgs, texts)]
        acc = summarize(results)
        out[name] = {"accuracy": acc["ok"], "attributes": acc, "ok_per_prompt": [int(r.ok) for r in results]}
        if name != TORCH:
            psnrs = [image_psnr(a, b) for a, b in zip(imgs, images[TORCH])]
            worst = int(np.argmin(psnrs))
            out[name].update(psnr_mean=float(np.mean(psnrs)), psnr_min=float(psnrs[worst]),
                             psnr_worst_prompt={"index": worst, "prompt": texts[worst]},  # seed = index
                             psnr_per_prompt=[round(float(x), 2) for x in psnrs])
    return out


# -- 4. memory, 5. NPU ----------------------------------------------------------------------------------------------


def memory(bundle: Path, threads: int, cache: Path) -> dict:
    """Peak RSS (MB) of fresh processes: a generation, a low-memory generation, each graph alone, the baseline."""
    from qwen_edge.fresh_process import component_rss, latency_feeds, run_child

    job = {"runtime": "onnx", "bundle": str(bundle), "device": "cpu", "threads": threads, "prompt": PROMPT,
           "seed": 0, "cache": str(cache)}
    low = run_child({**job, "mode": "generate", "low_memory": True})
    out = {"generate": run_child({**job, "mode": "generate"})["peak_rss_mb"], "low_memory": low["peak_rss_mb"]}
    files = {"low_memory": low["file_rss_mb"]}  # each process's file-backed RSS at its end
    out.update(component_rss(bundle, latency_feeds(bundle, threads), threads, str(cache), file_mb=files))
    graphs = {k: v for k, v in out.items() if k not in ("generate", "low_memory", "baseline")}
    largest = out["largest_graph"] = max(graphs, key=graphs.get)
    out["ratio"] = (out["low_memory"] - out["baseline"]) / (graphs[largest] - out["baseline"])
    out["file_mb"] = files
    if None not in (files["low_memory"], files["baseline"], files[largest]):
        # the same ratio net of mapped files (library code pages: a low-memory generation has run every graph's
        # kernels, the graph alone only its own); the peak is in the last graph, after every file page was touched
        def anon(k):
            return out[k] - files[k]
        out["ratio_anon"] = (anon("low_memory") - anon("baseline")) / (anon(largest) - anon("baseline"))
    return out


def npu(bundle: Path, threads: int) -> dict:
    """Each graph of the w8a16 bundle on the QNN HTP backend: {"graph": {"median_s"} | {"error"}}."""
    from qwen_edge import bundle as bundle_mod
    from qwen_edge.fresh_process import latency_feeds
    from qwen_edge.errors import QwenEdgeError
    from qwen_edge.runtimes.onnx import GraphIO, open_session

    feeds = latency_feeds(bundle, threads)
    b = bundle_mod.load(bundle)
    io = GraphIO(b)
    out = {}
    for name, feed in tqdm(feeds.items(), desc="QNN HTP emulator", unit="graph", file=sys.stderr):
        try:
            sess = open_session(b.path(b.component(name).file), "npu", name=name)
        except QwenEdgeError as e:
            out[name] = {"error": str(e)}
            continue
        feed = io.inputs(name, feed)  # the graph's own layout (a --target qnn text_kv is rank-folded)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            sess.run(None, feed)
            times.append(time.perf_counter() - start)
        out[name] = {"median_s": statistics.median(times)}
    return out


# -- report -----------------------------------------------------------------------------------------------------


def tables(sizes, sp, q, mem, npu_result) -> str:
    med = {name: statistics.median(v["end_to_end"]) for name, v in sp.items()}
    fp32_size = sizes.get("fp32", {}).get("total")
    lines = ["| recipe | runtime / device | bundle size | median, 4 steps end to end | vs torch eager | vs ORT fp32 "
             "| image PSNR vs torch fp32 (mean / worst) | prompt accuracy |",
             "|---|---|---|---|---|---|---|---|"]
    for name in med:
        where = "torch eager, CPU" if name == TORCH else "ONNX Runtime, CPU"
        size = "—" if name == TORCH else (f"{sizes[name]['total'] / MB:.2f} MB" + (
            f" ({sizes[name]['total'] / fp32_size:.2f}x)" if fp32_size else ""))
        vs_fp32 = f"{med['fp32'] / med[name]:.2f}x" if "fp32" in med else "—"
        psnr = "—" if name == TORCH else f"{q[name]['psnr_mean']:.1f} / {q[name]['psnr_min']:.1f} dB"
        lines.append(f"| {'fp32' if name == TORCH else name} | {where} | {size} | {med[name]:.3f} s | "
                     f"{med[TORCH] / med[name]:.2f}x | {vs_fp32} | {psnr} | {100 * q[name]['accuracy']:.1f}% |")
    if npu_result is not None:
        ran = ", ".join(f"{k} {v['median_s']:.2f} s" for k, v in npu_result.items() if "median_s" in v)
        refused = ", ".join(k for k, v in npu_result.items() if "error" in v)
        lines.append(f"| w8a16 | QNN HTP emulator (x86), per graph | (as above) | {ran or 'nothing ran'}"
                     f"{'; refused: ' + refused if refused else ''} | — | — | — | — |")
        lines += [f"- HTP refused {k}: {v['error']}" for k, v in npu_result.items() if "error" in v]
    lines += ["", "Per component (median ms; transformer per step):", "",
              "| | text_encoder | text_kv | transformer | vae_decoder | size MB (te, kv, tr, vae) |",
              "|---|---|---|---|---|---|"]
    for name, v in sp.items():
        c = v["components"]
        comp_sizes = "—" if name == TORCH else ", ".join(f"{sizes[name]['components'][k] / MB:.2f}" for k in
                                                         ("text_encoder", "text_kv", "transformer", "vae_decoder"))
        lines.append(f"| {name} | " + " | ".join(f"{1e3 * c[k]:.2f}" if k in c else "—" for k in
                                                 ("text_encoder", "text_kv", "transformer", "vae_decoder"))
                     + f" | {comp_sizes} |")
    if mem:
        lines += ["", "Peak RSS of fresh processes (MB): " + "; ".join(
            f"{recipe}: generate {m['generate']:.0f}, --low-memory {m['low_memory']:.0f}, "
            f"baseline {m['baseline']:.0f}, "
            f"largest graph alone {m[m['largest_graph']]:.0f} ({m['largest_graph']}); (low-memory - baseline) / "
            f"(largest graph - baseline) = {m['ratio']:.2f}"
            + (f" ({m['ratio_anon']:.2f} net of file-backed pages)" if "ratio_anon" in m else "")
            for recipe, m in mem.items())]
    lines += ["", targets(sizes, med, q, mem)]
    return "\n".join(lines)


def size_table(sizes: dict) -> str:
    """Bundle bytes per recipe: the total (a file several components list counted once), vs fp32, and where they
    are: each component's own files, the weights text_kv and transformer share, the tokenizer."""
    names = ("text_encoder", "text_kv", "transformer", "vae_decoder")
    fp32 = sizes.get("fp32", {}).get("total")
    lines = ["| recipe | bundle MB | vs fp32 | " + " | ".join(names) + " | shared weights | tokenizer |",
             "|---|---|---|" + "---|" * (len(names) + 2)]
    for recipe, s in sizes.items():
        ratio = f"{s['total'] / fp32:.3f}x" if fp32 else "—"
        own = {k: v - (s["shared"] if k in s["sharing"] else 0) for k, v in s["components"].items()}
        cells = " | ".join(f"{own[k] / MB:.3f}" if k in own else "—" for k in names)
        lines.append(f"| {recipe} | {s['total'] / MB:.3f} | {ratio} | {cells} | {s['shared'] / MB:.3f} | "
                     f"{s['tokenizer'] / MB:.3f} |")
    return "\n".join(lines)


def targets(sizes, med, q, mem) -> str:
    """The issue-4 figures, each marked met or NOT met."""
    rows = []

    def check(ok: bool, text: str) -> None:
        rows.append(f"- {'met' if ok else 'NOT met'}: {text}")

    for recipe, want in PSNR_TARGET.items():
        if recipe in q:
            check(q[recipe]["psnr_min"] >= want, f"{recipe} image PSNR vs torch fp32 >= {want:.0f} dB (worst of the "
                                                 f"prompts: {q[recipe]['psnr_min']:.1f} dB)")
    for recipe, points in ACCURACY_WITHIN.items():
        if recipe in q and "fp32" in q:
            gap = round(100 * (q["fp32"]["accuracy"] - q[recipe]["accuracy"]), 6)  # 65% - 60% is 5.000000000000004
            check(gap <= points, f"{recipe} prompt accuracy within {points:.0f} points of fp32 "
                                 f"({100 * q[recipe]['accuracy']:.1f}% vs {100 * q['fp32']['accuracy']:.1f}%: "
                                 f"{_paired_gap(q['fp32']['ok_per_prompt'], q[recipe]['ok_per_prompt'])})")
    if "int8" in med:
        check(med[TORCH] / med["int8"] >= 4,
              f"int8 >= 4x faster than torch fp32 eager ({med[TORCH] / med['int8']:.2f}x)")
        if "fp32" in med:
            check(med["fp32"] / med["int8"] >= 1.5, f"int8 >= 1.5x faster than the fp32 bundle "
                                                    f"({med['fp32'] / med['int8']:.2f}x)")
    for recipe, want in SIZE_TARGET.items():
        if recipe in sizes and "fp32" in sizes:
            ratio = sizes[recipe]["total"] / sizes["fp32"]["total"]
            check(ratio <= want, f"{recipe} bundle <= {want}x fp32 ({ratio:.3f}x)")
    for recipe, m in (mem or {}).items():
        check(m["ratio"] <= 1.2, f"{recipe} --low-memory peak RSS <= 1.2x (largest graph + its activations), above "
                                 f"the runtime's baseline ({m['ratio']:.2f}x)")
    return "Issue 4 targets:\n" + "\n".join(rows)


def _paired_gap(reference: list[int], other: list[int]) -> str:
    """The accuracy gap of ``other`` below ``reference`` over the same prompts, with its standard error (points):
    on 50 prompts it is several points, so read the accuracy targets on ~1000 (``--prompts 1000``)."""
    d = np.asarray(reference, np.float64) - np.asarray(other, np.float64)
    se = 100 * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
    return f"{100 * d.mean():.1f} +- {se:.1f} points below over {len(d)} prompts"


def main(argv: list[str] | None = None) -> int:
    from qwen_edge import bundle as bundle_mod
    from qwen_edge.bench import machine, sizes as bundle_sizes
    from qwen_edge.runtimes.onnx import default_cache_dir, physical_cores

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=50, help="held-out prompts for PSNR and accuracy (default 50)")
    ap.add_argument("--runs", type=int, default=5, help="alternating timed rounds (default 5)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, help="threads for torch and ONNX Runtime (default: the physical cores)")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--text-len", type=int, default=32, help="bundle text length (the world's prompts need <= 21)")
    ap.add_argument("--work", type=Path, help="bundle cache (default $QWEN_EDGE_CACHE/bench-default)")
    ap.add_argument("--fresh", action="store_true", help="re-export every bundle (e.g. after the exporter changed)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-RSS processes")
    ap.add_argument("--no-npu", action="store_true", help="skip the QNN HTP emulator")
    ap.add_argument("--json", type=Path, help="also write every figure here")
    ap.add_argument("--model", type=Path, help="export another checkpoint (sizes only; default: the embedded one)")
    ap.add_argument("--sizes-only", action="store_true", help="export and print bundle sizes, nothing else")
    ap.add_argument("--int4-block", type=int, choices=(32, 64, 128),
                    help="the int4 bundle's --block-size (default: the exporter's, per weight)")
    args = ap.parse_args(argv)
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown or args.prompts < 1 or args.runs < 1:
        raise SystemExit(f"bench_default: unknown recipe(s) {unknown} or --prompts/--runs < 1")
    if args.model is not None and not (args.sizes_only and (args.model / "model_index.json").is_file()):
        raise SystemExit("bench_default: --model takes a checkpoint folder and measures sizes only (--sizes-only)")
    threads = args.threads or physical_cores()
    work = args.work or default_cache_dir() / "bench-default"
    work.mkdir(parents=True, exist_ok=True)
    start, load_before = time.perf_counter(), machine()["load_average_1min"]

    bundles = export_all(work, recipes, args.text_len, args.fresh, args.model, args.int4_block)
    sizes = {r: bundle_sizes(bundle_mod.load(f["bundle"])) for r, f in bundles.items() if f["bundle"] is not None}
    if args.sizes_only:
        return _print_sizes(args.model, bundles, sizes, args.json)
    pipes = pipelines(bundles, threads, work / "ort-cache")
    sp = speed(pipes, args.runs, args.warmup)
    q = quality(pipes, args.prompts)
    del pipes
    mem = None
    if not args.no_memory:
        mem = {r: memory(bundles[r]["bundle"], threads, work / "ort-cache") for r in ("fp32", "int8") if r in sizes}
    npu_result = None
    if not args.no_npu and "w8a16" in sizes:
        npu_result = npu(bundles["w8a16"]["bundle"], threads)
    info = machine()
    print(f"Embedded default ({args.prompts} held-out prompts, {args.runs} alternating rounds after {args.warmup} "
          f"warm-up, threads: {threads}, 128x128, 4 steps, text_len {args.text_len}); {info['cpu']}, "
          f"{info['physical_cores']} cores, load average {load_before} at the start, {info['load_average_1min']} at "
          f"the end; total {time.perf_counter() - start:.0f} s\n")
    for recipe, f in bundles.items():
        for text in (f.get("note"), f.get("error")):
            if text:
                print(f"note: {recipe}: {text}")
    print(tables(sizes, sp, q, mem, npu_result))
    if args.json:
        report = {"machine": info, "threads": threads, "bundles": {r: {**f, "bundle": f["bundle"] and str(f["bundle"])}
                                                                   for r, f in bundles.items()},
                  "sizes": sizes, "speed": sp, "quality": q, "memory": mem, "npu": npu_result}
        args.json.write_text(json.dumps(report, indent=1, default=str))
    return 0


def _print_sizes(model: Path | None, bundles: dict, sizes: dict, json_path: Path | None) -> int:
    """``--sizes-only``: the size table and the size targets (and the figures as JSON)."""
    print(f"Bundle sizes of {model or 'the embedded default'} (128x128 unless its qwen_edge.json says otherwise, "
          "text_len as given, 4 steps)\n")
    for recipe, f in bundles.items():
        for text in (f.get("note"), f.get("error")):
            if text:
                print(f"note: {recipe}: {text}")
    print(size_table(sizes) + "\n\n" + targets(sizes, {}, {}, None))
    if json_path:
        json_path.write_text(json.dumps({"model": str(model or "embedded default"), "sizes": sizes}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
