"""The Qualcomm NPU path: w8a16 QDQ models on ONNX Runtime's QNN execution provider (HTP backend).

``onnxruntime-qnn`` (2.x) is a plugin execution provider: its library is registered with ONNX Runtime
(:func:`register`) and sessions select its device. On an x86-64 Linux machine the HTP backend runs in
emulation, which is how the tests exercise the NPU path without a phone. Every session here disables
the CPU fallback, so a node the NPU cannot run is an error naming it rather than a silent slowdown.

- :func:`session`: the session the ONNX runtime opens for ``--device npu``;
- :func:`prepare`: fp32 ONNX -> w8a16 QDQ (calibrated) -> checked on HTP -> optionally a precompiled
  EPContext model (``ep.context_enable``), what ``export --target qnn`` writes per component;
- :func:`compile_context`: the EPContext model alone, for a model already quantized.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from qwen_edge.errors import InputError, require

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
    except Exception as e:  # ORT raises its own Fail/EPFail types
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
        ort.ModelCompiler(so, str(src), embed_compiled_data_into_model=embed).compile_to_file(str(dst))
    except Exception as e:
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
    EPContext model ``<dst stem>.ctx.onnx`` (+ its binary) is written next to ``dst``; its files are listed
    under ``context_files``. Returns :func:`qwen_edge.quant.quantize`'s facts plus these.
    """
    from qwen_edge.quant import quantize
    from qwen_edge.quant.sensitivity import outputs, psnr

    facts = quantize(component, Path(src), Path(dst), "w8a16", calibration)
    feeds = calibration[:check_feeds]
    sess = session(Path(dst), backend=backend)
    got = np.concatenate([sess.run(None, f)[0].astype(np.float64).ravel() for f in feeds])
    value = psnr(outputs(Path(src), feeds), got)
    facts.update(device=f"QNN {backend.upper()}", npu_psnr_db=round(value, 2) if math.isfinite(value) else 999.0)
    if context:
        ctx = Path(dst).with_name(Path(dst).stem + ".ctx.onnx")
        facts["context_files"] = [p.name for p in compile_context(Path(dst), ctx, backend=backend)]
    return facts


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
