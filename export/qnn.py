"""The Qualcomm NPU path: w8a16 QDQ models on ONNX Runtime's QNN execution provider (HTP backend).

``onnxruntime-qnn`` (2.x) is a plugin execution provider: its library is registered with ONNX Runtime
(:func:`register`) and sessions select its device. On an x86-64 Linux machine the HTP backend runs in
emulation, which is how the tests exercise the NPU path without a phone. Every session here disables
the CPU fallback, so a node the NPU cannot run is an error naming it rather than a silent slowdown.

- :func:`session`: the session the ONNX runtime opens for ``--device npu``;
- :func:`prepare`: fp32 ONNX -> w8a16 QDQ (calibrated) -> checked on HTP -> optionally a precompiled
  EPContext model (``ep.context_enable``), what ``export --target qnn`` writes per component;
- :func:`compile_context`: the EPContext model alone, for a model already quantized;
- :func:`fuse_for_htp` / :func:`linears_as_convs` / :func:`masked_softmax_ranges`: what the ``w8a16`` recipe
  does to a graph so the HTP backend compiles it, keeps per-channel weights and keeps attention precise (each
  found on the tiny models in emulation).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from qwen_edge.errors import InputError, require
from qwen_edge.rope import MASKED

EP_NAME = "QNNExecutionProvider"
BACKENDS = ("htp", "cpu", "gpu")
# The Q/DQ nodes around an unsupported node land on the CPU with it; name the cause, not its wrapping.
_WRAPPING = ("QuantizeLinear", "DequantizeLinear")


def register():
    """Register the onnxruntime-qnn plugin library with ONNX Runtime once; returns ``onnxruntime``."""
    ort = require("onnxruntime", "qnn")
    qnn = require("onnxruntime_qnn", "qnn")
    if not _devices(ort):
        ort.register_execution_provider_library(EP_NAME, qnn.get_library_path())
    return ort


def session_options(*, backend: str = "htp", provider_options: dict | None = None, threads: int | None = None):
    """``SessionOptions`` selecting the QNN EP device with the CPU fallback disabled.

    ``provider_options`` pass through to the EP (e.g. ``{"htp_performance_mode": "burst"}``, or
    ``soc_model`` / ``htp_arch`` when compiling contexts for a specific phone).
    """
    if backend not in BACKENDS:
        raise InputError(f"unknown QNN backend {backend!r}; known: {', '.join(BACKENDS)}")
    ort = register()
    so = ort.SessionOptions()
    so.log_severity_level = 3  # the EP logs unsupported nodes as errors; they are raised below instead
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if threads:
        so.intra_op_num_threads = threads
    so.add_provider_for_devices(_devices(ort), {"backend_type": backend, **(provider_options or {})})
    return so


def session(model: Path, *, backend: str = "htp", provider_options: dict | None = None):
    """An ``InferenceSession`` of ``model`` on the QNN EP with CPU fallback disabled.

    Raises :class:`~qwen_edge.errors.InputError` naming the nodes the backend cannot run (or quoting
    the backend when it refuses the whole graph, e.g. a float model on HTP: quantize it to w8a16 first).
    """
    ort = register()
    so = session_options(backend=backend, provider_options=provider_options)
    try:
        return ort.InferenceSession(str(model), so)
    except _ort_errors() as e:
        if "fallback to CPU EP has been explicitly disabled" in str(e):
            raise InputError(f"{Path(model).name}: the QNN {backend.upper()} backend cannot run "
                             f"{_unsupported(model, backend, provider_options)}") from None
        raise InputError(f"{Path(model).name}: the QNN {backend.upper()} backend rejected the model "
                         f"({_first_line(e)}); it runs w8a16 QDQ models with static shapes") from None


def compile_context(src: Path, dst: Path, *, backend: str = "htp", embed: bool = False,
                    provider_options: dict | None = None) -> list[Path]:
    """Write a precompiled EPContext model of ``src`` to ``dst`` (the QNN graph compiled once, so a device
    loads it in milliseconds). Without ``embed`` the context binary is a sibling file. Returns the files
    written (``dst`` first)."""
    ort = register()
    onnx = require("onnx", "qnn")
    so = session_options(backend=backend, provider_options=provider_options)
    try:
        # The compiler skips ORT's graph optimisations by default; the QDQ node-unit clean-up among the basic
        # ones is what lets HTP finalize the graph (as a session's default level does).
        level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        compiler = ort.ModelCompiler(so, str(src), embed_compiled_data_into_model=embed, graph_optimization_level=level)
        compiler.compile_to_file(str(dst))
    except _ort_errors() as e:
        raise InputError(f"{Path(src).name}: QNN context compilation failed ({_first_line(e)})") from None
    binaries = []  # EPContext nodes name their context binary when it is not embedded (embed_mode 0)
    for node in onnx.load(str(dst), load_external_data=False).graph.node:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "EPContext" and attrs.get("embed_mode") is not None and attrs["embed_mode"].i == 0:
            binaries.append(Path(dst).parent / attrs["ep_cache_context"].s.decode())
    return [Path(dst), *dict.fromkeys(binaries)]


def prepare(src: Path, dst: Path, calibration: list[dict[str, np.ndarray]], *, component: str = "transformer",
            context: bool = False, check_feeds: int = 1, backend: str = "htp") -> dict:
    """fp32 ONNX ``src`` -> w8a16 QDQ ``dst``, run on the QNN backend and compared with fp32.

    ``calibration``: :func:`qwen_edge.quant.calibrate.record` feeds of ``component``. The first
    ``check_feeds`` feeds run on the backend (HTP emulation on x86: slow for big models, so one by default)
    and the output PSNR vs the fp32 model on the CPU is returned as ``npu_psnr_db``. With ``context`` an
    EPContext model ``<dst stem>_ctx.onnx`` (+ its binary ``<dst stem>_ctx_qnn.bin``) is written next to
    ``dst``; its files are listed under ``context_files``, and ``context_psnr_db`` compares its outputs with
    the graph compiled here (the same QNN graph: 999 when identical). Returns :func:`qwen_edge.quant.quantize`'s
    facts plus these.
    """
    from qwen_edge.quant import quantize
    from qwen_edge.quant.sensitivity import outputs, worst_psnr

    facts = quantize(component, Path(src), Path(dst), "w8a16", calibration)
    feeds = calibration[:check_feeds]
    sess = session(Path(dst), backend=backend)
    got = [sess.run(None, f)[0] for f in feeds]
    facts.update(device=f"QNN {backend.upper()}", npu_psnr_db=worst_psnr(outputs(Path(src), feeds), got))
    if context:
        ctx = Path(dst).with_name(Path(dst).stem + "_ctx.onnx")
        facts["context_files"] = [p.name for p in compile_context(Path(dst), ctx, backend=backend)]
        again = session(ctx, backend=backend)
        facts["context_psnr_db"] = worst_psnr(got, [again.run(None, f)[0] for f in feeds])
    return facts


def context_versions() -> dict:
    """What compiled a context binary: a device loads it only with a compatible QNN (else it compiles the graph)."""
    ort = register()
    info = require("onnxruntime_qnn", "qnn").build_and_package_info
    return {"onnxruntime": ort.__version__, "onnxruntime_qnn": info.__version__,
            "qnn_sdk": getattr(info, "qnn_version", None)}


# -- graph preparation for the HTP backend (used by the w8a16 recipe) ---------------------------------------

MASK_FLOOR = -1e4  # attention logits below this are masks, not data
MASK_MARGIN = 30.0  # nats below the smallest real logit where masked logits saturate


def fuse_for_htp(model) -> int:
    """Rewrite, in place, the decomposed norms the HTP backend runs wrongly or not at all into the fused ops
    it runs natively (:func:`fuse_lp_norms`, :func:`fuse_rms_norms`), and move attention's query scale onto
    the keys (:func:`fold_attention_scale`). Returns the number of rewrites."""
    return fuse_lp_norms(model) + fuse_rms_norms(model) + fold_attention_scale(model)


def fold_attention_scale(model) -> int:
    """``MatMul(q * a, k_t * b)`` -> ``MatMul(q, k_t * (a * b))`` for scalar constants ``a``, ``b``, in place.

    The exporter decomposes ``scaled_dot_product_attention`` with sqrt(scale) on both q and k. With the query
    Mul, HTP (in emulation, QNN 2.x as onnxruntime-qnn 2.7 ships it) crashes the process (SIGSEGV) running
    the 2.1 transformer's attention: fewer queries than keys (image tokens against the cached text + image keys)
    once there are more than 32 keys, then the output projection. Without it the graph runs. Same product in
    float32. Returns the number of MatMuls rewritten."""
    require("onnx", "onnx")
    from onnx import numpy_helper

    graph = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    uses = Counter(x for n in graph.node for x in n.input) + Counter(o.name for o in graph.output)

    def scaled(name: str):  # (Mul node, data input, scalar) when ``name`` is data * scalar used once
        node = producer.get(name)
        if node is None or node.op_type != "Mul" or uses[name] != 1:
            return None
        scalars = [x for x in node.input if x in consts and consts[x].size == 1]
        data = [x for x in node.input if x not in scalars]
        return (node, data[0], scalars[0]) if len(scalars) == 1 and len(data) == 1 else None

    folded = 0
    for matmul in [n for n in graph.node if n.op_type == "MatMul"]:
        q, k = scaled(matmul.input[0]), scaled(matmul.input[1])
        if q is None or k is None:
            continue
        name = f"{matmul.name}_key_scale"
        scale = consts[q[2]] * consts[k[2]]
        graph.initializer.append(numpy_helper.from_array(scale.astype(consts[k[2]].dtype), name))
        k[0].input[:] = [k[1], name]
        matmul.input[0] = q[1]
        graph.node.remove(q[0])
        folded += 1
    used = {x for n in graph.node for x in n.input}
    for t in [t for t in graph.initializer if t.name in consts and consts[t.name].size == 1 and t.name not in used]:
        graph.initializer.remove(t)  # the scalars no Mul reads any more
    return folded


def linears_as_convs(model) -> list[str]:
    """Rewrite, in place, every ``MatMul(x, W)`` with a constant 2-D ``W`` (a linear layer) as a 1x1 ``Conv``
    over the tokens laid out as (1, K, 1, tokens); returns the new Conv weight names, (M, K, 1, 1) each.

    Why: QNN's HTP backend takes MatMul weights per tensor only (ORT's QNN quantization config says so and
    forces it), where one 8-bit scale must cover every output channel of a layer; a Conv's weights may be
    quantized per output channel. Qualcomm's own transformer exports use the same 1x1-Conv form. On the
    embedded default (w8a16, ORT's CPU QDQ reference, the export's gates): transformer 40.4 -> 43.8 dB, text
    encoder 55 -> 60 dB, text_kv 56 -> 60 dB on the export's sample inputs. Needs static shapes (every exporter graph has them).
    """
    require("onnx", "onnx")
    from onnx import helper, numpy_helper, shape_inference

    graph = model.graph
    inferred = shape_inference.infer_shapes(model).graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.value_info, *inferred.input, *inferred.output]}
    consts = {t.name: t for t in graph.initializer}
    nodes, weights = [], []
    for node in graph.node:
        w = consts.get(node.input[1]) if node.op_type == "MatMul" else None
        x_shape = shapes.get(node.input[0])
        if w is None or len(w.dims) != 2 or not x_shape or 0 in x_shape:
            nodes.append(node)
            continue
        (k, m), tokens, p = w.dims, int(np.prod(x_shape[:-1])), f"{node.name or node.output[0]}_conv"
        graph.initializer.extend([
            numpy_helper.from_array(numpy_helper.to_array(w).T.reshape(m, k, 1, 1).copy(), f"{p}_weight"),
            numpy_helper.from_array(np.array([1, 1, tokens, k], np.int64), f"{p}_tokens"),
            numpy_helper.from_array(np.array([*x_shape[:-1], m], np.int64), f"{p}_shape"),
        ])
        nodes += [
            helper.make_node("Reshape", [node.input[0], f"{p}_tokens"], [f"{p}_nhwc"], name=f"{p}_in"),  # (1,1,T,K)
            helper.make_node("Transpose", [f"{p}_nhwc"], [f"{p}_nchw"], perm=[0, 3, 1, 2], name=f"{p}_to_nchw"),
            helper.make_node("Conv", [f"{p}_nchw", f"{p}_weight"], [f"{p}_y"], name=p),  # (1, M, 1, T)
            helper.make_node("Transpose", [f"{p}_y"], [f"{p}_y_nhwc"], perm=[0, 2, 3, 1], name=f"{p}_to_nhwc"),
            helper.make_node("Reshape", [f"{p}_y_nhwc", f"{p}_shape"], [node.output[0]], name=f"{p}_out"),
        ]
        weights.append(f"{p}_weight")
    if weights:
        del graph.node[:]
        graph.node.extend(nodes)
        used = {x for n in graph.node for x in n.input}
        for t in [t for t in graph.initializer if t.name in consts and t.name not in used]:
            graph.initializer.remove(t)  # the (K, M) matrices now stored as Conv weights
    return weights


def masked_softmax_ranges(path: Path, feeds, tmp: Path) -> dict | None:
    """Quantization ranges for attention logits that carry a mask, and for the masks themselves.

    A mask adds -65504 (or float32's lowest) to forbidden logits; min/max calibration would spread the
    16-bit grid of the Softmax input over [-65504, max], a step of ~1 nat: attention would run on logits
    rounded to integers (the tiny text encoder falls to ~18 dB). The Softmax input's range is instead the
    real logits' (values above :data:`MASK_FLOOR`) widened by :data:`MASK_MARGIN` below: masked logits
    saturate there, keeping a weight of at most e**-30 against any real key. The mask operand of the Add
    before the Softmax is clamped to [-65504, 0] (float32's lowest as a 16-bit grid's end has a scale of
    1e33, which the HTP backend refuses to compile).
    """
    onnx = require("onnx", "onnx")
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    logits = sorted({n.input[0] for n in graph.node if n.op_type == "Softmax"})
    operands = sorted({x for name in logits if (p := producer.get(name)) is not None and p.op_type == "Add"
                       for x in p.input})
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.name in operands}
    stats = _ranges(model, [n for n in logits + operands if n not in consts], feeds, tmp)
    for name, value in consts.items():
        stats[name] = _range(value)
    overrides = {}
    for name, (lo, hi, masked) in stats.items():
        if not masked or not np.isfinite(lo):
            continue
        rmin = lo - MASK_MARGIN if name in logits else MASKED
        overrides[name] = [{"rmin": np.array(rmin, np.float32), "rmax": np.array(max(hi, 0.0), np.float32)}]
    return overrides or None


def _ranges(model, names: list[str], feeds, tmp: Path) -> dict[str, tuple[float, float, bool]]:
    """(min, max) over the unmasked values of tensors ``names`` on ``feeds``, and whether any was masked."""
    onnx = require("onnx", "onnx")
    ort = require("onnxruntime", "onnx")
    from qwen_edge.quant.recipes import save

    if not names:
        return {}
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in known)
    probe = tmp / "softmax_probe.onnx"
    save(model, probe)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(probe), so, providers=["CPUExecutionProvider"])
    stats: dict[str, tuple[float, float, bool]] = {}
    for feed in feeds:
        for name, value in zip(names, sess.run(names, feed)):
            lo, hi, masked = _range(value)
            old = stats.get(name, (np.inf, -np.inf, False))
            stats[name] = (min(old[0], lo), max(old[1], hi), old[2] or masked)
    probe.unlink()
    return stats


def _range(value: np.ndarray) -> tuple[float, float, bool]:
    real = value[value > MASK_FLOOR]
    if not real.size:
        return np.inf, -np.inf, value.size > 0
    return float(real.min()), float(real.max()), real.size < value.size


def fuse_rms_norms(model) -> int:
    """Fuse decomposed RMSNorms (Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul: ``ops.rms_norm`` as
    exported) into ``SimplifiedLayerNormalization`` with ORT's own transformer fusion, in place. The QNN EP
    runs it as HTP's RmsNorm; the decomposed 16-bit Reciprocal loses the text encoders on HTP (~17 dB
    where ORT's CPU QDQ reference gives ~45). Returns the number of fusions."""
    require("onnxruntime.transformers", "onnx")
    from onnxruntime.transformers.fusion_simplified_layernorm import (
        FusionSimplifiedLayerNormalization,
    )
    from onnxruntime.transformers.onnx_model import OnnxModel
    from qwen_edge.quant.recipes import quiet

    before = sum(n.op_type == "SimplifiedLayerNormalization" for n in model.graph.node)
    wrapped = OnnxModel(model)
    with quiet():
        FusionSimplifiedLayerNormalization(wrapped).apply()
        wrapped.prune_graph()
    return sum(n.op_type == "SimplifiedLayerNormalization" for n in model.graph.node) - before


def _lp_norm_last_axis(onnx, div, axis: int, rank: int | None) -> list:
    """LpNormalization over ``axis`` as the HTP backend runs it right: over the last axis. A channel axis
    is moved last and back with two Transposes (the EP's NHWC layout then cancels them); ORT's QNN EP
    mis-lays out LpNormalization(axis=1) after a Conv (the tiny VAE decoder fell to 18 dB)."""
    name, x, y = div.name + "_lpnorm", div.input[0], div.output[0]
    if rank is None or axis in (-1, rank - 1):
        return [onnx.helper.make_node("LpNormalization", [x], [y], name=name, axis=-1, p=2)]
    axis %= rank
    perm = [d for d in range(rank) if d != axis] + [axis]
    back = [perm.index(d) for d in range(rank)]
    return [onnx.helper.make_node("Transpose", [x], [name + "_in"], name=name + "_to_last", perm=perm),
            onnx.helper.make_node("LpNormalization", [name + "_in"], [name + "_out"], name=name, axis=-1, p=2),
            onnx.helper.make_node("Transpose", [name + "_out"], [y], name=name + "_back", perm=back)]


def fuse_lp_norms(model) -> int:
    """Fuse ``x / max(ReduceL2(x, axis), eps)`` (``F.normalize``, the VAE's RMS norm over channels) into
    ``LpNormalization(x, axis, p=2)``. ORT's QNN pre-processing fuses this pattern on the last axis only;
    the VAE normalises axis 1, and the HTP backend fails to compile the unfused 16-bit broadcasting Div.
    Same result: both give 0 for an all-zero vector. Returns the number of fusions."""
    onnx = require("onnx", "onnx")
    from onnx import numpy_helper

    graph = model.graph
    consts = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    inferred = onnx.shape_inference.infer_shapes(model) if model.ByteSize() < (1 << 31) - 1 else model
    shapes = {v.name: len(v.type.tensor_type.shape.dim) for v in list(inferred.graph.value_info) + list(graph.input)}
    uses = Counter(x for n in graph.node for x in n.input) + Counter(o.name for o in graph.output)

    def const(name):
        return numpy_helper.to_array(consts[name]) if name in consts else None

    fused = 0
    for div in [n for n in graph.node if n.op_type == "Div"]:
        chain, node = [], producer.get(div.input[1])
        if node is not None and node.op_type == "Expand":
            chain, node = [node], producer.get(node.input[0])
        if node is None or node.op_type != "Clip" or len(node.input) < 2 or (len(node.input) > 2 and node.input[2]):
            continue
        eps, red = const(node.input[1]), producer.get(node.input[0])
        if eps is None or not 0 < float(eps) <= 1e-6 or red is None or red.op_type != "ReduceL2":
            continue
        axes = const(red.input[1]) if len(red.input) > 1 else None
        keep = next((a.i for a in red.attribute if a.name == "keepdims"), 1)
        inner = [red, node, *chain]
        if red.input[0] != div.input[0] or axes is None or axes.size != 1 or not keep or \
                any(uses[n.output[0]] != 1 for n in inner):
            continue
        at = list(graph.node).index(div)
        for k, node in enumerate(_lp_norm_last_axis(onnx, div, int(axes.ravel()[0]), shapes.get(div.input[0]))):
            graph.node.insert(at + k, node)
        for n in [*inner, div]:
            graph.node.remove(n)
        fused += 1
    return fused


def _ort_errors() -> tuple[type[Exception], ...]:
    """ONNX Runtime's own exception types (they derive from Exception, not RuntimeError)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError", "RuntimeException", "InvalidProtobuf",
             "ModelLoaded", "NotImplemented", "InvalidGraph", "EPFail", "NotFound")
    return (RuntimeError, *(getattr(state, n) for n in names if hasattr(state, n)))


def _devices(ort) -> list:
    return [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]


def _unsupported(model: Path, backend: str, provider_options: dict | None) -> str:
    """The nodes ORT assigns to the CPU when the fallback is allowed: the ones the backend refuses."""
    ort = register()
    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    so.add_provider_for_devices(_devices(ort), {"backend_type": backend, **(provider_options or {})})
    sess = ort.InferenceSession(str(model), so)
    cpu = [n for g in sess.get_provider_graph_assignment_info() if g.ep_name != EP_NAME for n in g.get_nodes()]
    named = [n for n in cpu if n.op_type not in _WRAPPING] or cpu
    listed = ", ".join(f"{n.name} ({n.op_type})" for n in named[:8])
    more = f" and {len(named) - 8} more" if len(named) > 8 else ""
    return f"{len(named)} node(s): {listed}{more}"


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text.split(" : ", 2)[-1] if text.startswith("[ONNXRuntimeError]") else text
