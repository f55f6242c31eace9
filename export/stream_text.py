"""Streaming export of the text encoder: the 8B Qwen3-VL text stack of 2.1 is 32 GB in fp32 (issue 4, "Scale").

The graph is the normal exporter's ``text_encoder`` graph (:class:`~qwen_edge.export.onnx.TextEncoderGraph`),
traced on the meta device and streamed by :func:`qwen_edge.export.stream.export_streamed` exactly as the
transformer's graphs are. What is the text encoder's own is here:

- **The embedding table** is read by a ``Gather``, not multiplied. The int8 recipe's ``quantize_dynamic`` lists
  ``Gather`` among its op types and quantizes its table as an *activation* (``GatherQuant`` ->
  ``quantize_activation``): uint8, asymmetric, one scale for the whole table, the gathered rows dequantized by a
  ``DequantizeLinear``. :func:`dequantized_gathers` rewrites the graph so, by name; :func:`quantize_table`
  quantizes the table with ORT's own ``compute_data_quant_params`` and ``quantize_nparray``, a block of rows at
  a time (the 8B's table alone is 2.5 GB in fp32; ``quantize_nparray`` makes four float copies of its input).
- **The parity gate** needs no fp32 model: the sample prompts tokenized as the pipeline tokenizes them
  (:func:`sample_feeds`) run through the torch text encoder a chunk of layers at a time
  (:class:`~qwen_edge.export.coreml_chunks.TextEncoderChunk`, :func:`reference`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from qwen_edge import iospec
from qwen_edge.checkpoint import read_json
from qwen_edge.errors import IntegrityError

from .coreml_chunks import Source, load_chunk, plan, unit_params
from .stream import CHUNK_BYTES, Feed, Log, export_streamed, parity

REFERENCE = "torch fp32, a chunk of layers at a time"  # what the gate compares against

TABLE_BLOCK_BYTES = 256 << 20  # float32 rows of the embedding table quantized at a time


def text_encoder_source(folder: Path, family: str = "qwen-image-2.1") -> Source:
    """The text encoder of a diffusers ``text_encoder/`` folder (a transformers VL checkpoint), built on demand
    and read the way ``family`` reads it (2.1: the last layer's output, before the final norm)."""
    from qwen_edge import text_encoder as te

    folder = Path(folder)
    cfg = te.TextEncoderConfig.from_transformers(read_json(folder / "config.json"))
    return Source("text_encoder", family, lambda: te.TextEncoder(cfg), folder, te.sanitize)


# -- int8: the embedding table as quantize_dynamic quantizes it ----------------------------------------------------


def quantize_table(table: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(V, E) float32 -> (uint8 (V, E), scale () float32, zero point () uint8): ``quantize_dynamic``'s Gather table
    (the activation type, asymmetric, per tensor; its ``reduce_range`` does not reach activations). ORT's
    arithmetic: ``compute_data_quant_params`` over the whole table, then the elementwise ``quantize_nparray`` a
    block of rows at a time, which gives the bytes one call on the whole table gives."""
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import (
        compute_data_quant_params,
        quantize_nparray,
    )

    zero_point, scale = compute_data_quant_params(table, TensorProto.UINT8, symmetric=False)
    q = np.empty(table.shape, np.uint8)  # (V, E)
    rows = max(1, TABLE_BLOCK_BYTES // max(1, table[0].nbytes))
    for i in range(0, len(table), rows):
        q[i:i + rows] = quantize_nparray(TensorProto.UINT8, table[i:i + rows], scale, zero_point)
    return q, np.asarray(scale, np.float32).reshape(()), np.asarray(zero_point, np.uint8).reshape(())


def dequantized_gathers(graph, tables: set[str]) -> None:
    """ORT's ``GatherQuant`` on every Gather whose table is in ``tables``: it gathers from ``<table>_quantized``
    into ``<out>_quantized``, and ``DequantizeLinear(<out>_quantized, <table>_scale, <table>_zero_point)`` gives
    ``<out>`` back just before its first reader, where ``quantize_model`` inserts it."""
    from onnx import helper

    nodes, pending = [], {}  # gathered output -> its DequantizeLinear, placed before the first reader
    for node in graph.node:
        for x in [x for x in node.input if x in pending]:
            if node.op_type == "DynamicQuantizeLinear":  # ORT would feed the uint8 rows to the MatMul directly
                raise IntegrityError(f"{x}: an embedding lookup read by a quantized MatMul directly; the streaming "
                                     "exporter handles lookups read by float ops")
            nodes.append(pending.pop(x))
        if node.op_type == "Gather" and node.input[0] in tables:
            table, out = node.input[0], node.output[0]
            node.input[0], node.output[0] = f"{table}_quantized", f"{out}_quantized"
            scale, zero_point = f"{table}_scale", f"{table}_zero_point"
            pending[out] = helper.make_node("DequantizeLinear", [f"{out}_quantized", scale, zero_point], [out],
                                            f"{out}_DequantizeLinear")
        nodes.append(node)
    nodes += pending.values()  # read by the graph's outputs only: ORT appends those at the end
    del graph.node[:]
    graph.node.extend(nodes)


# -- the parity gate without the fp32 model -----------------------------------------------------------------------


def sample_feeds(spec, dims: iospec.Dims, rope: dict, pad_id: int, prompts: Sequence[str]) -> list[Feed]:
    """Each prompt as the pipeline hands it to the text encoder: templated, tokenized, right-padded with
    ``pad_id`` to the graph's length (:meth:`qwen_edge.runtimes.onnx.Feeds.text_encoder`)."""
    from qwen_edge.prompt import load_tokenizer, tokenize
    from qwen_edge.runtimes.onnx import Feeds

    tokenizer, feeds = load_tokenizer(spec.tokenizer_dir), Feeds(dims, rope, pad_id)
    return [feeds.text_encoder(tokenize(tokenizer, spec.template, p)[0]) for p in prompts]


@torch.inference_mode()
def reference(src: Source, feeds: Sequence[Feed], chunk_bytes: int = CHUNK_BYTES) -> list[np.ndarray]:
    """The torch fp32 hidden states (1, T, E) of each feed, computed a chunk of layers at a time with every feed in
    one batch (each weight read once): the memory of one chunk, not of the model."""
    x = torch.from_numpy(np.concatenate([f["input_ids"] for f in feeds]))  # (P, T) int64
    for start, stop in plan(src, 4, chunk_limit(src, chunk_bytes)):
        x = load_chunk(src, start, stop)(x)  # (P, T, E)
    return [h[None] for h in x.float().numpy()]


def chunk_limit(src: Source, chunk_bytes: int) -> int:
    """``chunk_bytes``, raised to the first layer + the embedding table (the 8B's table alone is 2.5 GB in fp32)
    or the last layer + the final norm when bigger: :func:`~qwen_edge.export.coreml_chunks.plan` refuses a chunk
    limit below its biggest unit."""
    stem, blocks, head = unit_params(src)
    return max(chunk_bytes, 4 * (stem + blocks[0]), 4 * (blocks[-1] + head))


def export_text_encoder(path: Path, src: Source, io: iospec.IOSpec, feeds: Sequence[Feed], recipe: str, *,
                        opset: int = 21, log: Log | None = None) -> tuple[dict, dict]:
    """The text encoder ``src`` streamed to ``path`` in ``recipe``. Returns (its facts for the manifest, its
    :func:`parity` figures on ``feeds`` vs the chunked torch text encoder)."""
    log = log or (lambda msg: None)
    log("torch reference for the text encoder's gate, a chunk of layers at a time")
    refs = reference(src, feeds)
    log("exporting text_encoder (streamed)")
    facts = export_streamed(src, "text_encoder", io, path, recipe, opset=opset, log=log)
    return facts, parity(path, io, feeds, refs, REFERENCE)
