"""Fidelity of a quantized model, and the ``mixed`` recipe built on per-layer sensitivity.

PSNR here is the exporter's parity figure (:func:`qwen_edge.export.onnx.fidelity`): peak = the fp32
output's largest magnitude, worst case over the feeds. So a ``mixed`` target means what the manifest's
per-component figure means.

``mixed`` answers "which layers can be 4-bit?" by measurement rather than by rule: each weight layer
(MatMul weights, embedding tables) is quantized alone, to int4 and to int8, and the component's output
error on the recorded calibration feeds is measured. Errors of independently quantized layers add (in
mean-squared error), so a greedy plan promotes the layer whose next precision removes the most error per
byte added until every feed's predicted PSNR meets the target; the model is then built with ORT's
quantizers (``MatMulNBits``/``GatherBlockQuantized`` for int4, ``quantize_dynamic`` for int8, fp32 for the
rest) and measured, and promotion continues while the measurement falls short. Cost: two quantize-and-run
passes per layer over the calibration feeds.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from qwen_edge.errors import NumericalError, require

from . import recipes

LEVELS = ("int4", "int8", "fp32")  # cheapest first
Feeds = list[dict[str, np.ndarray]]


def psnr(reference: np.ndarray, test: np.ndarray) -> float:
    """PSNR in dB of ``test`` against ``reference``, the peak being the reference's largest magnitude."""
    ref, x = np.asarray(reference, np.float64), np.asarray(test, np.float64)
    mse = float(np.mean((ref - x) ** 2))
    peak = float(np.abs(ref).max()) or 1.0
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def outputs(model: Path | bytes, feeds: Feeds) -> list[np.ndarray]:
    """The first output of ``model`` on each feed (CPU EP), in float64."""
    ort = require("onnxruntime", "onnx")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    source = str(model) if isinstance(model, Path) else model
    sess = ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
    return [sess.run(None, f)[0].astype(np.float64) for f in feeds]


def worst_psnr(refs: list[np.ndarray], tests: list[np.ndarray]) -> float:
    """The lowest per-feed PSNR, rounded to 0.01 dB (999 when identical)."""
    value = min(psnr(r, t) for r, t in zip(refs, tests))
    return round(value, 2) if math.isfinite(value) else 999.0


def psnr_of(src: Path, dst: Path, feeds: Feeds) -> float:
    """Worst-case output PSNR (dB) of the quantized ``dst`` vs the fp32 ``src`` over ``feeds``."""
    return worst_psnr(outputs(src, feeds), outputs(dst, feeds))


@dataclass
class _Layer:
    node: str  # MatMul/Gather node name in the canonical (Gemm-free) model
    label: str  # the torch module it came from, when the exporter recorded it
    shape: tuple[int, int]  # (K, N) of a MatMul weight, (rows, width) of an embedding table
    mse: dict[str, np.ndarray]  # per-feed output MSE with only this layer quantized, per level

    def bytes(self, level: str, block_size: int | None) -> float:
        k, n = self.shape
        if level == "int4":
            block = recipes.block_for(k, block_size)
            blocks = math.ceil(k / block)
            return blocks * block * n / 2 + blocks * n * 4  # nibbles (K padded to whole blocks) + fp32 block scales
        if level == "int8":
            return k * n + n * 5  # bytes + fp32 scale and zero point per output channel
        return k * n * 4


def mixed(component: str, src: Path, dst: Path, calibration: Feeds, opts) -> dict:
    """Per-layer precision (int4 / int8 / fp32) meeting ``opts.target_psnr`` at the smallest size."""
    if component in recipes.VAE_COMPONENTS:  # conv nets: no MatMul layers to grade; the issue keeps VAE int8
        return {**recipes.int8(component, src, dst, calibration, opts), "note": "VAE components stay int8"}
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        base = Path(tmp) / "canonical.onnx"
        recipes.save(recipes.canonical(src), base)
        refs = outputs(base, calibration)
        budget = np.array([np.abs(r).max() ** 2 for r in refs]) / 10 ** (opts.target_psnr / 10)  # MSE per feed
        layers = _grade(base, calibration, refs, opts.block_size, Path(tmp), opts.activations)
        plan = {layer.node: "int4" for layer in layers}
        scale, missed = 1.0, False
        while True:
            _promote(layers, plan, budget / scale, opts.block_size, force=missed)
            blocks = _build(base, plan, dst, opts.block_size, opts.activations)
            measured = worst_psnr(refs, outputs(dst, calibration))
            if measured >= opts.target_psnr or all(v == "fp32" for v in plan.values()):
                break
            scale *= 10 ** ((opts.target_psnr - measured) / 10) * 1.05  # the additive model was optimistic
            missed = True
    if measured < opts.target_psnr:
        raise NumericalError(f"{component}: mixed precision cannot reach {opts.target_psnr} dB even in fp32 "
                             f"({measured:.1f} dB)")
    counts = {level: sum(1 for v in plan.values() if v == level) for level in LEVELS}
    return {"weights": "per layer: int4 (MatMulNBits, GatherBlockQuantized) / int8 (dynamic, activations per "
                       f"{opts.activations}) / fp32",
            "target_psnr": opts.target_psnr, "psnr_db": measured, "layer_counts": counts,
            "layers": {layer.label: plan[layer.node] for layer in layers},
            **recipes.block_facts(opts.block_size, blocks)}


def _grade(base: Path, feeds: Feeds, refs: list[np.ndarray], block_size: int | None, tmp: Path,
           activations: str = "token") -> list[_Layer]:
    """Each weight layer's per-feed output MSE when it alone is quantized, at int4 and at int8."""
    layers = _weight_layers(base)
    probe = tmp / "probe.onnx"
    for layer in layers:
        for level in ("int4", "int8"):
            _build(base, {layer.node: level}, probe, block_size, activations)
            layer.mse[level] = np.array([np.mean((o - r) ** 2) for o, r in zip(outputs(probe, feeds), refs)])
        layer.mse["fp32"] = np.zeros(len(refs))
    return layers


def _promote(layers: list[_Layer], plan: dict[str, str], budget: np.ndarray, block_size: int | None,
             force: bool = False) -> None:
    """Greedy: while some feed's predicted MSE exceeds its budget, raise the layer whose next level removes
    the most (budget-relative) error per added byte. ``force``: promote at least once (the last build
    missed the target although the prediction met it)."""
    by_node = {layer.node: layer for layer in layers}

    def over() -> bool:
        return bool(np.any(sum(by_node[n].mse[level] for n, level in plan.items()) > budget))

    while over() or force:
        force = False
        best, best_gain = None, -1.0
        for n, level in plan.items():
            if level == "fp32":
                continue
            up, layer = LEVELS[LEVELS.index(level) + 1], by_node[n]
            added = max(layer.bytes(up, block_size) - layer.bytes(level, block_size), 1.0)
            gain = float(np.sum((layer.mse[level] - layer.mse[up]) / budget)) / added
            if gain > best_gain:
                best, best_gain = n, gain
        if best is None:
            return
        plan[best] = LEVELS[LEVELS.index(plan[best]) + 1]


def _build(base: Path, plan: dict[str, str], dst: Path, block_size: int | None,
           activations: str = "token") -> dict[int, int]:
    """The canonical model with each planned layer at its level: MatMulNBits / GatherBlockQuantized for int4,
    then ``quantize_dynamic`` for int8, its activations per token as the int8 recipe's
    (:mod:`qwen_edge.quant.per_token`; ``activations="tensor"``: quantize_dynamic's own). Returns the int4
    layers per block size (:func:`qwen_edge.quant.recipes.quantize_nbits`)."""
    onnx = require("onnx", "onnx")
    model = onnx.load(str(base))
    int4 = [n for n, level in plan.items() if level == "int4"]
    int8 = [n for n, level in plan.items() if level == "int8"]
    blocks = recipes.quantize_nbits(model, 4, block_size, nodes=int4) if int4 else {}
    if not int8:
        recipes.save(model, dst)
        return blocks
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp, recipes.quiet():
        staged = Path(tmp) / "int4.onnx"
        recipes.save(model, staged)
        recipes.dynamic_int8(staged, dst, activations, op_types_to_quantize=["MatMul", "Gather"],
                             nodes_to_quantize=int8,
                             use_external_data_format=recipes.model_bytes(staged) > recipes.EXTERNAL_DATA_BYTES)
    return blocks


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
