"""``qwen-edge bench``: how fast, how big and how efficient a bundle is on this machine (issue 6).

:func:`bench` measures one bundle on one runtime and returns a JSON-ready dict:

- ``size_bytes``: every component's files as the manifest lists them (and the tokenizer's);
- ``cold_start``: a fresh Python process launched -> its first sampler step done (imports, sha256 checks, the
  sessions, tokenizing, the text encoder, text K/V and one transformer step), wall time measured by the
  parent; ``s`` with ONNX Runtime's optimised-graph cache warm (every launch after the first), ``first_s``
  with it empty (the very first launch);
- ``latency_s``: in this process, after ``warmup`` generations, ``runs`` whole generations (tokenize ->
  encode -> the bundle's steps -> decode): end to end, and per component (text encoder, text K/V = binding
  the prompt, transformer per step, VAE decoder), median and min;
- ``peak_rss_mb``: VmHWM of a fresh process (:mod:`qwen_edge.fresh_process`) generating one image
  (``generate``), the same with ``low_memory`` (one session at a time), and ``baseline``: a process that
  imported the runtime and read the bundle but opened no session;
- ``flops``: multiply-add FLOPs of one call of each graph, counted from the graph (:mod:`qwen_edge.flops`);
- ``gemm_peak_gflops``: this CPU's GEMM microbenchmarks on the same threads (:mod:`qwen_edge.peak`);
- ``achieved``: transformer FLOPs per step / median step time, and that as a fraction of the fp32 and the
  int8 GEMM peak;
- ``profile`` (``profile=True``, ONNX Runtime on the CPU): the transformer step under ORT's profiler, time
  per op type (:func:`qwen_edge.op_profile.summarize_profile`).

The ONNX Runtime path imports no torch (FLOPs and the ORT GEMM peaks need the ``onnx`` package; without it
they are None). ``runtime="torch"`` runs the checkpoint the bundle was exported from (or ``model``) in torch
fp32 eager at the bundle's size and schedule: the baseline users would otherwise run.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from . import bundle as bundle_mod
from .errors import InputError, UsageError
from .fresh_process import PROMPT, open_pipeline, run_child

RUNTIMES = ("onnx", "torch")
COMPONENT_KEYS = ("text_encoder", "text_kv", "transformer", "vae_decoder")
TOP_OPS = 10


def bench(bundle, runtime: str = "onnx", device: str = "cpu", runs: int = 5, warmup: int = 1,
          threads: int | None = None, profile: bool = False, *, model=None, prompt: str = PROMPT, seed: int = 0,
          cold_start: bool = True, memory: bool = True, peak: bool = True, gemm_n: int | None = None,
          progress: Callable[[str], None] | None = None) -> dict:
    """Measure ``bundle`` (a directory) on ``runtime`` (onnx, or torch on its source checkpoint) and ``device``
    (cpu, or npu: QNN HTP). ``runs``/``warmup``: timed and untimed generations in this process; ``threads``:
    intra-op threads (default: the physical cores). ``cold_start``/``memory``/``peak``: the fresh-process
    launches, the peak-RSS processes and the GEMM microbenchmarks (``gemm_n``: their matrix size), each
    skippable. Returns the dict described in the module docstring. A missing or tampered bundle raises
    :class:`~qwen_edge.errors.IntegrityError`."""
    progress = progress or (lambda msg: None)
    _check_args(runtime, device, runs, warmup, threads, profile, prompt)
    from .runtimes.onnx import physical_cores

    threads = threads or physical_cores()
    b = bundle_mod.load(bundle, verify=True)
    m = b.manifest
    model = _source_model(m, model) if runtime == "torch" else None
    report = {"bundle": str(b.root), "family": m.family, "recipe": m.recipe, "target": m.target,
              "height": m.height, "width": m.width, "text_len": m.text_len, "steps": m.sampler.steps,
              "runtime": runtime, "device": device, "threads": threads, "runs": runs, "warmup": warmup,
              "machine": machine(), "size_bytes": sizes(b)}
    progress("counting FLOPs")
    report["flops"] = graph_flops(b)
    with tempfile.TemporaryDirectory(prefix="qwen-edge-bench.") as tmp:
        job = {"runtime": runtime, "bundle": str(b.root), "model": None if model is None else str(model),
               "device": device, "threads": threads, "prompt": prompt, "seed": seed, "cache": str(Path(tmp) / "ort")}
        if cold_start or memory:
            progress("fresh processes: cold start and peak RSS")
            report.update(_fresh_processes(job, cold_start, memory))
        progress(f"generating: {warmup} warm-up + {runs} timed")
        latency, feeds = _latency(job, m, runs, warmup)
        report["latency_s"] = latency
        if profile:
            progress("profiling the transformer step")
            from .op_profile import profile_graph

            report["profile"] = {"transformer": profile_graph(b.path(b.component("transformer").file),
                                                              feeds["transformer"], threads, runs)}
    if peak:
        progress("GEMM microbenchmarks")
        from .peak import DEFAULT_N, gemm_peaks

        report["gemm_peak_gflops"] = gemm_peaks(threads, gemm_n or DEFAULT_N)
    report["achieved"] = achieved(report)
    return report


def _check_args(runtime: str, device: str, runs: int, warmup: int, threads: int | None, profile: bool,
                prompt: str) -> None:
    if runtime not in RUNTIMES:
        raise UsageError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if device not in ("cpu", "npu"):
        raise UsageError(f"unknown device {device!r}; choose cpu or npu")
    if runtime == "torch" and device != "cpu":
        raise UsageError("the torch runtime runs on the cpu only")
    if profile and (runtime != "onnx" or device != "cpu"):
        raise UsageError("--profile uses ONNX Runtime's CPU profiler: it needs --runtime onnx --device cpu")
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise UsageError(f"runs must be a positive integer, got {runs!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise UsageError(f"warmup must be a non-negative integer, got {warmup!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise UsageError(f"threads must be a positive integer, got {threads!r}")
    if not prompt or not prompt.strip():
        raise InputError("the prompt is empty; say what the image should show")


def _source_model(manifest: bundle_mod.Manifest, model) -> Path | None:
    """The checkpoint the torch runtime runs: ``model``, else the one the bundle records (None: the default)."""
    if model is None:
        recorded = manifest.source.get("model")
        if recorded in (None, "embedded default"):
            return None
        model = recorded
    if not Path(model).is_dir():
        raise InputError(f"--runtime torch needs the bundle's checkpoint; {model} is not a directory (pass --model)")
    return Path(model)


# -- sizes, FLOPs, machine ------------------------------------------------------------------------------------


def sizes(b: bundle_mod.Bundle) -> dict:
    """Bytes on disk per component (every file its manifest entry lists), of the tokenizer, and in total, where a
    file several components list (2.1's weights shared by text_kv and transformer) counts once; ``shared``: the
    bytes of such files, ``sharing``: the components listing them."""
    def total(files) -> int:
        return sum(b.path(f).stat().st_size for f in files)

    comps = {name: total(c.files) for name, c in b.manifest.components.items()}
    tok = total(b.manifest.tokenizer.files)
    listed = [f for c in b.manifest.components.values() for f in c.files]
    shared = {f for f in listed if listed.count(f) > 1}
    sharing = [name for name, c in b.manifest.components.items() if shared & set(c.files)]
    return {"components": comps, "tokenizer": tok, "shared": total(shared), "sharing": sharing,
            "total": total(set(listed) | set(b.manifest.tokenizer.files))}


def graph_flops(b: bundle_mod.Bundle) -> dict | None:
    """{component: FLOPs of one call} counted from each ONNX graph; None without the onnx package."""
    from . import flops

    try:
        import onnx  # noqa: F401  (the counter needs it)
    except ImportError:
        return None
    out = {}
    for name, comp in b.manifest.components.items():
        if comp.format != "onnx":
            continue
        counted = flops.count(b.path(comp.file))
        out[name] = counted.total if not counted.unknown else None  # an opaque node (EPContext): not counted
    return out


def machine() -> dict:
    """The CPU's name, its logical and physical cores, and the 1-minute load average when measured."""
    from .runtimes.onnx import physical_cores

    name = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": name, "logical_cores": os.cpu_count(), "physical_cores": physical_cores(),
            "load_average_1min": None if load is None else round(load, 2)}


def achieved(report: dict) -> dict | None:
    """Transformer FLOPs per step / median step time, against the fp32 and int8 GEMM peaks (CPU only)."""
    step = report.get("latency_s", {}).get("components", {}).get("transformer")
    fl = (report.get("flops") or {}).get("transformer")
    if not step or not fl:
        return None
    gflops = fl / step["median"] / 1e9
    out = {"transformer_step_gflops": gflops}
    peaks = report.get("gemm_peak_gflops")
    if peaks and report["device"] == "cpu":
        out["fraction_of_fp32_peak"] = gflops / peaks["fp32"]
        out["fraction_of_int8_peak"] = None if not peaks.get("int8_ort") else gflops / peaks["int8_ort"]
    return out


# -- in-process latency -----------------------------------------------------------------------------------------


class Timed:
    """Pipeline components with every call timed (seconds, per key of :data:`COMPONENT_KEYS`): the text
    encoder, binding a prompt (2.1's text K/V), each transformer step, the VAE decoder."""

    def __init__(self, inner):
        self.inner = inner
        self.times: dict[str, list[float]] = defaultdict(list)

    @contextmanager
    def timer(self, key: str):
        start = time.perf_counter()
        yield
        self.times[key].append(time.perf_counter() - start)

    def encode_text(self, ids: np.ndarray) -> np.ndarray:
        with self.timer("text_encoder"):
            return self.inner.encode_text(ids)

    def denoiser(self, text: np.ndarray, h: int, w: int):
        with self.timer("text_kv"):
            fn = self.inner.denoiser(text, h, w)

        def call(latents: np.ndarray, sigma: float) -> np.ndarray:
            with self.timer("transformer"):
                return fn(latents, sigma)

        return call

    def decode(self, z: np.ndarray) -> np.ndarray:
        with self.timer("vae_decoder"):
            return self.inner.decode(z)


def _latency(job: dict, manifest: bundle_mod.Manifest, runs: int, warmup: int) -> tuple[dict, dict]:
    """(latency figures, the last feed of every graph (onnx runtime; {} for torch))."""
    from .pipeline import Request

    pipe = open_pipeline(job)
    feeds: dict = {}
    if job["runtime"] == "onnx":
        inner_run = pipe.components.run

        def run(name, feed):
            feeds[name] = feed
            return inner_run(name, feed)

        pipe.components.run = run
    timed = Timed(pipe.components)
    pipe.components = timed
    req = Request(job["prompt"], height=manifest.height, width=manifest.width, steps=manifest.sampler.steps,
                  seed=job["seed"])
    for _ in range(warmup):
        _generate(pipe, req)
    timed.times.clear()
    total = []
    for _ in range(runs):
        start = time.perf_counter()
        _generate(pipe, req)
        total.append(time.perf_counter() - start)
    comps = {k: _stats(timed.times[k]) for k in COMPONENT_KEYS if timed.times.get(k)}
    return {"end_to_end": _stats(total), "components": comps}, feeds


def _generate(pipe, req) -> np.ndarray:
    *_, last = pipe.generate(req)
    return last.image


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "n": len(values)}


# -- fresh processes: cold start, peak RSS ------------------------------------------------------------------------


def _fresh_processes(job: dict, cold_start: bool, memory: bool) -> dict:
    """Cold start (launch -> first step) and peak RSS, each from fresh processes (see :func:`child`)."""
    out: dict = {}
    first = run_child({**job, "mode": "generate"})  # onnx: fills the optimised-graph cache
    warm = run_child({**job, "mode": "generate"}) if job["runtime"] == "onnx" else first
    if cold_start:
        out["cold_start"] = {"s": warm["marks"]["first_step"], "first_s": first["marks"]["first_step"],
                             "imported_s": warm["marks"]["imported"], "loaded_s": warm["marks"]["loaded"],
                             "image_s": warm["marks"]["image"],
                             "what": "fresh process launched -> first sampler step done (s: ORT graph cache "
                                     "warm; first_s: cache empty)"}
    if memory:
        rss = {"generate": warm["peak_rss_mb"]}
        if job["runtime"] == "onnx":
            rss["low_memory"] = run_child({**job, "mode": "generate", "low_memory": True})["peak_rss_mb"]
            rss["baseline"] = run_child({**job, "mode": "baseline"})["peak_rss_mb"]
        out["peak_rss_mb"] = rss
    return out


# -- text report ----------------------------------------------------------------------------------------------


def format_report(r: dict) -> str:
    """A short human-readable summary of :func:`bench`'s dict."""
    mb = 2**20
    lines = [f"{r['bundle']}: {r['family']} {r['recipe']} ({r['target']}), {r['height']}x{r['width']}, "
             f"{r['steps']} steps, text_len {r['text_len']}; {r['runtime']} on {r['device']}, threads: {r['threads']}",
             f"machine: {r['machine']['cpu'] or '?'}, {r['machine']['physical_cores']} cores, load average "
             f"{r['machine']['load_average_1min']}"]
    sz = r["size_bytes"]
    shared = (f" ({' and '.join(sz['sharing'])} include {sz['shared'] / mb:.2f} MB of shared weights, counted once "
              "in the total)") if sz.get("shared") else ""
    lines.append("size: " + ", ".join(f"{k} {v / mb:.2f} MB" for k, v in sz["components"].items())
                 + f", tokenizer {sz['tokenizer'] / mb:.2f} MB; total {sz['total'] / mb:.2f} MB{shared}")
    if "cold_start" in r:
        c = r["cold_start"]
        lines.append(f"cold start (fresh process -> first step): {c['s']:.3f} s (empty graph cache: "
                     f"{c['first_s']:.3f} s)")
    lat = r["latency_s"]
    e2e = lat["end_to_end"]
    lines.append(f"end to end ({r['steps']} steps): median {e2e['median']:.4f} s, min {e2e['min']:.4f} s "
                 f"over {e2e['n']} runs after {r['warmup']} warm-up")
    for k, v in lat["components"].items():
        label = "transformer (per step)" if k == "transformer" else k
        lines.append(f"  {label}: median {1e3 * v['median']:.2f} ms, min {1e3 * v['min']:.2f} ms")
    if "peak_rss_mb" in r:
        lines.append("peak RSS: " + ", ".join(f"{k} {v:.1f} MB" for k, v in r["peak_rss_mb"].items()))
    if r.get("flops"):
        lines.append("FLOPs per call: " + ", ".join(f"{k} {v / 1e9:.3f} G" if v else f"{k} ?"
                                                    for k, v in r["flops"].items()))
    if r.get("gemm_peak_gflops"):
        p = r["gemm_peak_gflops"]
        lines.append(f"GEMM peak ({p['n']}^3, threads: {p['threads']}): fp32 NumPy {_g(p['fp32_numpy'])}, fp32 ORT "
                     f"{_g(p['fp32_ort'])}, int8 ORT {_g(p['int8_ort'])} GFLOP/s")
    a = r.get("achieved")
    if a:
        line = f"transformer step: {a['transformer_step_gflops']:.1f} GFLOP/s"
        if a.get("fraction_of_fp32_peak") is not None:
            line += f" = {100 * a['fraction_of_fp32_peak']:.0f}% of the fp32 peak"
        if a.get("fraction_of_int8_peak") is not None:
            line += f", {100 * a['fraction_of_int8_peak']:.0f}% of the int8 peak"
        lines.append(line)
    if "profile" in r:
        p = r["profile"]["transformer"]
        lines.append(f"profile of the transformer step ({p['runs']} runs): {p['step_ms']:.2f} ms, kernels "
                     f"{p['kernel_ms']:.2f} ms, matrix ops {p['matrix_ms']:.2f} ms")
        for o in p["ops"][:TOP_OPS]:
            lines.append(f"  {o['op']:<28} {o['ms']:8.3f} ms {o['pct']:5.1f}%  ({o['calls']} calls)")
    return "\n".join(lines)


def _g(v: float | None) -> str:
    return "?" if v is None else f"{v:.1f}"
