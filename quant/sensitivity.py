"""Fidelity of a quantized model, and the ``mixed`` recipe built on per-layer sensitivity.

``mixed`` answers "which layers can be 4-bit?" by measurement rather than by rule: each weight layer (MatMul
weights, embedding tables) is quantized alone (to int4, then to int8) and the component's output error on recorded calibration feeds
is measured; errors of independently quantized layers add (in mean-squared error), so a greedy plan
promotes the layers with the most error removed per byte added until the predicted PSNR meets the
target, then builds the model with ORT's quantizers (``MatMulNBits`` for int4 layers, ``quantize_dynamic``
for int8 layers, fp32 for the rest), measures it, and keeps promoting if the measurement falls short.
Cost: two quantize-and-run passes per layer, over the calibration feeds given.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwen_edge.errors import NumericalError, require

LEVELS = ("int4", "int8", "fp32")  # cheapest first


def psnr(reference: np.ndarray, test: np.ndarray) -> float:
    """PSNR in dB of ``test`` against ``reference``, the peak being the reference's range (max - min)."""
    ref, x = np.asarray(reference, np.float64), np.asarray(test, np.float64)
    mse = float(np.mean((ref - x) ** 2))
    peak = float(ref.max() - ref.min()) or 1.0
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def outputs(model: Path | bytes, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    """The first output of ``model`` on each feed (CPU EP), concatenated flat in float64."""
    ort = require("onnxruntime", "onnx")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(model) if isinstance(model, Path) else model, so, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, f)[0].astype(np.float64).ravel() for f in feeds])


def psnr_of(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]]) -> float:
    """Output PSNR (dB) of the quantized ``dst`` vs the fp32 ``src`` on ``feeds``, rounded to 0.01 dB."""
    value = psnr(outputs(src, feeds), outputs(dst, feeds))
    return round(value, 2) if math.isfinite(value) else 999.0


@dataclass
class _Layer:
    node: str  # MatMul/Gather node name in the canonical (Gemm-free) model
    label: str  # the torch module it came from, when the exporter recorded it
    shape: tuple[int, int]  # (K, N)
    mse: dict[str, float]  # output MSE with only this layer quantized, per level

    def bytes(self, level: str, block_size: int) -> float:
        k, n = self.shape
        if level == "int4":
            return k * n / 2 + math.ceil(k / block_size) * n * 4  # nibbles + fp32 block scales
        if level == "int8":
            return k * n + n * 5  # bytes + fp32 scale and zero point per output channel
        return k * n * 4


def mixed(component: str, src: Path, dst: Path, calibration, opts) -> dict:
    """Per-layer precision (int4 / int8 / fp32) meeting ``opts.target_psnr`` at the smallest size."""
    from . import recipes

    if component in recipes.VAE_COMPONENTS:  # conv nets: no MatMul layers to grade; the issue keeps VAE int8
        return {**recipes.int8(component, src, dst, calibration, opts), "note": "VAE components stay int8"}
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        base = Path(tmp) / "canonical.onnx"
        recipes.save(recipes.canonical(src), base)
        ref = outputs(base, calibration)
        peak2 = float(ref.max() - ref.min()) ** 2 or 1.0
        layers = _grade(base, calibration, ref, opts.block_size, Path(tmp))
        plan = {layer.node: "int4" for layer in layers}
        slack = 0.0
        while True:
            _promote(layers, plan, peak2, opts, slack)
            _build(base, plan, dst, opts.block_size)
            measured = psnr(ref, outputs(dst, calibration))
            if measured >= opts.target_psnr or all(v == "fp32" for v in plan.values()):
                break
            slack += opts.target_psnr - measured  # the additive error model was optimistic: ask for more
    if measured < opts.target_psnr:
        raise NumericalError(f"{component}: mixed precision cannot reach {opts.target_psnr} dB even in fp32 "
                             f"({measured:.1f} dB)")
    counts = {level: sum(1 for v in plan.values() if v == level) for level in LEVELS}
    return {"weights": "per layer: int4 (MatMulNBits, GatherBlockQuantized) / int8 (dynamic) / fp32", "target_psnr": opts.target_psnr,
            "psnr_db": round(measured, 2) if math.isfinite(measured) else 999.0, "layer_counts": counts,
            "layers": {layer.label: plan[layer.node] for layer in layers}, "block_size": opts.block_size}


def _grade(base: Path, feeds, ref: np.ndarray, block_size: int, tmp: Path) -> list[_Layer]:
    """Each weight layer's output MSE when it alone is quantized, at int4 and at int8."""
    layers = _weight_layers(base)
    probe = tmp / "probe.onnx"
    for layer in layers:
        for level in ("int4", "int8"):
            _build(base, {layer.node: level}, probe, block_size)
            layer.mse[level] = float(np.mean((outputs(probe, feeds) - ref) ** 2))
        layer.mse["fp32"] = 0.0
    return layers


def _promote(layers: list[_Layer], plan: dict[str, str], peak2: float, opts, slack: float) -> None:
    """Greedy: raise the layer whose next level removes the most predicted MSE per added byte, until the
    predicted PSNR meets the target (plus ``slack`` dB, the last build's shortfall, after a miss)."""
    goal = peak2 / 10 ** ((opts.target_psnr + max(slack, 0.0)) / 10)  # the MSE budget
    by_node = {layer.node: layer for layer in layers}

    def total() -> float:
        return sum(by_node[n].mse[level] for n, level in plan.items())

    promoted_any = False
    while total() > goal or (slack > 0 and not promoted_any):
        best, best_gain = None, 0.0
        for n, level in plan.items():
            if level == "fp32":
                continue
            up = LEVELS[LEVELS.index(level) + 1]
            layer = by_node[n]
            gain = (layer.mse[level] - layer.mse[up]) / max(layer.bytes(up, opts.block_size) -
                                                           layer.bytes(level, opts.block_size), 1.0)
            if best is None or gain > best_gain:
                best, best_gain = n, gain
        if best is None:
            return
        plan[best] = LEVELS[LEVELS.index(plan[best]) + 1]
        promoted_any = True


def _build(base: Path, plan: dict[str, str], dst: Path, block_size: int) -> None:
    """The canonical model with each planned layer at its level: MatMulNBits / GatherBlockQuantized for int4,
    then ``quantize_dynamic`` for int8."""
    from . import recipes

    onnx = require("onnx", "onnx")
    q = require("onnxruntime.quantization", "onnx")
    model = onnx.load(str(base))
    int4 = [n for n, level in plan.items() if level == "int4"]
    int8 = [n for n, level in plan.items() if level == "int8"]
    if int4:
        recipes.quantize_nbits(model, 4, block_size, nodes=int4)
    if not int8:
        recipes.save(model, dst)
        return
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp, recipes.quiet():
        staged = Path(tmp) / "int4.onnx"
        recipes.save(model, staged)
        q.quantize_dynamic(str(staged), str(dst), op_types_to_quantize=["MatMul", "Gather"], nodes_to_quantize=int8,
                           per_channel=True, weight_type=q.QuantType.QInt8,
                           use_external_data_format=recipes.model_bytes(staged) > recipes.EXTERNAL_DATA_BYTES)


def _weight_layers(path: Path) -> list[_Layer]:
    """The model's linear layers (MatMul with a 2-D initializer B) and embedding tables (Gather from a 2-D
    initializer)."""
    onnx = require("onnx", "onnx")
    graph = onnx.load(str(path), load_external_data=False).graph
    dims = {t.name: tuple(t.dims) for t in graph.initializer}
    weight = {"MatMul": 1, "Gather": 0}  # which input holds the weight
    return [_Layer(n.name, _label(n), dims[n.input[weight[n.op_type]]], {}) for n in graph.node
            if n.op_type in weight and len(dims.get(n.input[weight[n.op_type]], ())) == 2]


def _label(node) -> str:
    """The torch module path the exporter recorded for ``node`` (e.g. ``transformer_blocks.0.attn.to_q``),
    falling back to the node name."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = [s for s in prop.value.strip("[]").replace("'", "").split(", ") if s]
            if len(scopes) >= 2:
                return f"{scopes[-2]} ({node.name})"
    return node.name
