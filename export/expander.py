"""Export a transformers causal LM for the LLM expander: optimum's decoder-with-KV-cache ONNX layout.

optimum's ONNX Runtime integration (optimum-onnx 0.1, the only one for optimum 2.x) pins transformers < 4.58
and cannot be imported next to the transformers 5 that qwen-edge's reference tests need, so qwen-edge writes
the same layout itself: one ``model.onnx`` whose inputs are ``input_ids``, ``attention_mask``,
``position_ids`` and ``past_key_values.{i}.key/value`` and whose outputs are ``logits`` and
``present.{i}.key/value`` (:class:`qwen_edge.iospec.CausalLMIO`), next to ``config.json``,
``generation_config.json`` and the tokenizer files. A folder exported by optimum elsewhere runs unchanged.

The exporter's usual shape: example inputs (a short prompt on a short cache) -> a thin wrapper taking the
cache as flat tensors -> ``torch.onnx.export`` (dynamo, dynamic lengths) -> metadata -> a parity gate
against the torch model on a prefill and a decode step. Written into a temporary sibling folder and renamed
at the end: a failure leaves nothing behind.
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from qwen_edge.errors import InputError, NumericalError, require
from qwen_edge.iospec import EXPANDER_LM, CausalLMIO
from qwen_edge.export.onnx import quiet_exporter
from qwen_edge.expand.llm import ONNX_FILE, load_expander_config

OPSET = 21  # as the bundle's other graphs
TOLERANCE = 1e-4  # max |logits_ort - logits_torch| relative to the logits' range, fp32
_EXTERNAL_BYTES = 1.5 * 2**30  # protobuf stops at 2 GiB: larger weights go to model.onnx.data


def export_expander(model_dir, out_dir, *, overwrite: bool = False, opset: int = OPSET,
                    tolerance: float = TOLERANCE) -> list[Path]:
    """Export the causal LM in ``model_dir`` (a transformers folder, offline) to ``out_dir``.

    Returns the files written, inside ``out_dir``. InputError when ``model_dir`` is not a causal LM or
    ``out_dir`` exists (unless ``overwrite``); NumericalError when ONNX Runtime disagrees with torch.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    load_expander_config(model_dir)
    if out_dir.exists() and not overwrite:
        raise InputError(f"{out_dir} already exists; choose another folder or pass overwrite=True")
    if not out_dir.parent.is_dir():
        raise InputError(f"the folder {out_dir.parent} does not exist")
    torch = require("torch", "expand")
    model, tokenizer = _load(model_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _export_into(tmp, model, tokenizer, opset, tolerance, torch)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(p for p in out_dir.rglob("*") if p.is_file())


def _load(model_dir: Path):
    transformers = require("transformers", "expand")
    torch = require("torch", "expand")
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                                  local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"cannot load a causal LM and its tokenizer from {model_dir}: {e}".splitlines()[0]) from None
    return model.eval(), tokenizer


def _export_into(folder: Path, model, tokenizer, opset: int, tolerance: float, torch) -> None:
    shapes = _cache_shapes(model, torch)
    io = CausalLMIO(len(shapes))
    wrapper = _flat_cache_lm(model, io, torch)
    path = folder / ONNX_FILE
    with torch.no_grad(), quiet_exporter():
        program = torch.onnx.export(wrapper, _example_inputs(model, shapes, torch), input_names=io.input_names,
                                    output_names=io.output_names, dynamic_shapes=_dynamic_shapes(model, io, torch),
                                    opset_version=opset, dynamo=True, verbose=False)
        program.model.metadata_props.update({"qwen_edge.component": EXPANDER_LM,
                                             "qwen_edge.source_model_type": str(model.config.model_type)})
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        program.save(str(path), external_data=size > _EXTERNAL_BYTES)
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if not (folder / "tokenizer.json").is_file():
        raise InputError("the model's tokenizer has no fast version (tokenizer.json); the expander reads only that")
    _parity_gate(wrapper, path, io, shapes, tolerance, torch)


def _cache_of(output):
    """The cache of a model output: ``cache`` in transformers 5, ``past_key_values`` before."""
    return getattr(output, "cache", None) or output.past_key_values


def _cache_shapes(model, torch) -> list[tuple[int, int]]:
    """(kv_heads, head_dim) per layer, from one plain run: right for any architecture's cache."""
    with torch.no_grad():
        out = model(input_ids=torch.zeros(1, 1, dtype=torch.long), use_cache=True)
    return [(layer.keys.shape[1], layer.keys.shape[3]) for layer in _cache_of(out).layers]


def _flat_cache_lm(model, io: CausalLMIO, torch):
    """The thin wrapper: flat past tensors in, logits and flat present tensors out (optimum's signature)."""
    from transformers import DynamicCache

    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    class FlatCacheLM(torch.nn.Module):
        def __init__(self, lm, layers: int):
            super().__init__()
            self.lm, self.layers = lm, layers

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(self.layers)])
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=True, **{cache_kw: cache})  # logits (1, S, V)
            present = [t for layer in _cache_of(out).layers for t in (layer.keys, layer.values)]  # (1, H, P+S, D)
            return (out.logits, *present)

    return FlatCacheLM(model, io.layers).eval()


def _example_inputs(model, shapes, torch) -> tuple:
    """A 2-token prompt continuing a 3-token cache: both lengths > 1, so the exporter specialises neither."""
    past_len, seq = 3, 2
    gen = torch.Generator().manual_seed(0)
    past = [torch.randn(1, h, past_len, d, generator=gen) for h, d in shapes for _ in range(2)]
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (1, seq), generator=gen)
    mask = torch.ones(1, past_len + seq, dtype=torch.long)
    positions = torch.arange(past_len, past_len + seq)[None]
    return (ids, mask, positions, *past)


def _dynamic_shapes(model, io: CausalLMIO, torch):
    from torch.export import Dim

    context = int(getattr(model.config.get_text_config(), "max_position_embeddings", 0) or 32768)
    seq = Dim("sequence_length", min=1, max=context)
    total = Dim("total_sequence_length", min=1, max=context)
    past = Dim("past_sequence_length", min=0, max=context)
    return ({1: seq}, {1: total}, {1: seq}, tuple({2: past} for _ in io.past_names))


def _parity_gate(wrapper, path: Path, io: CausalLMIO, shapes, tolerance: float, torch) -> None:
    """ONNX Runtime against torch on a prefill (empty cache) and one decode step on the prefill's cache."""
    ort = require("onnxruntime", "expand")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    vocab = wrapper.lm.config.get_text_config().vocab_size
    rng = np.random.default_rng(0)
    past = [np.zeros((1, h, 0, d), np.float32) for h, d in shapes for _ in range(2)]
    ids = rng.integers(0, vocab, (1, 5))
    worst = 0.0
    for _ in range(2):
        seen = past[0].shape[2]
        inputs = [ids, np.ones((1, seen + ids.shape[1]), np.int64), np.arange(seen, seen + ids.shape[1])[None], *past]
        got = session.run(io.output_names, dict(zip(io.input_names, inputs)))
        with torch.no_grad():
            want = [t.numpy() for t in wrapper(*(torch.from_numpy(np.asarray(a)) for a in inputs))]
        span = float(want[0].max() - want[0].min()) or 1.0
        worst = max(worst, max(float(np.abs(g - w).max()) for g, w in zip(got, want)) / span)
        past, ids = got[1:], rng.integers(0, vocab, (1, 1))
    if not worst <= tolerance:
        raise NumericalError(f"the exported expander disagrees with torch: max error {worst:.2e} of the logits' "
                             f"range > {tolerance:.0e}")


# -- inside a bundle ---------------------------------------------------------------------------------------

BUNDLE_FOLDER = "expander"


def add_expander(writer, manifest, model_dir, log=None):
    """Put the causal LM in ``model_dir`` into ``expander/`` of the bundle being written (``writer``, a
    :class:`qwen_edge.export.bundle_writer.BundleWriter`) and return ``manifest`` (a
    :class:`qwen_edge.bundle.Manifest`) with its ``expander`` section: every file hashed, the folder in the
    layout :class:`qwen_edge.expand.LLMExpander` loads. ``generate --expand`` on the bundle uses it.

    ``model_dir``: a transformers folder (exported here, :func:`export_expander`) or one already in ONNX with a
    KV cache (optimum's layout, ``model.onnx``: checked by loading it, then copied)."""
    import dataclasses

    model_dir = Path(model_dir)
    config = load_expander_config(model_dir)  # one clear line for a folder that is not a causal LM
    kind = config.get("model_type", "causal LM")
    if (model_dir / ONNX_FILE).is_file():
        from qwen_edge.expand.llm import LLMExpander

        LLMExpander(model_dir)  # refuses a graph without a KV cache or a folder without tokenizer.json
        if log:
            log(f"copying the prompt expander ({kind}, ONNX) from {model_dir}")
        files = _copy_folder(model_dir, writer.root / BUNDLE_FOLDER)
    else:
        if log:
            log(f"exporting the prompt expander ({kind}) from {model_dir}")
        files = export_expander(model_dir, writer.root / BUNDLE_FOLDER)
    rels = [f.relative_to(writer.root).as_posix() for f in files]
    section = {"kind": "llm", "folder": BUNDLE_FOLDER, "file": f"{BUNDLE_FOLDER}/{ONNX_FILE}",
               "model_type": str(config.get("model_type", "")), "source": str(model_dir),
               "files": writer.hashes(rels)}
    return dataclasses.replace(manifest, expander=section)


def _copy_folder(src: Path, dst: Path) -> list[Path]:
    """The files of an exported expander folder (sub-folders included) copied to ``dst``."""
    out = []
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        out.append(target)
    return out
