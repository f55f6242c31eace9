"""The ONNX Runtime runtime: a bundle's component graphs as pipeline components, on CPU or a Qualcomm NPU.

Only provides callables (:class:`qwen_edge.pipeline.Components`); tokenization, the sampler and image handling
stay in the pipeline. Imports no torch and no onnx: a device needs numpy, tokenizers and onnxruntime
(``pip install 'qwen-edge[runtime]'``).

Two layers:

- :class:`GraphComponents` turns pipeline-level arrays into each graph's IOSpec inputs (static shapes: the
  prompt right-padded to the bundle's ``text_len``, rotary tables and attention biases built in NumPy by
  :mod:`qwen_edge.rope` / :mod:`qwen_edge.rope_v1`) and back. It runs graphs through any
  ``run(component, feeds) -> outputs`` function, so the exporter drives the same code with torch modules to
  record real sample inputs, and calibration can reuse :class:`Feeds`.
- :class:`OnnxComponents` supplies ``run`` from ONNX Runtime sessions opened on a verified bundle; its
  :class:`GraphIO` adapts the IOSpec layout to graphs the manifest declares otherwise (a QNN bundle's rank-5
  ``text_kv``, a transformer taking its precomputed ``step_modulation``). On the NPU a component's precompiled
  QNN context is opened when the bundle has one.

For 2.1 the text keys/values are computed once per prompt by the ``text_kv`` graph and every step runs
only the image tokens (``transformer``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import gc
import hashlib
import math
import os
import platform
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from qwen_edge import bundle as bundle_mod
from qwen_edge import rope as rope_v2_mod
from qwen_edge import rope_v1 as rope_v1_mod
from qwen_edge.errors import InputError, IntegrityError, NumericalError, QwenEdgeError, require
from qwen_edge.family import family as family_of
from qwen_edge.iospec import Dims, TensorSpec
from qwen_edge.iospec import components as io_components
from qwen_edge.sampler import Denoiser

V21 = "qwen-image-2.1"
DEVICES = ("cpu", "npu")

Feed = dict[str, np.ndarray]
Run = Callable[[str, Feed], Feed]


class Feeds:
    """Pipeline-level arrays -> the IOSpec inputs of one bundle's graphs (see :mod:`qwen_edge.iospec`)."""

    def __init__(self, dims: Dims, rope: Mapping, pad_id: int = 0):
        self.dims = dims
        self.axes_dims = tuple(int(a) for a in rope["axes_dims"])
        self.theta = float(rope["theta"])
        self.pad_id = pad_id

    def text_encoder(self, ids: np.ndarray) -> Feed:
        """(1, L) ids -> input_ids right-padded with ``pad_id`` to drop + text_len. The encoder is causal: the
        padding never changes the real tokens' states (the pad id only matters to calibrated ranges)."""
        d = self.dims
        total = d.drop + d.text_len
        if ids.ndim != 2 or ids.shape[0] != 1 or not 0 < ids.shape[1] <= total:
            raise InputError(f"token ids must be (1, L) with L <= {total} for this bundle, got {ids.shape}")
        padded = np.full((1, total), self.pad_id, np.int64)
        padded[:, :ids.shape[1]] = ids
        return {"input_ids": padded}

    def prompt(self, text: np.ndarray) -> tuple[Feed | None, Feed]:
        """One prompt's (1, L, D) hidden states -> (the text_kv graph's inputs (2.1; None for v1), the
        transformer inputs that stay fixed over the steps)."""
        d = self.dims
        n = text.shape[1]
        if text.ndim != 3 or text.shape[0] != 1 or text.shape[2] != d.text_hidden or not 0 < n <= d.text_len:
            raise InputError(f"text states must be (1, L, {d.text_hidden}) with 1 <= L <= {d.text_len} for this "
                             f"bundle, got {text.shape}")
        padded = np.zeros((1, d.text_len, d.text_hidden), np.float32)
        padded[:, :n] = text
        return self._prompt_v21(padded, n) if d.family == V21 else (None, self._prompt_v1(padded, n))

    def _prompt_v21(self, text: np.ndarray, n: int) -> tuple[Feed, Feed]:
        t, (h, w) = self.dims.text_len, self.dims.grid
        cos, sin = rope_v2_mod.rope_v2(self.axes_dims, n, h, w, self.theta, text_pad_len=t)  # (t + N, Dh/2)
        bias = rope_v2_mod.attention_bias_v2(n, h * w, text_pad_len=t)  # (1, 1, t + N, t + N)
        kv = {"text": text, "rope_cos": cos[:t], "rope_sin": sin[:t], "text_bias": bias[..., :t, :t]}
        step = {"rope_cos": cos[t:], "rope_sin": sin[t:], "image_bias": np.ascontiguousarray(bias[..., t:, :])}
        return kv, step

    def _prompt_v1(self, text: np.ndarray, n: int) -> Feed:
        t, (h, w) = self.dims.text_len, self.dims.grid
        img_cos, img_sin, txt_cos, txt_sin = rope_v1_mod.rope_v1(t, h, w, self.axes_dims, self.theta)
        bias = np.zeros((1, 1, 1, t + h * w), np.float32)
        bias[..., n:t] = rope_v2_mod.MASKED  # pad text keys; finite so fp16 graphs stay NaN-free
        return {"text": text, "img_cos": img_cos, "img_sin": img_sin, "txt_cos": txt_cos, "txt_sin": txt_sin,
                "text_bias": bias}

    @staticmethod
    def step(fixed: Feed, latents: np.ndarray, sigma: float) -> Feed:
        """The transformer's inputs for one sampler step."""
        return {**fixed, "latents": np.ascontiguousarray(latents, np.float32),
                "sigma": np.array([sigma], np.float32)}


def fit(feed: Feed, specs: Sequence[TensorSpec]) -> Feed:
    """``feed`` with every array named in ``specs`` in the shape declared there, when only the shape differs:
    a rank-folded graph (:func:`qwen_edge.iospec.fold_rank`, the QNN target's 2.1 ``text_kv``) takes and gives
    the same bytes with merged leading axes. Other arrays pass unchanged (a real mismatch stays one)."""
    shapes = {t.name: t.shape for t in specs if not t.dynamic}  # a named (dynamic) axis takes any size
    return {name: value.reshape(shapes[name]) if name in shapes and value.shape != shapes[name]
            and value.size == math.prod(shapes[name]) else value for name, value in feed.items()}


def tabulated(feed: Feed, table: np.ndarray, timesteps: np.ndarray) -> Feed:
    """A transformer feed (its IOSpec ``sigma``) -> the inputs of a 2.1 transformer exported with its modulation
    precomputed: ``step_modulation``, the table row (``(steps, 5 * dim)``) of that step's sigma. InputError for
    a sigma the bundle's schedule does not have (the graph has no timestep embedding to compute it)."""
    if "sigma" not in feed:
        return feed
    sigma = np.float32(np.asarray(feed["sigma"]).reshape(-1)[0])
    rows = np.flatnonzero(timesteps == sigma)
    if not rows.size:
        raise InputError(f"this bundle's transformer has its modulation precomputed for the {len(timesteps)} steps of "
                         f"its schedule, not for sigma {sigma:.6g}: generate with --steps {len(timesteps)} and no "
                         "--sigmas (or re-export without --precompute-modulation)")
    out = {key: value for key, value in feed.items() if key != "sigma"}
    out["step_modulation"] = table[rows[0]][None]
    return out


def modulation_table(bundle: bundle_mod.Bundle, comp) -> tuple[np.ndarray, np.ndarray] | None:
    """(table (steps, 5 * dim) float32, the float32 sigma input of each row) of a transformer exported with
    its modulation precomputed; None for one that computes it from sigma."""
    if comp is None or not comp.modulation:
        return None
    d = bundle.manifest.dims
    timesteps = np.asarray(comp.modulation["timesteps"], np.float32)
    try:
        table = np.load(bundle.path(comp.modulation["file"]), allow_pickle=False)
    except (OSError, ValueError) as e:
        raise IntegrityError(f"{comp.modulation['file']} is not a readable .npy table ({e})") from None
    if table.dtype != np.float32 or table.shape != (len(timesteps), 5 * d.heads * d.head_dim):
        raise IntegrityError(f"{comp.modulation['file']} holds {table.dtype} {table.shape}, not the float32 "
                             f"({len(timesteps)}, {5 * d.heads * d.head_dim}) modulation table the manifest declares")
    return table, timesteps


class GraphIO:
    """The boundary between the pipeline's layout of every graph's I/O (``iospec.components(dims)``, what
    :class:`Feeds` builds and callers read) and a bundle's graphs as the manifest declares them: rank-folded
    tensors (:func:`fit`) and a 2.1 transformer taking its tabulated modulation (:func:`tabulated`)."""

    def __init__(self, bundle: bundle_mod.Bundle):
        m = bundle.manifest
        self.graphs = {name: comp.io for name, comp in m.components.items()}
        self.canonical = io_components(m.dims)
        self.modulation = modulation_table(bundle, m.components.get("transformer"))

    def inputs(self, name: str, feed: Feed) -> Feed:
        if name == "transformer" and self.modulation is not None:
            feed = tabulated(feed, *self.modulation)
        return fit(feed, self.graphs[name].inputs)

    def outputs(self, name: str, outs: Feed) -> Feed:
        return fit(outs, self.canonical[name].outputs if name in self.canonical else ())


class GraphComponents:
    """:class:`qwen_edge.pipeline.Components` over a bundle's graphs, whoever runs them (``run``)."""

    def __init__(self, dims: Dims, rope: Mapping, run: Run, pad_id: int = 0, dynamic: bool = False):
        self.dims = dims
        self.rope, self.pad_id, self.dynamic = rope, pad_id, dynamic
        self.feeds = Feeds(dims, rope, pad_id)
        self.run = run

    def encode_text(self, ids: np.ndarray) -> np.ndarray:
        out = self.run("text_encoder", self.feeds.text_encoder(ids))["hidden_states"]  # (1, drop + text_len, D)
        return out[:, :ids.shape[1]]  # the real tokens only: the pipeline drops the template prefix

    def denoiser(self, text: np.ndarray, h: int, w: int) -> Denoiser:
        if (h, w) != self.dims.grid:
            self.resize(h, w)
        kv_feed, fixed = self.feeds.prompt(text)
        if kv_feed is not None:  # 2.1: text is modulated at t = 0, its K/V are computed once per prompt
            fixed["text_kv"] = self.run("text_kv", kv_feed)["text_kv"]
            if not np.isfinite(fixed["text_kv"]).all():
                raise NumericalError("text_kv produced NaN/Inf (before step 0): the graph overflows; try float32")
        return lambda latents, sigma: self.run("transformer", Feeds.step(fixed, latents, sigma))["velocity"]

    def resize(self, h: int, w: int) -> None:
        """Bind a (h, w) token grid: a dynamic bundle's graphs take any size, its rotary tables and attention
        bias are rebuilt for it; a static bundle's graphs were exported for one grid only (InputError)."""
        if not self.dynamic:
            raise InputError(f"this bundle's transformer was exported for a {self.dims.grid} token grid, not {(h, w)}")
        fam = family_of(self.dims.family)
        side = fam.vae_factor * fam.patch
        self.dims = dataclasses.replace(self.dims, height=h * side, width=w * side)
        self.feeds = Feeds(self.dims, self.rope, self.pad_id)

    def decode(self, z: np.ndarray) -> np.ndarray:
        return self.run("vae_decoder", {"latents": np.ascontiguousarray(z, np.float32)})["image"]


# -- ONNX Runtime --------------------------------------------------------------------------------------------


def required_components(family: str) -> tuple[str, ...]:
    """The graphs a bundle needs for text-to-image generation."""
    return ("text_encoder", "text_kv", "transformer", "vae_decoder") if family == V21 else (
        "text_encoder", "transformer", "vae_decoder")


class OnnxComponents(GraphComponents):
    """A bundle's components on ONNX Runtime.

    ``bundle``: a bundle directory or a loaded :class:`qwen_edge.bundle.Bundle`. ``device``: ``"cpu"`` or
    ``"npu"`` (the QNN execution provider's HTP backend, CPU fallback disabled). ``low_memory``: keep one
    session alive at a time (the text encoder is freed before sampling, the transformer before decoding).
    On glibc, ``low_memory`` also pins malloc's mmap threshold for the whole process (:func:`pin_mmap_threshold`).
    ``verify``: check every file's sha256 first (turn off only for trusted storage). ``cache_dir``: where
    optimised CPU graphs are cached (default :func:`default_cache_dir`), never inside the bundle; ``cache``
    False skips the cache. ``threads``: intra-op threads (default: the physical cores).
    """

    def __init__(self, bundle, device: str = "cpu", low_memory: bool = False, verify: bool = True,
                 cache_dir: str | Path | None = None, cache: bool = True, threads: int | None = None):
        if device not in DEVICES:
            raise InputError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
        if low_memory:
            pin_mmap_threshold()
        self.bundle = bundle if isinstance(bundle, bundle_mod.Bundle) else bundle_mod.load(bundle, verify=verify)
        m = self.bundle.manifest
        missing = [name for name in required_components(m.family) if name not in m.components]
        if missing:
            raise IntegrityError(f"bundle {self.bundle.root} lacks component(s) {', '.join(missing)} needed to "
                                 f"generate (it has: {', '.join(m.components) or 'none'}); re-export it with them")
        for name in required_components(m.family):  # each graph's I/O as declared, before anything is allocated
            bundle_mod.check_graph(self.bundle.root, m.components[name])
        super().__init__(m.dims, m.rope, self._run, m.tokenizer.pad_id, dynamic=m.dynamic)
        self.graph_io = GraphIO(self.bundle)
        self.device, self.low_memory, self.threads = device, low_memory, threads
        self.cache_dir = (Path(cache_dir) if cache_dir else default_cache_dir()) if cache else None
        self.sessions: dict[str, object] = {}
        self.opened: dict[str, str] = {}  # component -> the bundle file its session was opened from

    def session(self, name: str):
        """The component's session, opened on first use (closing the others first with ``low_memory``)."""
        if name not in self.sessions:
            if self.low_memory:
                self.close()
            comp = self.bundle.component(name)
            bundle_mod.check_graph(self.bundle.root, comp)  # external data inside, I/O as the manifest declares
            # every file's hash: an external-data model's .onnx holds only offsets, its weights can change alone
            key = f"{name}-{hashlib.sha256(repr(sorted(comp.files.items())).encode()).hexdigest()[:16]}"
            sess = self._context_session(comp) if self.device == "npu" and comp.context else None
            if sess is None:
                sess = open_session(self.bundle.path(comp.file), self.device, cache_dir=self.cache_dir,
                                    cache_key=key, threads=self.threads, name=name, low_memory=self.low_memory)
                self.opened[name] = comp.file
            self.sessions[name] = sess
        return self.sessions[name]

    def _context_session(self, comp: bundle_mod.Component):
        """The NPU session of ``comp``'s precompiled QNN context (an EPContext model: loads without compiling);
        None, with a warning, when this device's QNN refuses it (another SoC or QNN version): then the graph is
        compiled here instead. A context whose files leave the bundle or are not hashed is an IntegrityError."""
        ctx = dataclasses.replace(comp, file=comp.context["file"])
        bundle_mod.check_graph(self.bundle.root, ctx)  # the graph's I/O, and its binaries inside and hashed
        try:
            sess = _npu_session(self.bundle.path(ctx.file), comp.name)
        except QwenEdgeError as e:
            warnings.warn(f"{comp.name}: the precompiled QNN context cannot be used here ({e}); compiling "
                          f"{comp.file} instead", stacklevel=3)
            return None
        self.opened[comp.name] = ctx.file
        return sess

    def close(self) -> None:
        """Free every open session."""
        self.sessions.clear()
        gc.collect()

    def _run(self, name: str, feeds: Feed) -> Feed:
        sess = self.session(name)
        names = [o.name for o in sess.get_outputs()]
        feeds = self.graph_io.inputs(name, feeds)
        try:
            outs = sess.run(names, feeds)
        except Exception as e:  # a graph that loads but cannot run (a damaged node): one line naming it
            raise IntegrityError(f"{name}: ONNX Runtime failed running {self.bundle.component(name).file}: "
                                 f"{_first_line(e)}; re-export the bundle") from None
        return self.graph_io.outputs(name, dict(zip(names, outs)))


def pipeline(bundle, device: str = "cpu", low_memory: bool = False, verify: bool = True,
             cache_dir: str | Path | None = None, cache: bool = True, threads: int | None = None):
    """A :class:`qwen_edge.pipeline.Pipeline` generating from a bundle on ONNX Runtime (arguments as
    :class:`OnnxComponents`)."""
    from qwen_edge.pipeline import Pipeline
    from qwen_edge.spec import ModelSpec

    components = OnnxComponents(bundle, device=device, low_memory=low_memory, verify=verify,
                                cache_dir=cache_dir, cache=cache, threads=threads)
    b = components.bundle
    return Pipeline(ModelSpec.from_bundle(b.manifest, b.root), components)


# glibc raises malloc's mmap threshold to the largest block freed so far (up to 32 MiB, "dynamic threshold" in
# mallopt(3)); once a session's weights have been freed, the next session's weights and every step's activations
# come from the heap, where freed blocks stay resident and fragment. Without the pin a low-memory generation of a
# random 2.1 checkpoint (172M-parameter transformer) peaked 20 MB (int8) / 51 MB (fp32) higher, 1.12x / 1.08x its
# largest graph alone instead of 1.02x / 1.01x (benchmarks/bench_memory.py); steps and session opens pay page faults.
M_MMAP_THRESHOLD = -3  # <malloc.h>
MMAP_THRESHOLD = 128 * 1024  # glibc's own default, held fixed


@functools.cache
def pin_mmap_threshold() -> bool:
    """Fix glibc malloc's mmap threshold at its 128 KiB default, once per process: blocks above it (weights,
    activations) are then mapped and unmapped on their own, so a closed session's memory goes back to the OS
    instead of staying in the heap. Process-wide (it also disables glibc's dynamic trim threshold); a no-op
    returning False on other C libraries."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def default_cache_dir() -> Path:
    """``$QWEN_EDGE_CACHE``, else ``$XDG_CACHE_HOME/qwen-edge``, else ``~/.cache/qwen-edge`` (read at call time)."""
    if os.environ.get("QWEN_EDGE_CACHE"):
        return Path(os.environ["QWEN_EDGE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qwen-edge"


def physical_cores() -> int:
    """Physical CPU cores (hyper-threads slow ORT's GEMMs down rather than up)."""
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


def session_options(threads: int | None = None, low_memory: bool = False):
    """ORT options for edge CPUs: sequential execution on the physical cores, all graph optimisations,
    the memory arena on (off with ``low_memory``: the arena keeps freed activations reserved)."""
    ort = require("onnxruntime", "runtime")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or physical_cores()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_cpu_mem_arena = not low_memory
    so.log_severity_level = 3  # errors only; qwen-edge reports failures itself
    return so


def open_session(model: Path, device: str = "cpu", *, cache_dir: Path | None = None, cache_key: str | None = None,
                 threads: int | None = None, name: str | None = None, low_memory: bool = False):
    """An ``onnxruntime.InferenceSession`` for ``model``.

    CPU: the graph optimised at level ALL is cached under ``cache_dir`` (keyed by ``cache_key``, the ORT
    version and the CPU, since the optimised layouts are CPU-specific) and reused. NPU: the QNN execution
    provider (HTP backend) with CPU fallback disabled; nodes the NPU cannot run end in an InputError naming
    them.
    """
    name = name or Path(model).stem
    if device == "npu":
        return _npu_session(Path(model), name)
    ort = require("onnxruntime", "runtime")
    so = session_options(threads, low_memory)
    if cache_dir is None or cache_key is None:
        return _session(ort, model, so, name)
    cached = Path(cache_dir) / f"{cache_key}-{_machine_key(ort)}"
    if (cached / "model.onnx").is_file():
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # optimised offline already
        return _session(ort, cached / "model.onnx", so, name)
    return _session_writing_cache(ort, Path(model), so, name, cached)


def _session(ort, model: Path, so, name: str):
    try:
        return ort.InferenceSession(str(model), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
        raise IntegrityError(f"{name}: ONNX Runtime cannot load {Path(model).name}: {_first_line(e)}") from None


def _session_writing_cache(ort, model: Path, so, name: str, cached: Path):
    """Open ``model`` while ORT writes its optimised graph to a temporary folder, then publish the folder
    with one atomic rename (a concurrent reader never sees half a file)."""
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cached.parent))
    except OSError:  # an unwritable cache only costs the optimisation time
        return _session(ort, model, so, name)
    so.optimized_model_filepath = str(tmp / "model.onnx")
    if bundle_mod.external_data_files(model):  # big graphs: keep the optimised weights external too
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "model.onnx.data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        sess = _session(ort, model, so, name)
        os.rename(tmp, cached)
    except OSError:  # another process published first
        shutil.rmtree(tmp, ignore_errors=True)
    except QwenEdgeError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sess


def _machine_key(ort) -> str:
    """ORT version + CPU: level-ALL graphs use CPU-specific layouts (NCHWc block size follows the vector width)."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    cpu = hashlib.sha256(f"{platform.machine()}|{platform.processor()}|{flags}".encode()).hexdigest()[:12]
    return f"ort{ort.__version__}-{cpu}"


# -- NPU: the QNN execution provider ---------------------------------------------------------------------------


def _npu_session(model: Path, name: str):
    """The QNN EP session (HTP backend, CPU fallback disabled) of :mod:`qwen_edge.export.qnn`, which owns
    the QNN specifics (plugin registration, provider options, naming unsupported nodes)."""
    from qwen_edge.export import qnn  # torch-free: onnxruntime and onnxruntime-qnn only

    try:
        return qnn.session(model)
    except QwenEdgeError as e:
        raise type(e)(f"{name}: {e}") from None
    except Exception as e:  # the diagnostic session itself can fail inside ORT: still one line
        raise InputError(f"{name}: the QNN HTP backend cannot run {model.name}: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
