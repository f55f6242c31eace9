"""The ``qwen-edge`` command line: argparse front end, one error path.

Every failure a user can cause is a :class:`QwenEdgeError`: printed as one line on stderr with the
class's exit code. ``--debug`` shows the traceback instead. Heavy libraries are imported only by the
subcommand that needs them.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from .errors import InputError, MissingDependencyError, QwenEdgeError, UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors take the same one-line path, exit 2
        raise UsageError(f"{self.prog}: {message}")


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one sigma")
    return values


def _generate_args(sub) -> None:
    p = sub.add_parser("generate", help="generate an image from a prompt")
    p.add_argument("prompt")
    p.add_argument("--model", help="checkpoint directory or cached Hugging Face repo id (default: the embedded model)")
    p.add_argument("--runtime", default="torch", choices=["torch", "onnx", "coreml"],
                   help="who computes the components (coreml: Core ML on macOS, the MIL interpreter elsewhere)")
    p.add_argument("--bundle", type=Path, help="an exported bundle (qwen-edge export) to run with --runtime onnx")
    p.add_argument("--device", choices=["cpu", "npu"], help="onnx runtime: cpu (default) or npu (QNN HTP, no "
                   "CPU fallback)")
    p.add_argument("--low-memory", action="store_true", help="onnx runtime: one component in memory at a time")
    p.add_argument("--no-verify", action="store_true", help="skip the bundle's sha256 checks (trusted storage only)")
    p.add_argument("--steps", type=int, default=4, help="sampler steps (default 4); ignored with --sigmas")
    p.add_argument("--sigmas", type=_floats, help="custom sigma grid, comma-separated, without the final 0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", type=Path, help="initial latent, float32 .npy, unpacked (1, C, H/f, W/f)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--negative-prompt")
    p.add_argument("--cfg", type=float, default=1.0, help="true CFG scale; > 1 with --negative-prompt turns it on")
    p.add_argument("--lora", type=Path, help="LoRA safetensors merged into the transformer at load")
    p.add_argument("--lora-scale", type=float, default=1.0)
    p.add_argument("--max-pixels", type=int, default=4096 * 4096,
                   help="refuse larger height*width before allocating anything (default 4096x4096)")
    p.add_argument("--output", "-o", type=Path, default=Path("out.png"))
    p.add_argument("--expand", action="store_true", help="expand the prompt first (qwen-edge expand) and print it")
    _expander_options(p)
    p.set_defaults(run=_generate)


def _generate(args) -> int:
    import numpy as np

    from .image import save_png
    from .pipeline import MAX_STEPS, Pipeline, Request, check_size

    if not 1 <= args.steps <= MAX_STEPS:
        raise UsageError(f"--steps must be between 1 and {MAX_STEPS}")
    if args.lora is None and args.lora_scale != 1.0:
        raise UsageError("--lora-scale needs --lora")
    _check_output(args.output)
    check_size(args.height or 1, args.width or 1, args.max_pixels)
    noise = _load_noise(args.noise) if args.noise else None
    if args.expand:
        _bundled_llm(args)
    expander = _expander(args) if args.expand else _no_expander(args)
    pipe = _pipeline(args, Pipeline)
    prompt = _expand_prompt(expander, args.prompt, args.seed, pipe.tokenizer, pipe.spec.template) if expander \
        else args.prompt
    _note_words_not_understood(pipe, prompt)  # the words the model will see, after any expansion
    pipe.max_pixels = args.max_pixels
    height, width = pipe.spec.size
    req = Request(prompt=prompt, height=args.height or height,
                  width=args.width or width, steps=args.steps, sigmas=args.sigmas,
                  seed=args.seed, noise=noise, negative_prompt=args.negative_prompt, cfg_scale=args.cfg)
    image = None
    for step in _progress(pipe.generate(req), total=len(args.sigmas) if args.sigmas else args.steps):
        image = step.image
    for w in pipe.warnings:
        print(f"qwen-edge: warning: {w}", file=sys.stderr)
    save_png(np.asarray(image), args.output)
    print(args.output)
    return 0


def _note_words_not_understood(pipe, prompt: str) -> None:
    """The embedded default only knows its procedural world (qwen_edge.world): name the words it ignores."""
    from .spec import default_model

    try:
        is_default = Path(pipe.spec.root).resolve() == default_model().resolve()
    except QwenEdgeError:  # no embedded model installed: nothing to compare with
        return
    if is_default and prompt.strip():
        from .world import parse_prompt

        unknown = parse_prompt(prompt).unknown
        if unknown:
            print(f"qwen-edge: note: words not understood: {' '.join(unknown)}", file=sys.stderr)


def _pipeline(args, pipeline_cls):
    """The torch runtime on a checkpoint, or the onnx runtime on a bundle."""
    if args.runtime == "coreml":
        return _coreml_pipeline(args)
    if args.runtime != "onnx":
        if args.bundle or args.device or args.low_memory or args.no_verify:
            raise UsageError("--bundle, --device, --low-memory and --no-verify need --runtime onnx")
        return pipeline_cls.from_pretrained(args.model, lora=args.lora, lora_scale=args.lora_scale)
    if args.bundle is None:
        raise UsageError("--runtime onnx needs --bundle (make one with qwen-edge export)")
    if args.model or args.lora:
        raise UsageError("--model and --lora do not apply to a bundle: export the checkpoint (with its LoRA) instead")
    from qwen_edge.runtimes.onnx import pipeline

    return pipeline(args.bundle, device=args.device or "cpu", low_memory=args.low_memory, verify=not args.no_verify)


def _coreml_pipeline(args):
    """A Core ML bundle: Core ML itself on macOS, qwen-edge's MIL interpreter elsewhere (it says which)."""
    if args.bundle is None:
        raise UsageError("--runtime coreml needs --bundle (make one with qwen-edge export --target coreml)")
    if args.model or args.lora or args.device or args.low_memory:
        raise UsageError("--model, --lora, --device and --low-memory do not apply to --runtime coreml")
    from qwen_edge.runtimes.coreml import pipeline

    pipe = pipeline(args.bundle, verify=not args.no_verify)
    print(f"qwen-edge: running on {pipe.components.backend_name}", file=sys.stderr)
    return pipe


def _export_args(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint to a bundle of per-component models")
    p.add_argument("--model", help="checkpoint directory or cached Hugging Face repo id (default: the embedded model)")
    p.add_argument("--target", default="onnx", help="onnx (default), qnn or coreml")
    p.add_argument("--quant", help="fp32 (default for onnx), fp16, int8 (int8 compute), w8a32 (weight-only int8), int4, "
                   "w8a16 (default for qnn), mixed; "
                   "coreml: fp16 (default), int8, int4 (needs --ios18), palette4, palette6, palette8, mixed")
    p.add_argument("--height", type=int, help="static image height (default: the model's default size)")
    p.add_argument("--width", type=int, help="static image width (default: the model's default size)")
    p.add_argument("--text-len", type=int, default=256, help="prompt tokens after the template (default 256)")
    p.add_argument("--steps", type=int, default=4, help="sampler steps the bundle's schedule is recorded for")
    p.add_argument("--components", default="text_encoder,transformer,vae_decoder",
                   help="comma-separated: text_encoder,transformer,vae_decoder,vae_encoder")
    p.add_argument("--prompts", type=Path, help="text file, one prompt per line: the torch sample run that drives "
                   "the parity gates and calibration (default: a few built-in prompts; for the embedded default, "
                   "training captions covering every background)")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write (replaced atomically)")
    p.add_argument("--sizes", help="coreml: more HEIGHTxWIDTH sizes the packages accept (enumerated shapes), "
                   "e.g. 512x512,768x512")
    p.add_argument("--ios18", action="store_true", help="coreml: minimum deployment iOS 18 / macOS 15 "
                   "(per-block 4-bit; default iOS 17 / macOS 14)")
    p.add_argument("--chunk-limit", help="coreml: split a component whose package would exceed this size at block "
                   "boundaries (default 1GB)")
    p.add_argument("--ane", action="store_true", help="coreml: 2.1 transformer in its Neural Engine-friendly form "
                   "(per-head attention, linears as 1x1 convs); same weights, measure it on a Mac")
    p.add_argument("--test-vectors", action="store_true", help="record conformance vectors (every intermediate "
                   "of one generation) into vectors/ for checking a port: qwen-edge conform, docs/bundle.md")
    p.add_argument("--vector-prompt", help="--test-vectors: the prompt (default: a fixed two-object prompt)")
    p.add_argument("--vector-seed", type=int, default=0, help="--test-vectors: the seed (default 0)")
    p.add_argument("--ort-format", action="store_true", help="also write ORT-format models (.ort) and "
                   "required_operators.config for ONNX Runtime Mobile")
    p.add_argument("--qnn-context", action="store_true", help="qnn: also write each graph precompiled for the NPU "
                   "(EPContext model + QNN context binary), which generate --device npu loads instead of compiling")
    p.add_argument("--precompute-modulation", action="store_true", help="2.1: tabulate the transformer's "
                   "modulation for the bundle's sigmas instead of shipping the timestep/modulation weights "
                   "(the bundle then runs its own schedule only)")
    p.add_argument("--stream", action="store_true", help="2.1, --quant fp32|int8: trace the text encoder and "
                   "transformer on the meta device and stream their weights from safetensors, quantizing as they "
                   "stream (the fp32 model is never in memory: for the full 8B + 7.1B models); --components "
                   "text_encoder and/or transformer, vae_decoder (exported normally) with both")
    p.add_argument("--dynamic", action="store_true", help="onnx, --quant fp32|fp16|int8|int4: symbolic image-size axes, "
                   "so the bundle generates at any size on the patch grid (--height/--width: its default and gate size)")
    p.add_argument("--block-size", type=int, help="int4, w8a32, mixed: weight block length along K, 32, 64 or 128 "
                   "(default: per weight, the largest of 64 and 32 that divides K, so no block is padded)")
    p.add_argument("--expander-llm", type=Path, help="a causal LM folder (transformers, exported here, or already "
                   "ONNX with a KV cache) put into expander/ as the bundle's prompt expander (generate --expand "
                   "uses it)")
    p.set_defaults(run=_export)


def _export(args) -> int:
    from .errors import require

    require("torch", "torch")  # every exporter runs the torch model; a device install has none (issue 9)
    components = tuple(c.strip() for c in args.components.split(",") if c.strip())
    extra = {"prompts": _read_prompts(args.prompts)} if args.prompts else {}
    extras = {"test_vectors": args.test_vectors, "vector_prompt": args.vector_prompt,
              "vector_seed": args.vector_seed, "ort_format": args.ort_format, "expander_llm": args.expander_llm,
              "qnn_context": args.qnn_context, "precompute_modulation": args.precompute_modulation,
              "stream": args.stream, "dynamic": args.dynamic, "block_size": args.block_size}
    if args.target == "coreml":
        if args.test_vectors or args.ort_format or args.expander_llm or args.vector_prompt or args.vector_seed:
            raise UsageError("--test-vectors, --ort-format and --expander-llm apply to --target onnx and qnn")
        if args.qnn_context or args.precompute_modulation or args.stream or args.dynamic or args.block_size is not None:
            raise UsageError("--qnn-context (--target qnn), --precompute-modulation (onnx, qnn), --stream, --dynamic "
                             "and --block-size (onnx) do not apply to --target coreml (it takes enumerated --sizes)")
        return _export_coreml(args, components, extra)
    if args.sizes or args.ios18 or args.chunk_limit or args.ane:
        raise UsageError("--sizes, --ios18, --chunk-limit and --ane apply to --target coreml only")
    from qwen_edge.export.onnx import export_bundle

    export_bundle(args.out, args.model, target=args.target, quant=args.quant, height=args.height,
                  width=args.width, text_len=args.text_len, steps=args.steps, components=components,
                  log=lambda msg: print(f"qwen-edge: {msg}", file=sys.stderr), **extra, **extras)
    print(args.out)
    return 0


def _export_coreml(args, components: tuple[str, ...], extra: dict) -> int:
    from qwen_edge.export import coreml
    from qwen_edge.spec import ModelSpec, default_model

    family = ModelSpec.from_checkpoint(args.model if args.model is not None else default_model()).family.name
    sizes = coreml.parse_sizes(args.sizes, family) if args.sizes else ()
    limit = coreml.parse_size(args.chunk_limit) if args.chunk_limit else coreml.DEFAULT_CHUNK_LIMIT
    height, width = args.height or (sizes[0][0] if sizes else None), args.width or (sizes[0][1] if sizes else None)
    coreml.export_coreml(args.out, args.model, quant=args.quant or "fp16", height=height, width=width, sizes=sizes,
                         text_len=args.text_len, steps=args.steps, components=components, ios18=args.ios18,
                         chunk_limit=limit, ane=args.ane, log=lambda msg: print(f"qwen-edge: {msg}", file=sys.stderr),
                         **extra)
    print(args.out)
    return 0


def _read_prompts(path: Path) -> tuple[str, ...]:
    try:
        prompts = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--prompts file {path} cannot be read ({e})") from None
    if not prompts:
        raise InputError(f"--prompts file {path} holds no prompt")
    return prompts


def _progress(steps, total: int):
    from tqdm import tqdm

    return tqdm(steps, total=total, desc="sampling", unit="step", disable=not sys.stderr.isatty(), leave=False)


def _check_output(path: Path) -> None:
    if path.suffix.lower() != ".png":
        raise UsageError(f"--output must be a .png file, not {path.name!r}")
    if not path.parent.is_dir():
        raise InputError(f"output folder {path.parent} does not exist")


def _load_noise(path: Path):
    import numpy as np

    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"--noise file {path} does not exist") from None
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"--noise file {path} is not a readable .npy array ({e})") from None


def _expand_args(sub) -> None:
    p = sub.add_parser("expand", help="expand a terse prompt into the detailed description a model expects")
    p.add_argument("prompt")
    p.add_argument("--seed", type=int, default=0, help="chooses what the prompt leaves open (and LLM sampling)")
    p.add_argument("--model", help="fit the expansion to this checkpoint's text encoder (default: the embedded model)")
    _expander_options(p)
    p.set_defaults(run=_expand)


def _expander_options(p) -> None:
    p.add_argument("--expander", choices=["template", "llm"], help="template (default: rules, no model) or llm")
    p.add_argument("--llm", type=Path, help="folder of a causal LM exported to ONNX with a KV cache (--expander llm)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="bound on the LLM's rewrite (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="LLM sampling temperature (default 0: greedy)")


def _expander(args):
    from .expand import check_prompt, expander

    check_prompt(args.prompt)  # before any model is loaded
    if args.seed < 0:
        raise UsageError("--seed must be non-negative")
    name = args.expander or ("llm" if args.llm else "template")
    if name == "llm" and args.llm is None:
        raise UsageError("--expander llm needs --llm DIR (a causal LM exported to ONNX with a KV cache)")
    if name == "template" and args.llm is not None:
        raise UsageError("--llm is only used with --expander llm")
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    return expander(name, llm=args.llm, max_new_tokens=args.max_new_tokens, temperature=args.temperature)


def _bundled_llm(args) -> None:
    """``generate --runtime onnx --bundle B --expand``: the LLM expander the bundle carries, unless --llm or
    --expander template says otherwise."""
    if args.runtime != "onnx" or args.bundle is None or args.llm is not None or args.expander == "template":
        return
    from .expand.bundled import bundled_expander

    folder = bundled_expander(args.bundle, verify=not args.no_verify)
    if folder is not None:
        args.llm = folder
    elif args.expander == "llm":
        raise UsageError(f"--expander llm needs --llm DIR: bundle {args.bundle} carries no expander "
                         "(export it with --expander-llm)")


def _no_expander(args) -> None:
    """Without --expand, the expansion options are a mistake worth saying so."""
    if args.expander or args.llm or args.max_new_tokens != 256 or args.temperature != 0.0:
        raise UsageError("--expander, --llm, --max-new-tokens and --temperature need --expand")


def _expand_prompt(expander, prompt: str, seed: int, tokenizer, template, echo: bool = True) -> str:
    """Expand, fit to the text encoder when one is known, and print the notes (and the result) on stderr."""
    from .expand import fit_to_encoder

    expansion = expander(prompt, seed=seed)
    if tokenizer is not None:
        expansion = fit_to_encoder(expansion, tokenizer, template)
    for note in ([f"expanded prompt: {expansion.text}"] if echo else []) + list(expansion.notes):
        print(f"qwen-edge: note: {note}", file=sys.stderr)
    return expansion.text


def _expand(args) -> int:
    from . import prompt as prompt_mod
    from .errors import IntegrityError
    from .spec import ModelSpec, default_model

    expander = _expander(args)
    tokenizer = template = None
    try:
        spec = ModelSpec.from_checkpoint(args.model if args.model is not None else default_model())
        tokenizer, template = prompt_mod.load_tokenizer(spec.tokenizer_dir), spec.template
    except IntegrityError:
        if args.model is not None:
            raise
        print("qwen-edge: note: the embedded default model is not installed: not fitted to a text encoder "
              "(pass --model)", file=sys.stderr)
    except MissingDependencyError:  # a device install (no torch) cannot read a checkpoint: expand unfitted
        if args.model is not None:
            raise
        print("qwen-edge: note: reading the embedded default model needs pip install 'qwen-edge[torch]': not "
              "fitted to a text encoder", file=sys.stderr)
    print(_expand_prompt(expander, args.prompt, args.seed, tokenizer, template, echo=False))
    return 0


def _bench_args(sub) -> None:
    p = sub.add_parser("bench", help="measure a bundle: cold start, latency per component and step, peak RSS, "
                       "size, FLOPs and the achieved fraction of this CPU's GEMM peak")
    p.add_argument("--bundle", type=Path, required=True, help="an exported bundle (qwen-edge export)")
    p.add_argument("--runtime", default="onnx", choices=["onnx", "torch"],
                   help="onnx (default) or torch: the bundle's source checkpoint in torch fp32 eager, same size")
    p.add_argument("--model", help="--runtime torch: the checkpoint (default: the one the bundle was exported from)")
    p.add_argument("--device", default="cpu", choices=["cpu", "npu"], help="onnx runtime: cpu (default) or npu")
    p.add_argument("--runs", type=int, default=5, help="timed generations, after --warmup (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed generations first (default 1)")
    p.add_argument("--threads", type=int, help="intra-op threads (default: the physical cores)")
    p.add_argument("--profile", action="store_true", help="ORT's profiler on the transformer step: time per op type")
    p.add_argument("--prompt", help="the prompt generated (default: a fixed two-object prompt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cold-start", action="store_true", help="skip the fresh-process cold-start launches")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS processes")
    p.add_argument("--no-peak", action="store_true", help="skip the GEMM peak microbenchmarks")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")
    p.set_defaults(run=_bench)


def _bench(args) -> int:
    import json

    from tqdm import tqdm

    from .bench import PROMPT, bench, format_report

    if args.model and args.runtime != "torch":
        raise UsageError("--model applies to --runtime torch only (the onnx runtime runs the bundle)")
    if args.prompt is not None and not args.prompt.strip():
        raise UsageError("--prompt is empty; say what the image should show")
    bar = tqdm(desc="bench", unit="phase", disable=not sys.stderr.isatty(), leave=False)

    def progress(msg: str) -> None:
        bar.set_description(msg)
        bar.update(1)

    try:
        report = bench(args.bundle, runtime=args.runtime, device=args.device, runs=args.runs, warmup=args.warmup,
                       threads=args.threads, profile=args.profile, model=args.model, prompt=args.prompt or PROMPT,
                       seed=args.seed, cold_start=not args.no_cold_start, memory=not args.no_memory,
                       peak=not args.no_peak, progress=progress)
    finally:
        bar.close()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _verify_args(sub) -> None:
    p = sub.add_parser("verify", help="measure bundles against the torch pipeline (or another bundle) side by side")
    p.add_argument("--bundle", type=Path, action="append", required=True,
                   help="a bundle to check; repeat for several quant recipes of the same checkpoint")
    p.add_argument("--reference", default="torch", help="torch (default: the fp32 pipeline of the bundle's "
                   "checkpoint) or another bundle directory")
    p.add_argument("--model", help="the torch reference's checkpoint (default: the one the bundle's manifest names)")
    p.add_argument("--prompts", type=Path, help="text file, one prompt per line, # comments (default: 8 held-out "
                   "prompts of the default's world, or a few generic ones)")
    p.add_argument("--seed", type=int, default=0, help="prompt i uses seed S + i (default 0)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--html", type=Path, help="write a self-contained HTML report (images, heat-maps, plots)")
    p.add_argument("--min-psnr", type=float, help="image PSNR threshold (dB) for every bundle, instead of the "
                   "bundle's declared one")
    p.add_argument("--min-component-psnr", type=float, help="component PSNR threshold (dB) for every component, "
                   "instead of the declared ones")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: the physical cores)")
    p.set_defaults(run=_verify)


def _verify(args) -> int:
    import json

    from .errors import NumericalError
    from .report import format_text, write_html
    from .verify import read_prompts, verify

    if args.seed < 0:
        raise UsageError("--seed must be non-negative")
    if args.threads is not None and args.threads < 1:
        raise UsageError("--threads must be at least 1")
    if args.html is not None and not (args.html.parent if str(args.html.parent) else Path(".")).is_dir():
        raise InputError(f"--html folder {args.html.parent} does not exist")
    prompts = read_prompts(args.prompts) if args.prompts else None
    report = verify(args.bundle, args.reference, prompts, args.seed, model=args.model, min_image_psnr=args.min_psnr,
                    min_component_psnr=args.min_component_psnr, threads=args.threads)
    print(json.dumps(report.to_json(), indent=2, allow_nan=False) if args.json else format_text(report))
    if args.html is not None:
        print(f"qwen-edge: wrote {write_html(report, args.html)}", file=sys.stderr)
    if report.failures:
        raise NumericalError("; ".join(report.failures))
    return 0


def _conform_args(sub) -> None:
    p = sub.add_parser("conform", help="replay a bundle's conformance vectors (export --test-vectors) through a "
                       "Python runtime and compare every intermediate with its tolerance")
    p.add_argument("--bundle", type=Path, required=True, help="an exported bundle with conformance vectors")
    p.add_argument("--runtime", default="onnx", choices=["onnx", "ort", "torch"],
                   help="onnx (default: the bundle's graphs), ort (its ORT-format models, as ORT Mobile runs them) "
                   "or torch (the checkpoint it was exported from, fp32)")
    p.add_argument("--vectors", type=Path, help="a vectors folder (with vectors.json) instead of the bundle's own")
    p.add_argument("--model", help="--runtime torch: the checkpoint (default: the one the bundle's manifest names)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 checks (trusted storage only)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: the physical cores)")
    p.set_defaults(run=_conform)


def _conform(args) -> int:
    from .conform import check
    from .errors import NumericalError

    if args.model and args.runtime != "torch":
        raise UsageError("--model applies to --runtime torch only")
    if args.threads is not None and args.threads < 1:
        raise UsageError("--threads must be at least 1")
    report = check(args.bundle, runtime=args.runtime, vectors=args.vectors, model=args.model,
                   verify=not args.no_verify, threads=args.threads, progress=lambda steps: _progress(steps, None))
    print("\n".join(report.lines()))
    if report.failed:
        names = ", ".join(r.name for r in report.failed)
        raise NumericalError(f"{len(report.failed)} of {len(report.rows)} conformance vectors are out of "
                             f"tolerance on the {args.runtime} runtime: {names}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qwen-edge", description="Qwen-Image text-to-image on edge devices.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _generate_args(sub)
    _export_args(sub)
    _expand_args(sub)
    _conform_args(sub)
    _bench_args(sub)
    _verify_args(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("QWEN_EDGE_DEBUG") == "1"
    try:
        args = build_parser().parse_args(argv)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the pipeline's own warnings are printed as one line each
            return args.run(args)
    except QwenEdgeError as e:
        if debug:
            raise
        print(f"qwen-edge: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("qwen-edge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
