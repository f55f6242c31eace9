"""``qwen-edge verify``: how far a bundle's output is from its reference, measured side by side.

The reference (the torch fp32 pipeline of the bundle's checkpoint, or another bundle) and every bundle under
test run the same prompts on the same noise (seed = ``seed`` + prompt index, :mod:`qwen_edge.latents`) and the
bundle's own schedule (``manifest.sampler``). Figures per bundle:

- per component: PSNR (peak = the reference output's largest magnitude, as the exporter's gates measure it),
  max abs and max relative error of the bundle's graph against the reference on the sampler's *real* inputs:
  the reference run's token ids, (for 2.1) prompt states, (latents, sigma) at every step and final latents,
  put into each graph's IOSpec layout by :class:`qwen_edge.runtimes.onnx.Feeds`;
- per image: PSNR (8-bit, 200 = identical) and SSIM of the bundle's own generation against the reference's,
  and its wall time;
- prompt fidelity: :func:`qwen_edge.world.evaluate_many` on every image when the checkpoint is the embedded
  default (its evaluator only knows that world), else skipped with the reason;
- the first non-finite value any component produced: which component, at which sampler step, for which prompt;
  for an fp16 bundle also the first node of that graph whose output is non-finite on the same input
  (:func:`first_bad_node`: the layer where fp16 overflows).

Thresholds are the bundle's declared ones (``fidelity.min_image_psnr_db`` and each component's
``fidelity.min_psnr_db``, the export's gates), else the recipe's defaults; a figure below them, or a
non-finite value, is a failure (:attr:`Report.failures`; the CLI exits 5).

Torch is imported only for the torch reference: a bundle checked against another bundle needs the runtime only.
"""

from __future__ import annotations

import itertools
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import bundle as bundle_mod
from .errors import InputError, IntegrityError, NumericalError, QwenEdgeError, UsageError
from .pipeline import Pipeline, Request
from .spec import ModelSpec

PSNR_CAP_DB = 200.0  # identical outputs, as in the manifest (JSON has no infinity)
DEFAULT_WORLD_PROMPTS = 8  # held-out captions of the default's world (qwen_edge.train.evaluate.heldout_prompts)
GENERIC_PROMPTS = (
    "a red circle above a blue square on a white background",
    "a cat sitting on a windowsill at sunset, soft light",
    "a shop sign that says \"OPEN LATE\" on a brick wall at night",
    "a bowl of fruit on a wooden table, top view",
)
GRAPHS = ("text_encoder", "text_kv", "transformer", "vae_decoder")  # what a generation runs, in order

Feed = dict[str, np.ndarray]
Run = Callable[[str, Feed], Feed]  # (graph name, IOSpec inputs) -> IOSpec outputs


# -- the report ----------------------------------------------------------------------------------------------


@dataclass
class BundleResult:
    """One bundle's figures against the reference. ``images``: its (H, W, 3) uint8 images, per prompt."""

    path: str
    label: str
    recipe: str
    target: str
    size_bytes: int
    thresholds: dict
    components: dict = field(default_factory=dict)  # name -> {psnr_db, max_abs_error, max_rel_error, samples}
    per_prompt: list = field(default_factory=list)  # [{psnr_db, ssim, max_abs_diff, seconds, ok?}]
    accuracy: dict | None = None
    non_finite: dict | None = None  # {component, step, prompt, run}
    images: list = field(default_factory=list, repr=False)

    @property
    def image(self) -> dict:
        """Worst and typical image figures over the prompts."""
        psnrs, ssims = [p["psnr_db"] for p in self.per_prompt], [p["ssim"] for p in self.per_prompt]
        return {"psnr_db": min(psnrs), "psnr_db_median": statistics.median(psnrs), "ssim": min(ssims),
                "ssim_mean": round(statistics.fmean(ssims), 5),
                "median_seconds": round(statistics.median(p["seconds"] for p in self.per_prompt), 4)}

    @property
    def failures(self) -> list[str]:
        """Every figure below its threshold, and the first non-finite value, as one sentence each."""
        out = []
        if self.non_finite:
            nf = self.non_finite
            step = "" if nf["step"] is None else f" at step {nf['step']}"
            out.append(f"{self.label}: {nf['component']} produced a non-finite value{step} (prompt {nf['prompt']}, "
                       f"{nf['run']}){_layer_text(nf.get('layer'))}")
        got, want = self.image["psnr_db"], self.thresholds["image_psnr_db"]
        if not got >= want:
            out.append(f"{self.label}: image PSNR {got:.1f} dB < {want:.1f} dB")
        for name, figures in self.components.items():
            want = self.thresholds["components"].get(name)
            if want is not None and not figures["psnr_db"] >= want:
                out.append(f"{self.label}: {name} PSNR {figures['psnr_db']:.1f} dB < {want:.1f} dB")
        return out

    def to_json(self) -> dict:
        return {"path": self.path, "label": self.label, "recipe": self.recipe, "target": self.target,
                "size_bytes": self.size_bytes, "thresholds": self.thresholds, "components": self.components,
                "image": self.image, "per_prompt": self.per_prompt, "accuracy": self.accuracy,
                "non_finite": self.non_finite, "failures": self.failures, "passed": not self.failures}


@dataclass
class Report:
    """What :func:`verify` measured. ``reference_images``: the reference's (H, W, 3) uint8 image per prompt."""

    reference: dict  # {kind: torch|bundle, source, label}
    family: str
    height: int
    width: int
    sigmas: tuple[float, ...]
    seed: int
    prompts: list[str]
    bundles: list[BundleResult]
    accuracy: dict  # {"reference": evaluate_many(...)} or {"skipped": reason}
    reference_non_finite: dict | None = None
    notes: list[str] = field(default_factory=list)
    reference_images: list = field(default_factory=list, repr=False)

    @property
    def failures(self) -> list[str]:
        out = [f for b in self.bundles for f in b.failures]
        if self.reference_non_finite:
            nf = self.reference_non_finite
            step = "" if nf["step"] is None else f" at step {nf['step']}"
            out.insert(0, f"the reference's {nf['component']} produced a non-finite value{step} "
                          f"(prompt {nf['prompt']})")
        return out

    def to_json(self) -> dict:
        """Plain JSON types; a non-finite figure (a NaN output's error) becomes null."""
        return _finite({"reference": self.reference, "family": self.family, "height": self.height, "width": self.width,
                "steps": len(self.sigmas) - 1, "sigmas": list(self.sigmas), "seed": self.seed,
                "prompts": list(self.prompts), "accuracy": self.accuracy,
                "reference_non_finite": self.reference_non_finite, "notes": list(self.notes),
                "bundles": [b.to_json() for b in self.bundles], "failures": self.failures,
                "passed": not self.failures})


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


# -- figures -------------------------------------------------------------------------------------------------


def compare(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """PSNR (dB, peak = the reference's largest magnitude; :func:`qwen_edge.quant.sensitivity.psnr`), max abs
    and max relative (to that peak) error. A non-finite or misshapen output scores 0 dB."""
    from qwen_edge.quant.sensitivity import psnr

    ref64, got64 = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    if ref64.shape != got64.shape or not np.isfinite(got64).all():
        return {"psnr_db": 0.0, "max_abs_error": math.inf, "max_rel_error": math.inf}
    diff = float(np.abs(ref64 - got64).max()) if ref64.size else 0.0
    peak = max(float(np.abs(ref64).max()), 1e-12)
    return {"psnr_db": round(min(psnr(ref64, got64), PSNR_CAP_DB), 2), "max_abs_error": diff,
            "max_rel_error": diff / peak}


def image_psnr(ref: np.ndarray, got: np.ndarray) -> float:
    """PSNR of two uint8 images, peak 255, capped at :data:`PSNR_CAP_DB` (the manifest's ``image_psnr_db``)."""
    mse = float(np.mean((ref.astype(np.float64) - got.astype(np.float64)) ** 2))
    return PSNR_CAP_DB if mse == 0 else round(min(PSNR_CAP_DB, 10 * math.log10(255.0**2 / mse)), 2)


def ssim(ref: np.ndarray, got: np.ndarray, sigma: float = 1.5, size: int = 11) -> float:
    """Mean SSIM (Wang et al. 2004) of two (H, W, 3) uint8 images, per channel then averaged.

    Gaussian window (``size`` taps, ``sigma``), K1 = 0.01, K2 = 0.03, L = 255, population (co)variances, over
    the positions where the whole window fits: what scikit-image's ``structural_similarity(a, b,
    channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)`` gives.
    """
    x, y = ref.astype(np.float64), got.astype(np.float64)  # (H, W, C)
    size = min(size, x.shape[0], x.shape[1])
    taps = np.exp(-0.5 * ((np.arange(size) - (size - 1) / 2) / sigma) ** 2)
    taps /= taps.sum()

    def blur(z):  # separable 'valid' Gaussian filter: (H, W, C) -> (H-size+1, W-size+1, C)
        z = np.lib.stride_tricks.sliding_window_view(z, size, axis=0) @ taps
        return np.lib.stride_tricks.sliding_window_view(z, size, axis=1) @ taps

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return round(float(s.mean()), 5)


def _worst(a: dict | None, b: dict) -> dict:
    if a is None:
        return {**b, "samples": 1}
    return {"psnr_db": min(a["psnr_db"], b["psnr_db"]), "max_abs_error": max(a["max_abs_error"], b["max_abs_error"]),
            "max_rel_error": max(a["max_rel_error"], b["max_rel_error"]), "samples": a["samples"] + 1}


def _non_finite(outputs: Feed) -> bool:
    return any(not np.isfinite(v).all() for v in outputs.values() if np.issubdtype(v.dtype, np.floating))


# -- where an fp16 graph overflows: node by node ---------------------------------------------------------------

FP16_MAX = 65504.0  # the largest finite float16


def first_bad_node(b: bundle_mod.Bundle, name: str, feed: Feed, batch: int = 256) -> dict:
    """The first node (in the graph's topological order) of component ``name`` whose output is NaN/Inf on
    ``feed``: ``{"node", "op", "output", "dtype", "max_abs_input"}``; ``max_abs_input`` above :data:`FP16_MAX`
    means the node's input already exceeded the fp16 range (a Cast to fp16 overflowing), below it that the
    node's own arithmetic overflowed. ``{"node": None, ...}`` when no node's output is non-finite this way.

    The graph runs in ONNX Runtime on a copy whose intermediate values are graph outputs (onnx.helper; types
    from ONNX shape inference), ``batch`` nodes per pass to bound memory, without graph optimisations so no
    fusion hides a node. Needs the ``onnx`` package; a diagnostic, so any failure becomes ``{"error": ...}``.
    """
    try:
        return _first_bad_node(b, name, feed, batch)
    except Exception as e:  # never lose the report over its diagnosis
        lines = str(e).strip().splitlines()
        return {"node": None, "error": f"{type(e).__name__}: {lines[0] if lines else ''}"}


def _first_bad_node(b: bundle_mod.Bundle, name: str, feed: Feed, batch: int) -> dict:
    from .errors import require

    onnx, ort = require("onnx", "onnx"), require("onnxruntime", "runtime")
    from onnx import numpy_helper

    model = onnx.load(str(b.path(b.component(name).file)))
    nodes = _topological(model.graph.node)  # fp16 conversion appends its Casts at the end of the node list
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    del model.graph.value_info[:]  # the converter's annotations can contradict the graph: infer them afresh
    model = onnx.shape_inference.infer_shapes(model)
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    types = {v.name: v.type for v in (*model.graph.value_info, *model.graph.output)
             if v.type.tensor_type.elem_type in floats}
    weights = {t.name: t for t in model.graph.initializer}  # decoded only for the node found (memory)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads, so.log_severity_level = 1, 3
    for start in range(0, len(nodes), batch):
        chunk = nodes[start:start + batch]
        names = [o for node in chunk for o in node.output if o in types]
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        del probe.graph.output[:]
        probe.graph.output.extend(onnx.helper.make_value_info(o, types[o]) for o in names)
        sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
        values = {**feed, **dict(zip(names, sess.run(names, feed)))}
        for node in chunk:
            bad = next((o for o in node.output if o in types and not np.isfinite(values[o]).all()), None)
            if bad is not None:
                inputs = [values[i] if i in values else numpy_helper.to_array(weights[i]) for i in node.input
                          if i in values or i in weights]  # an input computed in an earlier pass is not kept
                finite = [np.abs(a[np.isfinite(a)]) for a in inputs if np.issubdtype(a.dtype, np.floating)]
                peak = max((float(a.max()) for a in finite if a.size), default=None)
                return {"node": node.name, "op": node.op_type, "output": bad, "dtype": str(values[bad].dtype),
                        "max_abs_input": peak}
    return {"node": None}


def _topological(nodes) -> list:
    """``nodes`` in a topological order, as close to the given one as dependencies allow (Kahn, lowest index
    first)."""
    import heapq

    nodes = list(nodes)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output}
    users: list[list[int]] = [[] for _ in nodes]
    waiting = []
    for i, node in enumerate(nodes):
        deps = {producer[x] for x in node.input if x in producer}
        waiting.append(len(deps))
        for j in deps:
            users[j].append(i)
    ready = [i for i, n in enumerate(waiting) if n == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for u in users[i]:
            waiting[u] -= 1
            if not waiting[u]:
                heapq.heappush(ready, u)
    return order


def _layer_text(layer: dict | None) -> str:
    """The failure sentence's tail naming the node :func:`first_bad_node` found."""
    if not layer:
        return ""
    if layer.get("node") is None:
        return f"; no single node reproduced it ({layer['error']})" if "error" in layer else \
            "; no single node's output is non-finite when the graph runs node by node"
    peak = layer["max_abs_input"]
    why = "" if peak is None else f", largest input magnitude {peak:.4g}" + (
        f" > {FP16_MAX:.0f}, the fp16 range" if peak > FP16_MAX else "")
    return f"; first at node {layer['node']!r} ({layer['op']}, {layer['dtype']} output {layer['output']!r}{why})"


# -- prompts -------------------------------------------------------------------------------------------------


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with ``#`` are skipped. InputError (one line) for a
    missing, binary, undecodable or empty file."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise InputError(f"--prompts file {path} cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise InputError(f"--prompts file {path} is not UTF-8 text (byte {e.start})") from None
    if "\0" in text:
        raise InputError(f"--prompts file {path} is not a text file (it holds NUL bytes)")
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise InputError(f"--prompts file {path} holds no prompt (one per line; # starts a comment)")
    return prompts


def default_prompts(is_default: bool) -> list[str]:
    """The embedded default: its world's first held-out captions (``heldout_prompts(8)``, read through
    :func:`qwen_edge.world.prompts` so no torch is imported); other checkpoints: a few generic prompts."""
    if is_default:
        from .world import prompts

        return prompts("heldout", DEFAULT_WORLD_PROMPTS, seed=0)
    return list(GENERIC_PROMPTS)


def is_default_source(source: object) -> bool:
    """Whether a manifest's ``source.model`` (or a --model argument) is the embedded default checkpoint."""
    from .spec import default_model

    if source in (None, "", "embedded default"):
        return True
    try:
        return Path(str(source)).expanduser().resolve() == default_model().resolve()
    except QwenEdgeError:
        return False


# -- the reference and the bundles under test ------------------------------------------------------------------


class Recording:
    """A reference's :class:`~qwen_edge.pipeline.Components`, recording every graph input the sampler really
    produces (IOSpec layout, through ``feeds``) and the reference graph's outputs on it (``graph``).

    ``records``: ``(graph, step, feed, reference outputs)`` in call order; step is the sampler step for the
    transformer, None otherwise. ``non_finite``: the first reference graph output holding NaN/Inf."""

    def __init__(self, components, feeds, graph: Run):
        self.inner, self.feeds, self.graph = components, feeds, graph
        self.records: list[tuple[str, int | None, Feed, Feed]] = []
        self.non_finite: tuple[str, int | None] | None = None

    def _record(self, name: str, step: int | None, feed: Feed) -> Feed:
        out = self.graph(name, feed)
        if self.non_finite is None and _non_finite(out):
            self.non_finite = (name, step)
        self.records.append((name, step, feed, out))
        return out

    def encode_text(self, ids: np.ndarray) -> np.ndarray:
        self._record("text_encoder", None, self.feeds.text_encoder(ids))
        return self.inner.encode_text(ids)

    def denoiser(self, text: np.ndarray, h: int, w: int):
        from qwen_edge.runtimes.onnx import Feeds

        kv_feed, fixed = self.feeds.prompt(text)
        if kv_feed is not None:  # 2.1: the transformer's text_kv input is the reference's own
            fixed["text_kv"] = self._record("text_kv", None, kv_feed)["text_kv"]
        inner, steps = self.inner.denoiser(text, h, w), itertools.count()

        def call(latents: np.ndarray, sigma: float) -> np.ndarray:
            self._record("transformer", next(steps), Feeds.step(fixed, latents, sigma))
            return inner(latents, sigma)

        return call

    def decode(self, z: np.ndarray) -> np.ndarray:
        self._record("vae_decoder", None, {"latents": np.ascontiguousarray(z, np.float32)})
        return self.inner.decode(z)


class _Watched:
    """A graph runner that notes the first non-finite output: component and sampler step (transformer calls
    counted since :meth:`begin`)."""

    def __init__(self, run: Run):
        self.run = run
        self.steps = itertools.count()
        self.first: tuple[str, int | None] | None = None
        self.feed: Feed | None = None  # the inputs that gave the first non-finite output

    def begin(self) -> None:
        self.steps = itertools.count()

    def __call__(self, name: str, feed: Feed) -> Feed:
        out = self.run(name, feed)
        step = next(self.steps) if name == "transformer" else None
        if self.first is None and _non_finite(out):
            self.first, self.feed = (name, step), feed
        return out


def _engine(b: bundle_mod.Bundle, threads: int | None):
    """The runtime for a bundle's target: ONNX Runtime (onnx, qnn run on the CPU here) or Core ML."""
    if b.manifest.target == "coreml":
        from qwen_edge.runtimes.coreml import CoreMLComponents

        return CoreMLComponents(b)
    from qwen_edge.runtimes.onnx import OnnxComponents

    return OnnxComponents(b, threads=threads)


class _Subject:
    """One bundle under test: its runtime, a watched pipeline over it, and its figures so far."""

    def __init__(self, b: bundle_mod.Bundle, label: str, thresholds: dict, threads: int | None):
        from qwen_edge.runtimes.onnx import GraphComponents

        m = b.manifest
        self.bundle, self.engine = b, _engine(b, threads)
        self.watched = _Watched(self.engine.run)
        graphs = GraphComponents(m.dims, m.rope, self.watched, m.tokenizer.pad_id)
        self.pipe = Pipeline(ModelSpec.from_bundle(m, b.root), graphs)
        self.result = BundleResult(path=str(b.root), label=label, recipe=m.recipe, target=m.target,
                                   size_bytes=bundle_size(b), thresholds=thresholds)

    def check_components(self, records, prompt: int) -> None:
        """Run each recorded reference input through this bundle's graph and compare the outputs."""
        figures = self.result.components
        for name, step, feed, ref in records:
            got = self.engine.run(name, feed)
            if _non_finite(got):
                self._note(name, step, prompt, "on the reference's inputs", feed)
            for key, value in ref.items():
                figures[name] = _worst(figures.get(name), compare(value, got[key]))

    def generate(self, req: Request, reference: np.ndarray, prompt: int) -> None:
        """The bundle's own generation on the reference's noise, timed, and its image figures."""
        self.watched.begin()
        start, error = time.perf_counter(), None
        try:
            image = _image(self.pipe, req)
        except NumericalError as e:  # the sampler stops on NaN/Inf latents: an image of 0 dB, and why
            image, error = np.zeros_like(reference), str(e)
        seconds = time.perf_counter() - start
        if self.watched.first is not None:
            self._note(*self.watched.first, prompt, "in its own generation", self.watched.feed)
            self.watched.first = self.watched.feed = None
        elif error:
            self._note("sampler", None, prompt, f"in its own generation: {error}")
        self.result.images.append(image)
        entry = {"psnr_db": 0.0 if error else image_psnr(reference, image),
                 "ssim": 0.0 if error else ssim(reference, image),
                 "max_abs_diff": int(np.abs(reference.astype(np.int16) - image).max()), "seconds": round(seconds, 4)}
        self.result.per_prompt.append({**entry, "error": error} if error else entry)

    def _note(self, component: str, step: int | None, prompt: int, run: str, feed: Feed | None = None) -> None:
        if self.result.non_finite is None:
            self.result.non_finite = {"component": component, "step": step, "prompt": prompt, "run": run}
            m = self.bundle.manifest
            if feed is not None and m.target != "coreml" and "fp16" in (m.recipe, m.components[component].recipe):
                self.result.non_finite["layer"] = first_bad_node(self.bundle, component, feed)


def bundle_size(b: bundle_mod.Bundle) -> int:
    """Bytes of every file the manifest lists, plus the manifest."""
    files = [b.path(rel) for rel in b.manifest.files()] + [b.root / bundle_mod.MANIFEST]
    return sum(p.stat().st_size for p in files)


def thresholds(m: bundle_mod.Manifest, min_image_psnr: float | None = None,
               min_component_psnr: float | None = None) -> dict:
    """The figures a bundle must reach: the overrides, else what its manifest declares (the export's gates),
    else its recipe's defaults (:data:`qwen_edge.export.onnx.IMAGE_GATE_DB` / ``COMPONENT_GATE_DB``)."""
    declared = m.fidelity.get("min_image_psnr_db")
    comps = {name: c.fidelity.get("min_psnr_db") for name, c in m.components.items() if name in GRAPHS}
    if declared is None or None in comps.values():
        from qwen_edge.export import onnx as gates  # an old bundle: the recipe's defaults (imports torch)

        declared = gates.IMAGE_GATE_DB.get(m.recipe, 30.0) if declared is None else declared
        default = gates.COMPONENT_GATE_DB.get(m.recipe, gates.COMPONENT_GATE_OTHER_DB)
        comps = {name: default if db is None else db for name, db in comps.items()}
    image = float(declared if min_image_psnr is None else min_image_psnr)
    comps = {n: float(db if min_component_psnr is None else min_component_psnr) for n, db in comps.items()}
    return {"image_psnr_db": image, "components": comps}


def _check_same(a: bundle_mod.Manifest, b: bundle_mod.Manifest, what_a: str, what_b: str) -> None:
    """Refuse to compare bundles of another family, size, text length, model shape, rotary tables or schedule:
    one line naming the first difference."""
    pairs = [("family", a.family, b.family), ("height", a.height, b.height), ("width", a.width, b.width),
             *((f"dims.{k}", v, getattr(b.dims, k)) for k, v in a.dims.to_json().items()),
             ("rope", a.rope, b.rope), ("sampler.sigmas", list(a.sampler.sigmas), list(b.sampler.sigmas))]
    for name, x, y in pairs:
        if x != y:
            raise InputError(f"{what_b} cannot be compared with {what_a}: {name} is {y} there, {x} here")


def _labels(manifests: Sequence[bundle_mod.Manifest], roots: Sequence[Path]) -> list[str]:
    """The recipe, or recipe (folder name) when several bundles share one."""
    recipes = [m.recipe for m in manifests]
    return [r if recipes.count(r) == 1 else f"{r} ({root.name})" for r, root in zip(recipes, roots)]


def _torch_reference(m: bundle_mod.Manifest, model) -> tuple[ModelSpec, object, Run, dict]:
    """The torch fp32 pipeline of the bundle's checkpoint (``model`` overrides the manifest's ``source``) and a
    runner of its graphs (the exporter's wrapper modules) on IOSpec feeds."""
    import dataclasses

    from .errors import require

    require("torch", "torch")
    from qwen_edge.export import onnx as onnx_export
    from qwen_edge.runtimes.torch import TorchComponents

    from . import iospec
    from .spec import default_model

    source = model if model is not None else m.source.get("model")
    checkpoint = default_model() if source in (None, "", "embedded default") else source
    try:
        spec = ModelSpec.from_checkpoint(checkpoint)
    except QwenEdgeError as e:
        hint = "" if model is not None else " (the bundle's source checkpoint: pass --model to name it)"
        raise type(e)(f"torch reference: {e}{hint}") from None
    if spec.family.name != m.family:
        raise InputError(f"the reference checkpoint {spec.root} is {spec.family.name}, the bundle {m.family}")
    dims = iospec.dims_from_checkpoint(spec, m.height, m.width, m.text_len)
    if dims != m.dims:
        bad = next(k for k in dims.to_json() if getattr(dims, k) != getattr(m.dims, k))
        raise InputError(f"the reference checkpoint {spec.root} does not match the bundle: {bad} "
                         f"{getattr(dims, bad)} vs {getattr(m.dims, bad)} in the bundle")
    spec = dataclasses.replace(spec, template=dataclasses.replace(spec.template, max_length=m.text_len))
    torch_components = TorchComponents(spec)
    modules = onnx_export.graphs(spec, torch_components, ("text_encoder", "transformer", "vae_decoder"))
    io = iospec.components(m.dims)

    def graph(name: str, feed: Feed) -> Feed:
        return dict(zip(io[name].output_names, onnx_export.torch_run(modules[name], io[name].input_names, feed)))

    info = {"kind": "torch", "source": str(spec.root), "label": "torch fp32",
            "is_default": is_default_source(checkpoint)}
    return spec, torch_components, graph, info


def _bundle_reference(path, m: bundle_mod.Manifest, threads: int | None) -> tuple[ModelSpec, object, Run, dict]:
    if not Path(path).is_dir():
        raise InputError(f"--reference {path} is neither 'torch' nor a bundle directory")
    ref = bundle_mod.load(path)
    _check_same(m, ref.manifest, "the bundle", f"reference bundle {path}")
    engine = _engine(ref, threads)
    info = {"kind": "bundle", "source": str(ref.root), "label": f"bundle {ref.manifest.recipe}",
            "is_default": is_default_source(ref.manifest.source.get("model"))}
    return ModelSpec.from_bundle(ref.manifest, ref.root), engine, engine.run, info


# -- the whole verification ------------------------------------------------------------------------------------


def verify(bundles: str | Path | Sequence[str | Path], reference: str | Path = "torch",
           prompts: Sequence[str] | None = None, seed: int = 0, *, model=None,
           min_image_psnr: float | None = None, min_component_psnr: float | None = None,
           threads: int | None = None, progress: bool = True) -> Report:
    """Measure ``bundles`` (one or several bundle directories of the same checkpoint, size and schedule, e.g.
    several quant recipes) against ``reference``: ``"torch"`` (the fp32 pipeline of the checkpoint the first
    bundle names in ``source``, or ``model``) or another bundle directory.

    ``prompts``: default :func:`default_prompts`. Prompt i uses seed ``seed + i``. ``min_image_psnr`` /
    ``min_component_psnr`` override every bundle's thresholds. Returns a :class:`Report`; failed thresholds
    are in ``report.failures`` (nothing is raised for them). Raises IntegrityError for a bundle failing its
    sha256 checks, InputError for a reference that does not fit.
    """
    roots = [Path(bundles)] if isinstance(bundles, (str, Path)) else [Path(b) for b in bundles]
    if not roots:
        raise InputError("verify needs at least one bundle")
    loaded = [bundle_mod.load(r) for r in roots]
    m = loaded[0].manifest
    for other in loaded[1:]:
        _check_same(m, other.manifest, f"bundle {roots[0]}", f"bundle {other.root}")
    if str(reference) == "torch":
        spec, ref_components, graph, info = _torch_reference(m, model)
    else:
        if model is not None:
            raise UsageError("--model names the torch reference's checkpoint; it does not apply to --reference BUNDLE")
        spec, ref_components, graph, info = _bundle_reference(reference, m, threads)
    prompts = list(prompts) if prompts is not None else default_prompts(info["is_default"])
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise InputError("every prompt must be non-empty text")
    from qwen_edge.runtimes.onnx import Feeds

    recording = Recording(ref_components, Feeds(m.dims, m.rope, m.tokenizer.pad_id), graph)
    ref_pipe = Pipeline(spec, recording)
    labels = _labels([b.manifest for b in loaded], roots)
    subjects = [_Subject(b, label, thresholds(b.manifest, min_image_psnr, min_component_psnr), threads)
                for b, label in zip(loaded, labels)]
    _check_schedule(m, [ref_pipe, *(s.pipe for s in subjects)])
    report = Report(reference={k: v for k, v in info.items() if k != "is_default"}, family=m.family,
                    height=m.height, width=m.width, sigmas=m.sampler.sigmas, seed=seed, prompts=prompts,
                    bundles=[s.result for s in subjects], accuracy={})
    _run(report, prompts, seed, m, ref_pipe, recording, subjects, progress)
    report.accuracy = _accuracy(report, info["is_default"])
    if info["kind"] == "bundle":
        report.notes.append("thresholds are declared against the torch fp32 pipeline; here the reference is a bundle")
    return report


def _check_schedule(m: bundle_mod.Manifest, pipes: Sequence[Pipeline]) -> None:
    """Every pipeline samples exactly the bundle's recorded sigmas."""
    req = Request("-", m.height, m.width, steps=m.sampler.steps)
    want = np.asarray(m.sampler.sigmas, np.float32)
    for pipe in pipes:
        if not np.array_equal(pipe.sigmas(req, m.dims.tokens), want):
            raise IntegrityError(f"{pipe.spec.root} samples other sigmas than the bundle records in "
                                 "sampler.sigmas; re-export the bundle from this checkpoint")


def _run(report: Report, prompts, seed, m, ref_pipe, recording, subjects, progress) -> None:
    from tqdm import tqdm

    bar = tqdm(prompts, desc="verify", unit="prompt", disable=not progress or not sys.stderr.isatty(), leave=False)
    for i, text in enumerate(bar):
        req = Request(text, m.height, m.width, steps=m.sampler.steps, seed=seed + i)
        recording.records = []
        reference = _image(ref_pipe, req)
        if recording.non_finite and report.reference_non_finite is None:
            name, step = recording.non_finite
            report.reference_non_finite = {"component": name, "step": step, "prompt": i}
        report.reference_images.append(reference)
        for s in subjects:
            s.check_components(recording.records, i)
            s.generate(req, reference, i)


def _image(pipe: Pipeline, req: Request) -> np.ndarray:
    *_, last = pipe.generate(req)
    return last.image


def _accuracy(report: Report, is_default: bool) -> dict:
    """Prompt fidelity by the default world's evaluator, on every image set; skipped with the reason."""
    if not is_default:
        return {"skipped": "the checkpoint is not the embedded default; only its world has an evaluator"}
    from .world import evaluate, evaluate_many, parse_prompt

    foreign = [p for p in report.prompts if not _world_caption(parse_prompt, p)]
    if foreign:
        return {"skipped": f"{len(foreign)} prompt(s) are not captions of the default's world, e.g. {foreign[0]!r}"}
    for b in report.bundles:
        b.accuracy = evaluate_many(b.images, report.prompts)
        for entry, image, text in zip(b.per_prompt, b.images, report.prompts):
            entry["ok"] = bool(evaluate(image, text).ok)
    reference = evaluate_many(report.reference_images, report.prompts)
    reference["per_prompt"] = [bool(evaluate(im, p).ok) for im, p in zip(report.reference_images, report.prompts)]
    return {"reference": reference}


def _world_caption(parse_prompt, text: str) -> bool:
    try:
        parse_prompt(text).check()
    except QwenEdgeError:
        return False
    return True
