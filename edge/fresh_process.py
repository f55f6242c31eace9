"""Measurements in fresh processes (``qwen-edge bench``, ``benchmarks/``): cold start and peak memory.

A fresh interpreter is the only honest place for both: a cold start includes importing the runtime, and a
process's peak RSS (VmHWM, reset by exec) includes everything it ever held. :func:`run_child` starts
``python -c "...child(job)"`` with a JSON job and reads back one JSON line; :func:`child` does one of:

- ``generate``: open the job's pipeline and generate one image, marking the times (seconds since the parent
  launched it) when imports were done, the pipeline was opened, the first sampler step and the image were done;
- ``baseline``: import the runtime and read the bundle (tokenizer included) but open no session;
- ``component``: the baseline's state, then one graph opened in a low-memory runtime and run on a saved feed
  (so that, net of the baseline, it is the graph's weights and activations).

Each reports the process's peak RSS in MB. A :class:`~qwen_edge.errors.QwenEdgeError` in the child is re-raised
in the parent with its class (so the CLI exits with its code and one line). No torch on the onnx path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import bundle as bundle_mod
from . import errors
from .errors import QwenEdgeError

PROMPT = "a large red circle above a small blue square on a black background"


def open_pipeline(job: dict, low_memory: bool = False):
    """The pipeline a bench job describes (torch: its checkpoint at the job's threads; onnx: its bundle)."""
    if job["runtime"] == "torch":
        import torch

        from .pipeline import Pipeline

        torch.set_num_threads(job["threads"])
        return Pipeline.from_pretrained(job["model"])
    from .runtimes.onnx import pipeline

    return pipeline(job["bundle"], device=job["device"], low_memory=low_memory, threads=job["threads"],
                    cache_dir=job["cache"])


def run_child(job: dict, timeout: float = 3600) -> dict:
    """Run :func:`child` in a fresh interpreter; its JSON report, with times relative to the launch."""
    job = {**job, "t0": time.time()}
    env = {**os.environ, "QWEN_EDGE_CACHE": job["cache"]} if job.get("cache") else None
    code = "import sys; from qwen_edge.fresh_process import child; child(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(job)], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise QwenEdgeError(f"the measuring process failed ({job['mode']}): {last}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "error" in result:  # the child's own one-line error, re-raised with its class (and so its exit code)
        raise getattr(errors, result["error_class"], QwenEdgeError)(result["error"])
    return result


def child(job_json: str) -> None:
    """A fresh process's measurement (``job["mode"]``): ``generate`` one image (marks: imported, loaded,
    first_step, image), ``baseline`` (import the runtime and read the bundle, open no session) or
    ``component`` (run one graph of a low-memory runtime on the feed saved at ``job["feed"]``). Prints one
    JSON line: the marks in seconds since the parent's launch and the process's peak RSS in MB."""
    job = json.loads(job_json)
    try:
        result = _measure_in_child(job)
    except QwenEdgeError as e:
        result = {"error": str(e), "error_class": type(e).__name__}
    print(json.dumps(result))


def _measure_in_child(job: dict) -> dict:
    marks = {}

    def mark(name: str) -> None:
        marks[name] = time.time() - job["t0"]

    if job["runtime"] == "onnx":
        import onnxruntime  # noqa: F401  (imported lazily by the runtime; part of every launch)

        from .runtimes import onnx as onnx_runtime  # noqa: F401
    else:
        import torch  # noqa: F401
    mark("imported")
    if job["mode"] in ("baseline", "component"):
        b, _held = _baseline(job["bundle"])  # _held keeps the tokenizer: a component is net of the same state
    if job["mode"] == "component":
        from .runtimes.onnx import OnnxComponents

        comps = OnnxComponents(b, low_memory=True, threads=job["threads"], cache_dir=job["cache"])
        with np.load(job["feed"]) as data:
            comps.run(job["component"], {k: data[k] for k in data.files})
    elif job["mode"] != "baseline":
        from .pipeline import Request

        pipe = open_pipeline(job, low_memory=job.get("low_memory", False))
        mark("loaded")
        m = bundle_mod.read_manifest(Path(job["bundle"]))  # the torch runtime runs at the bundle's size too
        req = Request(job["prompt"], height=m.height, width=m.width, steps=m.sampler.steps, seed=job["seed"])
        for _ in pipe.generate(req):
            marks.setdefault("first_step", time.time() - job["t0"])
        mark("image")
    return {"marks": marks, "peak_rss_mb": peak_rss_mb(), "file_rss_mb": file_rss_mb()}


def _baseline(bundle: str) -> tuple:
    """What every peak-RSS figure is net of: (the bundle read and verified, a pipeline with its tokenizer loaded
    and no components, so no session)."""
    from .pipeline import Pipeline
    from .spec import ModelSpec

    b = bundle_mod.load(bundle)
    return b, Pipeline(ModelSpec.from_bundle(b.manifest, b.root), None)


def component_rss(bundle, feeds: dict, threads: int, cache: str | None = None,
                  file_mb: dict | None = None) -> dict:
    """Peak RSS (MB) of a fresh process running each graph alone on its feed (a low-memory runtime holding only
    that session), and of the ``baseline`` process (imports, the bundle read, no session). ``feeds``: graph
    name -> feed, as :func:`latency_feeds` records them. ``file_mb``: a dict to fill with each process's
    file-backed RSS at its end (:func:`file_rss_mb`)."""
    out, file_mb = {}, {} if file_mb is None else file_mb
    with tempfile.TemporaryDirectory(prefix="qwen-edge-rss.") as tmp:
        job = {"runtime": "onnx", "bundle": str(bundle), "device": "cpu", "threads": threads,
               "cache": cache or str(Path(tmp) / "ort")}
        result = run_child({**job, "mode": "baseline"})
        out["baseline"], file_mb["baseline"] = result["peak_rss_mb"], result["file_rss_mb"]
        for name, feed in feeds.items():
            path = Path(tmp) / f"{name}.npz"
            np.savez(path, **feed)
            result = run_child({**job, "mode": "component", "component": name, "feed": str(path)})
            out[name], file_mb[name] = result["peak_rss_mb"], result["file_rss_mb"]
    return out


def latency_feeds(bundle, threads: int | None = None, prompt: str = PROMPT, seed: int = 0) -> dict:
    """The real feed of every graph of ``bundle`` for one generation of ``prompt`` (ONNX Runtime, CPU)."""
    from .pipeline import Request
    from .runtimes.onnx import pipeline

    pipe = pipeline(bundle, threads=threads, cache=False)
    feeds = {}
    inner_run = pipe.components.run

    def run(name, feed):
        feeds.setdefault(name, feed)
        return inner_run(name, feed)

    pipe.components.run = run
    m = pipe.components.bundle.manifest
    for _ in pipe.generate(Request(prompt, height=m.height, width=m.width, steps=m.sampler.steps, seed=seed)):
        pass
    return feeds


def _proc_status_mb(field: str) -> float | None:
    """A ``kB`` field of /proc/self/status in MB; None where /proc does not report it."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            return int(next(line for line in f if line.startswith(field + ":")).split()[1]) / 1024
    except (OSError, StopIteration):
        return None


def file_rss_mb() -> float | None:
    """This process's file-backed resident memory now (RssFile: mapped library code and data, clean pages the
    kernel can drop and re-read), MB; None where /proc does not report it."""
    return _proc_status_mb("RssFile")


def peak_rss_mb() -> float:
    """This process's peak resident set size: VmHWM on Linux (reset by exec, unlike ru_maxrss), else ru_maxrss."""
    peak = _proc_status_mb("VmHWM")
    if peak is None:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KB elsewhere
    return peak
