"""Compacting a bundle's ONNX graphs: what no runtime reads is left out, and weights stored twice are stored once.

Three things made the embedded default's bundles larger than their weights (measured on its fp32 bundle, 7.94 MB):

- **Exporter debug records** (:func:`strip_debug`): ``torch.onnx.export`` annotates every node with its source
  stack trace, module path, FX node and class hierarchy (``metadata_props``), and every value with its
  ``torch.export`` signature. 1.0 MB of the fp32 bundle and a third of the int8 one, with the build machine's
  paths in it; ONNX Runtime never reads them. The quantizers run before this, on the exporter's graph (the
  ``mixed`` recipe labels layers by their recorded module path).
- **Constant subgraphs** (:func:`fold_constant_paths`): 2.1's ``text_kv`` modulates the text at t = 0, a constant,
  yet the exported graph carries the timestep MLP and the modulation weights to compute it (15 % of that graph's
  weights; the transformer needs them anyway, so folding saves the computation per prompt more than bytes).
- **Weights two graphs share** (:func:`share_initializers`): 2.1 runs text and image tokens through the same
  blocks, so ``text_kv`` holds nearly every block weight of ``transformer`` again (1.4 MB of the fp32 bundle;
  the quantized copies are identical too). They are written once into :data:`SHARED_DATA`, an ONNX external
  data file both graphs point into, listed (and hashed) in both components' ``files``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import defaultdict
from pathlib import Path

from qwen_edge.errors import require

SHARED_DATA = "shared_weights.data"
SHARE_MIN_BYTES = 1024  # smaller tensors stay inline: a shared copy would save less than its bookkeeping
_EXTERNAL = 1  # onnx.TensorProto.EXTERNAL
_TINY = 1024  # elements: a constant this small is folded even when it is larger than its inputs


# -- debug records -------------------------------------------------------------------------------------------


def strip_debug(model) -> None:
    """Clear ``metadata_props`` and ``doc_string`` of every node, value, initializer and (sub)graph of an
    ``onnx.ModelProto`` in place. The model's own ``metadata_props`` (qwen-edge's stamp) stay."""
    _strip_graph(model.graph)
    for function in model.functions:
        _clear(function)
        for node in function.node:
            _strip_node(node)


def _clear(proto) -> None:
    del proto.metadata_props[:]
    proto.doc_string = ""


def _strip_graph(graph) -> None:
    _clear(graph)
    for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
        _clear(value)
    for node in graph.node:
        _strip_node(node)


def _strip_node(node) -> None:
    _clear(node)
    for attr in node.attribute:
        if attr.HasField("g"):
            _strip_graph(attr.g)
        for sub in attr.graphs:
            _strip_graph(sub)


# -- constant subgraphs --------------------------------------------------------------------------------------------


def fold_constant_paths(model) -> None:
    """Fold, in an ``onnx_ir`` model (``torch.onnx.export``'s ``program.model``), every node computed from
    constants alone whose outputs are smaller than its constant inputs, then drop what became unused.

    onnxscript's default rule leaves a node alone when one input exceeds 8192 elements, which keeps 2.1's text
    modulation (a (1, 4D) row computed from (D, 4D) weights) as a computation; folding only what shrinks never
    grows the file. Evaluated by onnxscript's reference evaluator in the graph's own dtype.
    """
    optimizer = require("onnxscript.optimizer", "onnx")
    logger = logging.getLogger("onnxscript.optimizer")  # it logs every node it skips, at INFO and WARNING
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        optimizer.fold_constants(model, should_fold=_shrinks)
        optimizer.remove_unused_nodes(model)
    finally:
        logger.setLevel(level)


def _shrinks(node) -> bool | None:
    """True when every output has a known static size below the node's largest constant input, or tiny (the
    t = 0 of the text row is a ``ConstantOfShape``, which the default rules never fold); None (the default
    rules) otherwise."""
    inputs = [v.const_value.size for v in node.inputs if v is not None and v.const_value is not None]
    outputs = [_numel(v.shape) for v in node.outputs]
    if not inputs or any(n is None for n in outputs):
        return None
    largest = max(outputs, default=0)
    return True if largest < max(inputs) or largest <= _TINY else None


def _numel(shape) -> int | None:
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    n = 1
    for d in shape:
        n *= d
    return n


# -- weights shared between graphs ------------------------------------------------------------------------------


def share_initializers(root: Path, graphs: list[str], data: str = SHARED_DATA) -> list[str]:
    """Store every initializer that two or more of ``graphs`` (ONNX files relative to ``root``, all in its top
    folder) hold with identical type, shape and bytes once, in ``root / data``, each graph's copy becoming an
    external-data reference into it; a graph's own external-data file is rewritten without the moved tensors
    (and removed if nothing is left in it). Tensors are read and written one at a time, never a whole graph's
    weights. Returns the graphs that changed; ``data`` is not written when nothing is shared."""
    onnx = require("onnx", "onnx")
    root = Path(root)
    if any("/" in g for g in graphs):
        raise ValueError("share_initializers expects graphs in the bundle's top folder")
    models = {g: onnx.load(str(root / g), load_external_data=False) for g in graphs}
    keys = {g: {t.name: _key(t, root) for t in m.graph.initializer} for g, m in models.items()}
    holders = defaultdict(set)
    for g, named in keys.items():
        for key in named.values():
            if key is not None:
                holders[key].add(g)
    shared = {key for key, gs in holders.items() if len(gs) > 1}
    if not shared:
        return []
    places = _write_shared(root, data, models, keys, shared)
    changed = [g for g in graphs if any(keys[g][t.name] in shared for t in models[g].graph.initializer)]
    for g in changed:
        _repoint(root, g, models[g], keys[g], places, data)
    return changed


def _key(tensor, root: Path) -> tuple | None:
    """(data type, dims, sha256 of the bytes) of an initializer of at least :data:`SHARE_MIN_BYTES`, else None."""
    payload = _payload(tensor, root)
    if payload is None or len(payload) < SHARE_MIN_BYTES:
        return None
    return tensor.data_type, tuple(tensor.dims), hashlib.sha256(payload).hexdigest()


def _payload(tensor, root: Path) -> bytes | None:
    """The tensor's raw little-endian bytes (from its external-data file or ``raw_data``); None for tensors kept
    in typed fields (the exporters write ``raw_data``; those are small)."""
    if tensor.data_location == _EXTERNAL:
        info = {e.key: e.value for e in tensor.external_data}
        with open(root / info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            return f.read(int(info["length"])) if "length" in info else f.read()
    return tensor.raw_data if tensor.HasField("raw_data") else None


def _write_shared(root: Path, data: str, models: dict, keys: dict, shared: set) -> dict[tuple, tuple[int, int]]:
    """Write each shared tensor's bytes once into ``root / data``; {key: (offset, length)}."""
    places: dict[tuple, tuple[int, int]] = {}
    with open(root / data, "wb") as out:
        for g, model in models.items():
            for tensor in model.graph.initializer:
                key = keys[g][tensor.name]
                if key in shared and key not in places:
                    payload = _payload(tensor, root)
                    places[key] = (out.tell(), len(payload))
                    out.write(payload)
    return places


def _repoint(root: Path, graph: str, model, keys: dict, places: dict, data: str) -> None:
    """Point ``graph``'s shared initializers into ``data``; copy its other external tensors into a fresh file of
    its own (the old one still held the moved bytes); save the graph."""
    onnx = require("onnx", "onnx")
    own = {e.value for t in model.graph.initializer if t.data_location == _EXTERNAL
           for e in t.external_data if e.key == "location"} - {data}
    fresh = root / f".{graph}.data.tmp"
    with open(fresh, "wb") as out:
        for tensor in model.graph.initializer:
            key = keys[tensor.name]
            if key in places:
                _set_external(tensor, data, *places[key])
            elif tensor.data_location == _EXTERNAL:
                payload = _payload(tensor, root)
                offset = out.tell()
                out.write(payload)
                _set_external(tensor, _own_file(graph, own), offset, len(payload))
    for name in own:
        (root / name).unlink()
    if fresh.stat().st_size:
        os.replace(fresh, root / _own_file(graph, own))
    else:
        fresh.unlink()
    onnx.save_model(model, str(root / graph))


def _own_file(graph: str, current: set[str]) -> str:
    """The graph's own external-data file: the one it had (a graph the exporter wrote keeps at most one), else
    ``<graph>.data`` as :func:`qwen_edge.quant.recipes.save` names it."""
    return next(iter(sorted(current)), f"{graph}.data")


def _set_external(tensor, location: str, offset: int, length: int) -> None:
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.data_location = _EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)
