"""Issue 4's "Scale" figure: the full 7.1B Qwen-Image-2.1 transformer streamed to an int8 ONNX graph, peak RSS.

    python benchmarks/bench_export_scale.py [--work DIR] [--height 256 --width 256 --text-len 64] [--threads 1]
                                            [--graphs transformer] [--recipe int8] [--no-step] [--keep] [--json F]
                                            [--text-encoder-layers N]

1. **Checkpoint** (cached in ``--work``): a random bf16 checkpoint of the full 2.1 transformer in diffusers' layout
   (``config.json``, ``diffusion_pytorch_model-0000i-of-0000n.safetensors`` shards of ``--shard-gb``, the
   ``.safetensors.index.json``), key names and shapes taken from diffusers' own ``QwenImage21Transformer2DModel``
   built on the meta device; written shard by shard (one shard in memory, never the model). Linear weights are
   N(0, 1/fan_in), norm scales around 1 (the zero-centred text norm around 0).
2. **Export**, in a fresh process: :func:`qwen_edge.export.stream.export_streamed`, the bundle's per-step
   ``transformer`` graph (``--graphs transformer,text_kv`` adds the text K/V graph) traced on the meta device,
   weights streamed from the shards, quantized per channel to int8 as they stream. Its peak RSS (VmHWM of the
   process, and ``ru_maxrss`` from ``wait4``), wall time and output size. Target: peak RSS <= 12 GB.
3. **Reference** (unless ``--no-step``), in a fresh process: one step's torch fp32 output computed a chunk of
   blocks at a time (:func:`qwen_edge.export.stream.gate_feeds`: random text states -> the text K/V, random
   latents at sigma 0.75), saved with its feed.
4. **Load**, in a fresh process: an ONNX Runtime session on the int8 graph with the runtime's own options
   (:func:`qwen_edge.runtimes.onnx.session_options`), its load time and peak RSS; unless ``--no-step``, one step
   on the saved feed: time, PSNR vs the torch fp32 reference.

5. **Bundle** (with ``--bundle``): ``qwen-edge export --stream --quant int8 --components transformer`` end to end
   in a fresh process (both graphs streamed, each gated against the chunked torch model, the shared weights
   stored once, the manifest), on a pipeline folder around the checkpoint: the transformer plus the small config
   files and a tiny tokenizer (``qwen_edge.testing``) the bundle's manifest reads. Its ``ru_maxrss`` and time.

The exported graph is deleted at the end unless ``--keep``; the checkpoint stays in ``--work`` (default
``$QWEN_EDGE_CACHE/bench-export-scale``, else ``/tmp/qwen-edge-bench/export-scale``; 14.2 GB) for the next run.

**Text encoder** (``--text-encoder-layers N``, instead of the phases above): a random bf16 chunk of the 8B Qwen3-VL
text stack 2.1 reads, at full width (names and shapes from transformers' ``Qwen3VLForConditionalGeneration`` on the
meta device: the whole 151936 x 4096 embedding table, ``N`` of its 36 layers, the final norm; no vision tower or
lm_head, which the text encoder never reads; 1.24 GB + 0.39 GB per layer), then in fresh processes the streamed
export of the ``text_encoder`` graph (:func:`qwen_edge.export.stream_text.text_encoder_source`, the embedding table
quantized as ``quantize_dynamic`` quantizes a Gather's) and its parity gate on random token ids vs the torch text
encoder run a chunk of layers at a time (:func:`qwen_edge.export.stream_text.reference`), peak RSS of each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

SHARD_PREFIX = "diffusion_pytorch_model"
SIGMA = 0.75
TARGET_GB = 12.0
STAMP = "bench_checkpoint.json"


# -- the parent: fresh processes, one per phase ---------------------------------------------------------------------


def run_child(job: dict) -> dict:
    """Run ``job`` in a fresh interpreter; its JSON report plus ``ru_maxrss_mb`` of that process (``wait4``)."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(job)], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"bench_export_scale: the {job['mode']} process failed (exit {proc.returncode})")
    report = json.loads(out.strip().splitlines()[-1])
    return {**report, "ru_maxrss_mb": usage.ru_maxrss / 1024}  # KB on Linux


def default_work() -> Path:
    cache = os.environ.get("QWEN_EDGE_CACHE")
    return Path(cache) / "bench-export-scale" if cache else Path("/tmp/qwen-edge-bench/export-scale")


def checkpoint_ready(folder: Path, seed: int, layers: int) -> bool:
    stamp = folder / STAMP
    return stamp.is_file() and json.loads(stamp.read_text()).get("seed") == seed and \
        json.loads(stamp.read_text()).get("layers") == layers


# -- the children ---------------------------------------------------------------------------------------------------


def child(job: dict) -> dict:
    phases = {"checkpoint": write_checkpoint, "export": export, "reference": reference, "load": load,
              "bundle": bundle, "te_checkpoint": write_text_encoder, "te_export": export_text_encoder,
              "te_gate": text_encoder_gate}
    start = time.perf_counter()
    result = phases[job["mode"]](job)
    from qwen_edge.fresh_process import peak_rss_mb

    return {**result, "seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}


def write_checkpoint(job: dict) -> dict:
    """The random bf16 checkpoint, shard by shard, in diffusers' layout and names."""
    import torch
    from diffusers import QwenImage21Transformer2DModel

    folder = Path(job["checkpoint"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STAMP).unlink(missing_ok=True)
    with torch.device("meta"):
        ref = QwenImage21Transformer2DModel(num_layers=job["layers"])  # diffusers' defaults: the released 7.1B
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    ref.save_config(str(folder))
    return write_shards(folder, shapes, SHARD_PREFIX, job["layers"], job)


def write_shards(folder: Path, shapes: dict[str, tuple[int, ...]], prefix: str, layers: int, job: dict) -> dict:
    """:func:`random_tensor` of every name in ``shapes``, shard by shard, with the index and the stamp."""
    from safetensors.torch import save_file

    shards = plan_shards(shapes, int(job["shard_gb"] * 2**30))
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: random_tensor(n, shapes[n], job["seed"]) for n in names}, str(folder / fname),
                  metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, fname))
        log(f"wrote {fname}")
    params = sum(_numel(s) for s in shapes.values())
    index = {"metadata": {"total_size": 2 * params}, "weight_map": weight_map}
    (folder / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    stamp = {"seed": job["seed"], "layers": layers, "parameters": params, "shards": len(shards)}
    (folder / STAMP).write_text(json.dumps(stamp))
    return {"parameters": params, "shards": len(shards), "bytes": _bytes(folder.glob("*.safetensors"))}


def plan_shards(shapes: dict[str, tuple[int, ...]], limit: int) -> list[list[str]]:
    """Consecutive tensors grouped into shards of at most ``limit`` bf16 bytes (a bigger tensor alone)."""
    shards, size = [[]], 0
    for name, shape in shapes.items():
        n = 2 * _numel(shape)
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def random_tensor(name: str, shape: tuple[int, ...], seed: int):
    """bf16 noise for one parameter, seeded by its name: N(0, 1/fan_in) for matrices, norm scales around 1."""
    import torch

    gen = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
    noise = torch.randn(shape, generator=gen)
    if len(shape) == 1:  # zero-centred text norm stores scale - 1
        return ((0.0 if "text_norm" in name else 1.0) + 0.1 * noise).to(torch.bfloat16)
    return (noise * shape[1] ** -0.5).to(torch.bfloat16)


def export(job: dict) -> dict:
    """The streamed export of each graph; the phase marks come from the exporter's log."""
    from qwen_edge.export import stream
    from qwen_edge.quant.recipes import model_bytes

    src = stream.transformer_source(Path(job["checkpoint"]))
    io = _io(job)
    out = {}
    for graph in job["graphs"]:
        start = time.perf_counter()
        marks = {}

        def note(msg: str, start=start, marks=marks) -> None:
            marks.setdefault("traced_s" if "traced" in msg else "last_s", time.perf_counter() - start)
            log(msg)

        facts = stream.export_streamed(src, graph, io[graph], _graph_path(job, graph), job["recipe"], log=note)
        out[graph] = {"seconds": time.perf_counter() - start, "trace_s": marks.get("traced_s"),
                      "bytes": model_bytes(_graph_path(job, graph)), "facts": facts}
        log(f"{graph}: {out[graph]['seconds']:.0f} s, {out[graph]['bytes'] / 1e9:.2f} GB")
    return {"graphs": out}


def reference(job: dict) -> dict:
    """One step's feed and its torch fp32 output, a chunk of blocks at a time."""
    import numpy as np
    from qwen_edge.export import stream

    src = stream.transformer_source(Path(job["checkpoint"]))
    feeds, refs = stream.gate_feeds(src, _dims(job), _rope(job), SIGMA)
    np.savez(_out(job) / "step_feed.npz", **feeds["transformer"])
    np.save(_out(job) / "step_reference.npy", refs["transformer"])
    return {"chunk_gb": stream.CHUNK_BYTES / 2**30}


def load(job: dict) -> dict:
    """An ORT session on the transformer graph (the runtime's options); optionally one step vs the reference."""
    import numpy as np
    import onnxruntime as ort
    from qwen_edge.export.onnx import fidelity
    from qwen_edge.fresh_process import peak_rss_mb
    from qwen_edge.runtimes.onnx import session_options

    start = time.perf_counter()
    sess = ort.InferenceSession(str(_graph_path(job, "transformer")), session_options(job["threads"]),
                                providers=["CPUExecutionProvider"])
    out = {"load_s": time.perf_counter() - start, "peak_rss_after_load_mb": peak_rss_mb()}
    log(f"session open in {out['load_s']:.0f} s, peak RSS {out['peak_rss_after_load_mb']:.0f} MB")
    if job["step"]:
        with np.load(_out(job) / "step_feed.npz") as data:
            feed = {k: data[k] for k in data.files}
        start = time.perf_counter()
        got = sess.run(None, feed)[0]
        out["step_s"] = time.perf_counter() - start
        out["fidelity"] = fidelity(np.load(_out(job) / "step_reference.npy"), got)
    return out


def bundle(job: dict) -> dict:
    """``qwen-edge export --stream`` in this process, on :func:`pipeline_folder`."""
    from qwen_edge.bundle import read_manifest
    from qwen_edge.cli import main

    out = _out(job) / "bundle"
    argv = ["export", "--model", str(pipeline_folder(job)), "--quant", job["recipe"], "--stream", "--components",
            "transformer", "--height", str(job["height"]), "--width", str(job["width"]), "--text-len",
            str(job["text_len"]), "--out", str(out)]
    if main(argv) != 0:
        raise SystemExit("bench_export_scale: qwen-edge export --stream failed")
    m = read_manifest(out)
    return {"bytes": _bytes(f for f in out.rglob("*") if f.is_file()),
            "fidelity": {name: dict(c.fidelity) for name, c in m.components.items()}}


def pipeline_folder(job: dict) -> Path:
    """A 2.1 pipeline folder around the checkpoint: the transformer (a symlink) and the JSON files and tokenizer the
    exporter reads for the manifest; no text encoder or VAE weights (``--stream`` exports the transformer alone)."""
    from qwen_edge.checkpoint import read_json
    from qwen_edge.testing import QWEN_IMAGE_SCHEDULER, train_tiny_tokenizer

    root = _out(job) / "pipeline"
    if (root / "model_index.json").is_file():
        return root
    root.mkdir(parents=True)
    (root / "transformer").symlink_to(Path(job["checkpoint"]).resolve())
    cfg = read_json(Path(job["checkpoint"]) / "config.json")
    files = {"model_index.json": {"_class_name": "QwenImage21Pipeline"},
             "scheduler/scheduler_config.json": QWEN_IMAGE_SCHEDULER,
             "vae/config.json": {"z_dim": cfg["in_channels"], "in_channels": 4, "out_channels": 4},
             "text_encoder/config.json": {"hidden_size": cfg["context_in_dim"]}}
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(content))
    train_tiny_tokenizer(root / "processor")
    return root


# -- the text encoder chunk -----------------------------------------------------------------------------------------


def write_text_encoder(job: dict) -> dict:
    """The random bf16 text-stack chunk at the 8B's width, in transformers' layout and names (see the docstring)."""
    import torch
    from qwen_edge.text_encoder import QWEN3_VL_8B as C
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    folder = Path(job["te_checkpoint"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STAMP).unlink(missing_ok=True)
    text = {"vocab_size": C.vocab_size, "hidden_size": C.hidden_size, "intermediate_size": C.intermediate_size,
            "num_hidden_layers": job["te_layers"], "num_attention_heads": C.num_heads,
            "num_key_value_heads": C.num_kv_heads, "head_dim": C.head_dim, "rms_norm_eps": C.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": C.rope_theta, "mrope_interleaved": True,
                                "mrope_section": [24, 20, 20]}}  # Qwen3-VL 8B's
    config = Qwen3VLConfig(text_config=text, tie_word_embeddings=False)
    with torch.device("meta"):
        ref = Qwen3VLForConditionalGeneration(config)
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items() if k.startswith("model.language_model.")}
    config.save_pretrained(str(folder))
    return write_shards(folder, shapes, "model", job["te_layers"], job)


def export_text_encoder(job: dict) -> dict:
    """The streamed export of the text encoder graph."""
    from qwen_edge.export import stream, stream_text
    from qwen_edge.quant.recipes import model_bytes

    src = stream_text.text_encoder_source(Path(job["te_checkpoint"]))
    facts = stream.export_streamed(src, "text_encoder", _te_io(job), _graph_path(job, "text_encoder"), job["recipe"],
                                   log=log)
    return {"bytes": model_bytes(_graph_path(job, "text_encoder")), "facts": facts}


def text_encoder_gate(job: dict) -> dict:
    """The export's gate: random token ids through the torch text encoder a chunk of layers at a time, then an
    ONNX Runtime session on the streamed graph on the same ids."""
    import numpy as np
    from qwen_edge.export import stream, stream_text

    src, io = stream_text.text_encoder_source(Path(job["te_checkpoint"])), _te_io(job)
    ids = np.random.default_rng(job["seed"]).integers(0, _vocab(job), io.inputs[0].shape, dtype=np.int64)  # (1, T)
    start = time.perf_counter()
    refs = stream_text.reference(src, [{"input_ids": ids}])
    reference_s = time.perf_counter() - start
    figures = stream.parity(_graph_path(job, "text_encoder"), io, [{"input_ids": ids}], refs, stream_text.REFERENCE)
    return {"reference_s": reference_s, "fidelity": figures}


def _vocab(job: dict) -> int:
    from qwen_edge.checkpoint import read_json

    return int(read_json(Path(job["te_checkpoint"]) / "config.json")["text_config"]["vocab_size"])


def _te_io(job: dict):
    from qwen_edge import iospec
    from qwen_edge.text_encoder import QWEN3_VL_8B

    dims = iospec.Dims(family="qwen-image-2.1", height=job["height"], width=job["width"], text_len=job["text_len"],
                       drop=0, text_hidden=QWEN3_VL_8B.hidden_size, z_channels=0, image_channels=0,
                       encoder_channels=0, heads=0, head_dim=0, layers=0)  # the text encoder's I/O reads none
    return iospec.text_encoder(dims)


def _dims(job: dict):
    from qwen_edge import iospec
    from qwen_edge.checkpoint import read_json

    cfg = read_json(Path(job["checkpoint"]) / "config.json")
    return iospec.Dims(family="qwen-image-2.1", height=job["height"], width=job["width"], text_len=job["text_len"],
                       drop=0, text_hidden=cfg["context_in_dim"], z_channels=cfg["in_channels"], image_channels=4,
                       encoder_channels=4, heads=cfg["num_attention_heads"], head_dim=cfg["attention_head_dim"],
                       layers=cfg["num_layers"])


def _io(job: dict):
    from qwen_edge import iospec

    return iospec.components(_dims(job))


def _rope(job: dict) -> dict:
    from qwen_edge.checkpoint import read_json

    cfg = read_json(Path(job["checkpoint"]) / "config.json")
    return {"axes_dims": list(cfg["axes_dims_rope"]), "theta": 10000.0}


def _out(job: dict) -> Path:
    return Path(job["work"]) / "out"


def _graph_path(job: dict, graph: str) -> Path:
    return _out(job) / f"{graph}_{job['recipe']}.onnx"


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _bytes(files) -> int:
    return sum(f.stat().st_size for f in files)


def log(msg: str) -> None:
    print(f"bench_export_scale: {msg}", file=sys.stderr, flush=True)


# -- the report -----------------------------------------------------------------------------------------------------


GB = 1024.0  # MB per GB in the RSS figures


def summary(report: dict) -> str:
    """The figures as text: the export, the session, the optional step and bundle."""
    head = (f"streamed {report['recipe']} export of the {report['parameters'] / 1e9:.2f} B-parameter Qwen-Image-2.1 "
            f"transformer ({report['checkpoint_gb']:.1f} GB bf16 in {report['shards']} shards), "
            f"{report['height']}x{report['width']}, text {report['text_len']}:")
    lines = [head, *_export_lines(report)]
    ld = report["load"]
    lines.append(f"  ONNX Runtime session: {ld['load_s']:.0f} s, peak RSS "
                 f"{ld['peak_rss_after_load_mb'] / GB:.2f} GB")
    if "step_s" in ld:
        ref, fid = report["reference"], ld["fidelity"]
        lines.append(f"  one step: {ld['step_s']:.1f} s, peak RSS {ld['peak_rss_mb'] / GB:.2f} GB; vs torch fp32 "
                     f"(a chunk of blocks at a time: {ref['seconds']:.0f} s, peak RSS {ref['peak_rss_mb'] / GB:.2f} GB): "
                     f"PSNR {fid['psnr_db']:.1f} dB, max rel error {fid['max_rel_error']:.2e}")
    if "bundle" in report:
        b = report["bundle"]
        psnr = ", ".join(f"{name} {f['psnr_db']:.1f} dB" for name, f in b["fidelity"].items())
        lines.append(f"  qwen-edge export --stream (both graphs, gates, shared weights, manifest): ru_maxrss "
                     f"{b['ru_maxrss_mb'] / GB:.2f} GB, {b['seconds']:.0f} s, {b['bytes'] / 1e9:.2f} GB; "
                     f"gates vs torch: {psnr}")
    return "\n".join(lines)


def _export_lines(report: dict) -> list[str]:
    ex = report["export"]
    peak = ex["peak_rss_mb"] / GB
    lines = [(f"  export: peak RSS {peak:.2f} GB (ru_maxrss {ex['ru_maxrss_mb'] / GB:.2f} GB; target <= {TARGET_GB} "
              f"GB: {'met' if peak <= TARGET_GB else 'MISSED'}), {ex['seconds']:.0f} s")]
    for graph, g in ex["graphs"].items():
        lines.append(f"    {graph}: {g['seconds']:.0f} s (trace {g['trace_s']:.0f} s), {g['bytes'] / 1e9:.2f} GB on "
                     f"disk ({g['bytes'] / report['checkpoint_bytes']:.3f}x the bf16 checkpoint), "
                     f"{g['facts']['weights_streamed']} weights streamed")
    return lines


def text_encoder_summary(report: dict) -> str:
    ex, gate = report["te_export"], report["te_gate"]
    fid = gate["fidelity"]
    head = (f"streamed {report['recipe']} export of a full-width Qwen3-VL text encoder chunk "
            f"({report['parameters'] / 1e9:.2f} B parameters: the embedding table + {report['te_layers']} layers, "
            f"{report['checkpoint_gb']:.2f} GB bf16), text {report['text_len']}:")
    export = (f"  export: peak RSS {ex['peak_rss_mb'] / GB:.2f} GB (ru_maxrss {ex['ru_maxrss_mb'] / GB:.2f} GB), "
              f"{ex['seconds']:.0f} s, {ex['bytes'] / 1e9:.2f} GB on disk, {ex['facts']['weights_streamed']} "
              "weights")
    checked = (f"  gate (torch chunks {gate['reference_s']:.0f} s + ONNX Runtime): peak RSS "
               f"{gate['peak_rss_mb'] / GB:.2f} GB, {gate['seconds']:.0f} s; PSNR {fid['psnr_db']:.1f} dB, max rel "
               f"error {fid['max_rel_error']:.2e}")
    return f"{head}\n{export}\n{checked}"


def run_text_encoder(job: dict, work: Path, keep: bool) -> dict:
    """The text encoder phases (``--text-encoder-layers``): checkpoint (cached), export, gate."""
    ckpt = Path(job["te_checkpoint"])
    report = {k: job[k] for k in ("text_len", "recipe", "threads", "te_layers")}
    if not checkpoint_ready(ckpt, job["seed"], job["te_layers"]):
        report["checkpoint_write"] = run_child({**job, "mode": "te_checkpoint"})
    stamp = json.loads((ckpt / STAMP).read_text())
    report.update(parameters=stamp["parameters"], checkpoint_gb=_bytes(ckpt.glob("*.safetensors")) / 1e9)
    try:
        report["te_export"] = run_child({**job, "mode": "te_export"})
        report["te_gate"] = run_child({**job, "mode": "te_gate"})
    finally:
        if not keep:
            shutil.rmtree(work / "out")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, default=None, help="checkpoint cache and outputs (see the module docstring)")
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--text-len", type=int, default=64)
    ap.add_argument("--graphs", default="transformer", help="transformer (default) and/or text_kv, comma-separated")
    ap.add_argument("--recipe", default="int8", choices=["int8", "fp32"])
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    ap.add_argument("--shard-gb", type=float, default=2.0, help="checkpoint shard size (default 2 GB)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=32, help="transformer blocks (default 32: the released 7.1B; "
                    "fewer for a quick look)")
    ap.add_argument("--no-step", action="store_true", help="only open the session: no torch reference, no step")
    ap.add_argument("--keep", action="store_true", help="keep the exported graph(s) in --work/out")
    ap.add_argument("--bundle", action="store_true", help="also run qwen-edge export --stream end to end (both graphs, "
                    "gates, manifest)")
    ap.add_argument("--json", type=Path, help="also write every figure here")
    ap.add_argument("--text-encoder-layers", type=int, default=0, help="instead: stream a random full-width 2.1 "
                    "text encoder chunk, the whole embedding table and this many of its 36 layers (see the docstring)")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    graphs = [g.strip() for g in args.graphs.split(",") if g.strip()]
    if not graphs or any(g not in ("transformer", "text_kv") for g in graphs) or "transformer" not in graphs:
        raise SystemExit("bench_export_scale: --graphs takes transformer[,text_kv]")
    work = (args.work or default_work()).resolve()
    job = {"work": str(work), "checkpoint": str(work / f"checkpoint-{args.layers}-layers" / "transformer"),
           "height": args.height, "width": args.width, "text_len": args.text_len, "graphs": graphs,
           "recipe": args.recipe, "threads": args.threads, "shard_gb": args.shard_gb, "seed": args.seed, "step": not args.no_step,
           "layers": args.layers, "bundle": args.bundle, "te_layers": args.text_encoder_layers,
           "te_checkpoint": str(work / f"text-encoder-{args.text_encoder_layers}-layers" / "text_encoder")}
    (work / "out").mkdir(parents=True, exist_ok=True)
    if args.text_encoder_layers > 0:
        report = run_text_encoder(job, work, args.keep)
        print(text_encoder_summary(report))
        if args.json:
            args.json.write_text(json.dumps(report, indent=1, default=str))
        return 0
    report = {k: job[k] for k in ("height", "width", "text_len", "recipe", "threads")}
    ckpt = Path(job["checkpoint"])
    if not checkpoint_ready(ckpt, args.seed, args.layers):
        report["checkpoint_write"] = run_child({**job, "mode": "checkpoint"})
    stamp = json.loads((ckpt / STAMP).read_text())
    report.update(parameters=stamp["parameters"], shards=stamp["shards"],
                  checkpoint_bytes=_bytes(ckpt.glob("*.safetensors")))
    report["checkpoint_gb"] = report["checkpoint_bytes"] / 1e9
    try:
        report["export"] = run_child({**job, "mode": "export"})
        if job["step"]:
            report["reference"] = run_child({**job, "mode": "reference"})
        report["load"] = run_child({**job, "mode": "load"})
        if args.bundle:
            report["bundle"] = run_child({**job, "mode": "bundle"})
    finally:
        if not args.keep:
            shutil.rmtree(work / "out")
            log(f"removed the exported graphs; the checkpoint stays in {ckpt}")
    print(summary(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
