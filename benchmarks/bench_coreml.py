"""Core ML conversion cost: time and peak memory per component, package sizes per compression, and one chunk of
the full-size Qwen-Image 2.1 transformer showing that memory follows the chunk, not the model (issue 5).

    python benchmarks/bench_coreml.py                      # tiny 2.1 checkpoint (until the embedded default exists)
    python benchmarks/bench_coreml.py --model DIR          # any checkpoint directory
    python benchmarks/bench_coreml.py --full-blocks 1,2    # full-size 2.1 chunks of 1 and 2 blocks (random bf16)
    python benchmarks/bench_coreml.py --model edge/assets/default --size 128 --accuracy 100 --full-blocks ""

Every measurement runs in a fresh child process so its peak RSS (``ru_maxrss``) is its own; a child that only
imports torch and coremltools gives the baseline. Parity (PSNR vs torch, by the MIL interpreter) is printed
next to each package so a fast-but-wrong conversion cannot hide.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FULL_CHUNK_START = 8  # a middle chunk: blocks only, no stem or head


def _child(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"child {argv} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _package_bytes(path: Path, weights_only: bool = False) -> int:
    """The whole package, or only its weight blobs (tiny models' graph protobufs are not negligible)."""
    return sum(f.stat().st_size for f in path.rglob("*.bin" if weights_only else "*") if f.is_file())


def _feeds(io, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    feed = {}
    for t in io.inputs:
        if t.dtype.startswith("int"):
            feed[t.name] = rng.integers(0, 100, t.shape).astype(np.int32)
        elif t.name == "sigma":
            feed[t.name] = np.array([0.75], np.float32)
        elif t.name.endswith("bias"):
            feed[t.name] = np.zeros(t.shape, np.float32)
        else:
            feed[t.name] = rng.standard_normal(t.shape).astype(np.float32)
    return feed


# -- children ----------------------------------------------------------------------------------------------------


def child_baseline() -> dict:
    import torch  # noqa: F401
    from qwen_edge.export import coreml

    coreml.coremltools()
    return {"peak_rss_mb": _peak_mb()}


def child_component(model: str, name: str, size: int, text_len: int, quants: list[str]) -> dict:
    """Convert one component of ``model`` (fp16, one package), then compress it: time, peak RSS, sizes, PSNR."""
    from qwen_edge import iospec
    from qwen_edge.export import coreml
    from qwen_edge.export import coreml_chunks as chunks
    from qwen_edge.spec import ModelSpec

    coreml.coremltools()
    spec = ModelSpec.from_checkpoint(model)
    dims = iospec.dims_from_checkpoint(spec, size, size, text_len)
    start = time.perf_counter()
    if name in chunks.CHUNKABLE:
        src = chunks.source(spec, name)
        blocks = len(chunks.unit_params(src)[1])
        module, io = chunks.load_chunk(src, 0, blocks), chunks.chunk_io(dims, name, 0, blocks, blocks)
    else:
        module, io = coreml._whole(spec, name), iospec.fold_rank(iospec.components(dims)[name], 5)
    feed = _feeds(io)
    refs = [coreml.torch_outputs(module, io, feed)]
    with tempfile.TemporaryDirectory() as tmp:
        mlmodel = coreml.convert(module, io, feed, quant="fp16")
        fp16 = Path(tmp) / "fp16.mlpackage"
        coreml.save_package(mlmodel, fp16)
        seconds = time.perf_counter() - start
        result = {"component": name, "seconds": round(seconds, 2), "peak_rss_mb": round(_peak_mb()),
                  "params": sum(p.numel() for p in module.parameters()),
                  "sizes": {"fp16": _package_bytes(fp16)}, "weights": {"fp16": _package_bytes(fp16, True)},
                  "psnr_db": {"fp16": coreml.package_parity(fp16, io, [feed], refs)["psnr_db"]}}
        ios18 = coreml.convert(module, io, feed, quant="fp16", ios18=True) if "int4" in quants else None
        for quant in quants:
            path = Path(tmp) / f"{quant}.mlpackage"
            source = ios18 if quant == "int4" else mlmodel  # per-block 4-bit needs an iOS 18 program
            coreml.save_package(coreml.compress(source, quant, ios18=quant == "int4"), path)
            result["sizes"][quant] = _package_bytes(path)
            result["weights"][quant] = _package_bytes(path, True)
            result["psnr_db"][quant] = coreml.package_parity(path, io, [feed], refs)["psnr_db"]
    return result


def child_recipe(model: str, recipe: str, size: int, text_len: int, accuracy: int) -> dict:
    """A whole bundle with one recipe (``quant`` or ``quant:ios18``; int4 is always iOS 18): its size, the
    fidelity its export gates measured (interpreter vs torch) and, with ``accuracy`` > 0, the world evaluator's
    whole-prompt accuracy over that many held-out prompts."""
    from qwen_edge.export import coreml

    quant, _, target = recipe.partition(":")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        m = coreml.export_coreml(Path(tmp) / "b", model, quant=quant, height=size, width=size, text_len=text_len,
                                 ios18=quant == "int4" or target == "ios18", min_component_psnr=0.0,
                                 min_image_psnr=0.0)
        comps = {name: c.fidelity["psnr_db"] for name, c in m.components.items()}
        result = {"quant": recipe, "seconds": round(time.perf_counter() - start, 1), "peak_rss_mb": round(_peak_mb()),
                  "bundle_bytes": _package_bytes(Path(tmp) / "b"),
                  "weight_bytes": _package_bytes(Path(tmp) / "b", weights_only=True), "image_psnr_db": m.fidelity["image_psnr_db"],
                  "components": comps}
        if accuracy:
            from qwen_edge.runtimes.coreml import pipeline

            result["accuracy"] = _accuracy(pipeline(Path(tmp) / "b", backend="interpreter"), accuracy, size)
        return result


def child_torch_accuracy(model: str, size: int, accuracy: int) -> dict:
    from qwen_edge.pipeline import Pipeline

    return {"accuracy": _accuracy(Pipeline.from_pretrained(model), accuracy, size)}


def _accuracy(pipe, n: int, size: int) -> float:
    """Whole-prompt accuracy (qwen_edge.world's evaluator) over ``n`` held-out prompts, seed i for prompt i."""
    import warnings

    from qwen_edge.world import judge, prompt

    prompts = prompt.prompts("heldout", n, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images = [pipe(p, height=size, width=size, seed=i) for i, p in enumerate(prompts)]
    return judge.evaluate_many(images, prompts)["ok"]


def child_full_chunk(blocks: int, size: int, text_len: int) -> dict:
    """Blocks [8, 8 + blocks) of the full-size 2.1 transformer (32 blocks, width 4096) from a safetensors shard
    holding only those blocks (random bf16), converted to one fp16 package."""
    import torch
    from qwen_edge import iospec
    from qwen_edge import transformer_v2 as t2
    from qwen_edge.export import coreml
    from qwen_edge.export import coreml_chunks as chunks
    from safetensors.torch import save_file

    coreml.coremltools()
    cfg = t2.QWEN_IMAGE_21
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "transformer"
        folder.mkdir()
        with torch.device("meta"):
            shapes = {n: p.shape for n, p in t2.TransformerV2(cfg).named_parameters()}
        prefixes = tuple(f"transformer_blocks.{i}." for i in range(FULL_CHUNK_START, FULL_CHUNK_START + blocks))
        gen = torch.Generator().manual_seed(0)
        weights = {n: (torch.randn(s, generator=gen) * (1.0 if "norm" in n else 0.02)).to(torch.bfloat16)
                   for n, s in shapes.items() if n.startswith(prefixes)}
        save_file(weights, str(folder / "diffusion_pytorch_model.safetensors"))
        shard_bytes = sum(w.numel() * 2 for w in weights.values())
        del weights
        src = chunks.Source("transformer", "qwen-image-2.1", lambda: t2.TransformerV2(cfg), folder, t2.sanitize)
        dims = iospec.Dims(family="qwen-image-2.1", height=size, width=size, text_len=text_len, drop=34,
                           text_hidden=cfg.context_dim, z_channels=64, image_channels=4, encoder_channels=4,
                           heads=cfg.num_heads, head_dim=cfg.head_dim, layers=cfg.num_layers)
        start = time.perf_counter()
        stop = FULL_CHUNK_START + blocks
        module = chunks.load_chunk(src, FULL_CHUNK_START, stop)
        io = chunks.chunk_io(dims, "transformer", FULL_CHUNK_START, stop, cfg.num_layers)
        feed = _feeds(io)
        opts = coreml.Options(quant="fp16", chunk_limit=1 << 40)
        figures = coreml.convert_package(module, io, [feed], Path(tmp) / "chunk.mlpackage", opts, {})
        return {"blocks": blocks, "seconds": round(time.perf_counter() - start, 1), "peak_rss_mb": round(_peak_mb()),
                "shard_mb": round(shard_bytes / 2**20), "package_mb": round(_package_bytes(Path(tmp) / "chunk.mlpackage") / 2**20),
                "psnr_db": figures["psnr_db"]}


# -- the report ---------------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint directory (default: a tiny random 2.1 checkpoint built here)")
    p.add_argument("--size", type=int, default=64, help="image size for the model's components (default 64)")
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--full-blocks", default="1,2", help="full-size 2.1 chunk sizes in blocks ('' to skip)")
    p.add_argument("--full-size", type=int, default=256, help="image size for the full-size chunk (default 256)")
    p.add_argument("--recipes", default="fp16,int8,palette8,palette6,palette4,int4,mixed",
                   help="whole bundles exported per recipe ('' to skip); QUANT:ios18 for an iOS 18 bundle (2.1's "
                        "text_kv then shares the transformer's packages; int4 always is)")
    p.add_argument("--no-components", action="store_true", help="skip the per-component table")
    p.add_argument("--accuracy", type=int, default=0, help="held-out prompts for the world evaluator's accuracy "
                   "per recipe (the embedded default model; 0: skip)")
    p.add_argument("--child", nargs=argparse.REMAINDER)
    args = p.parse_args()
    if args.child:
        kind, *rest = args.child
        result = {"baseline": lambda: child_baseline(),
                  "component": lambda: child_component(rest[0], rest[1], int(rest[2]), int(rest[3]), rest[4].split(",")),
                  "recipe": lambda: child_recipe(rest[0], rest[1], int(rest[2]), int(rest[3]), int(rest[4])),
                  "torch_accuracy": lambda: child_torch_accuracy(rest[0], int(rest[1]), int(rest[2])),
                  "full": lambda: child_full_chunk(int(rest[0]), int(rest[1]), int(rest[2]))}[kind]()
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from qwen_edge.testing import tiny_checkpoint

            model = str(tiny_checkpoint("qwen-image-2.1", Path(tmp) / "tiny21"))
            print("model: tiny random Qwen-Image 2.1 checkpoint (qwen_edge.testing.tiny_checkpoint)")
        else:
            print(f"model: {model}")
        base = _child(["baseline"])
        print(f"baseline (python + torch + coremltools imported): peak RSS {base['peak_rss_mb']:.0f} MB\n")
        components = () if args.no_components else ("text_encoder", "text_kv", "transformer", "vae_decoder",
                                                     "vae_encoder")
        print("sizes: whole package vs fp16, in brackets weight blobs only; PSNR: MIL interpreter vs torch fp32")
        print("| component | params | convert s | peak RSS MB | fp16 KB | int8 | palette4 | int4 (iOS 18) | "
              "PSNR fp16 / int8 / palette4 / int4 dB |")
        print("|---|---|---|---|---|---|---|---|---|")
        total = 0.0
        for name in components:
            r = _child(["component", model, name, str(args.size), str(args.text_len), "int8,palette4,int4"])
            total += r["seconds"]
            s, w, q = r["sizes"], r["weights"], r["psnr_db"]
            ratio = {k: f"{s[k] / s['fp16']:.2f}x ({w[k] / w['fp16']:.2f}x)" for k in ("int8", "palette4", "int4")}
            print(f"| {name} | {r['params']:,} | {r['seconds']} | {r['peak_rss_mb']} | {s['fp16'] / 1024:.0f} | "
                  f"{ratio['int8']} | {ratio['palette4']} | {ratio['int4']} | "
                  f"{q['fp16']:.1f} / {q['int8']:.1f} / {q['palette4']:.1f} / {q['int4']:.1f} |")
        print(f"\nall components converted in {total:.1f} s (each in its own process)\n")
        recipes = [q for q in args.recipes.split(",") if q.strip()]
        if recipes:
            print("whole bundles (export + gates; image PSNR: the bundle through the MIL interpreter vs the torch fp32 "
                  "pipeline, same noise, 4 steps)")
            if args.accuracy:
                ref = _child(["torch_accuracy", model, str(args.size), str(args.accuracy)])["accuracy"]
                print(f"torch fp32 pipeline: whole-prompt accuracy {100 * ref:.1f} % over {args.accuracy} held-out "
                      "prompts (qwen_edge.world evaluator)")
            print("| recipe | bundle KB | vs fp16 | weight blobs KB (vs fp16) | image PSNR dB | component PSNR dB | "
                  "accuracy % | export s | peak RSS MB |")
            print("|---|---|---|---|---|---|---|---|---|")
            base = None
            for quant in recipes:
                r = _child(["recipe", model, quant, str(args.size), str(args.text_len), str(args.accuracy)])
                base = base or (r if quant == "fp16" else None)
                ratio = f"{r['bundle_bytes'] / base['bundle_bytes']:.3f}x" if base else "-"
                blobs = f"{r['weight_bytes'] / 1024:.0f}" + (f" ({r['weight_bytes'] / base['weight_bytes']:.3f}x)"
                                                              if base else "")
                comps = ", ".join(f"{k} {v:.1f}" for k, v in r["components"].items())
                acc = f"{100 * r['accuracy']:.1f}" if "accuracy" in r else "-"
                print(f"| {quant} | {r['bundle_bytes'] / 1024:.0f} | {ratio} | {blobs} | {r['image_psnr_db']:.1f} | {comps} | "
                      f"{acc} | {r['seconds']} | {r['peak_rss_mb']} |")
            print()
    blocks = [int(b) for b in args.full_blocks.split(",") if b.strip()]
    if blocks:
        print(f"full-size 2.1 transformer chunks (width 4096, 32 heads, MLP 12288) at {args.full_size}x"
              f"{args.full_size}, text_len {args.text_len}, fp16:")
        print("| blocks | shard MB (bf16) | package MB | convert + gate s | peak RSS MB | above baseline MB | PSNR dB |")
        print("|---|---|---|---|---|---|---|")
        for b in blocks:
            r = _child(["full", str(b), str(args.full_size), str(args.text_len)])
            print(f"| {b} | {r['shard_mb']} | {r['package_mb']} | {r['seconds']} | {r['peak_rss_mb']} | "
                  f"{r['peak_rss_mb'] - base['peak_rss_mb']:.0f} | {r['psnr_db']:.1f} |")
        print("\nthe whole 32-block transformer is ~14 GB in bf16; each chunk's process only ever held its own blocks")


if __name__ == "__main__":
    main()
