"""Components as consecutive chunks of their blocks: what the Core ML exporter converts, one chunk at a time.

A Core ML package has a practical size limit (and the converter holds a chunk's weights several times over),
so a component whose package would exceed the limit is split at block boundaries (issue 5). Each chunk is a
thin wrapper whose ``forward`` takes exactly the chunk's IOSpec inputs (:func:`qwen_edge.iospec.chunk`):

- the first chunk runs the component's stem (embeddings, time embedding, modulation) and its first blocks;
- middle chunks run blocks on the carried state (:func:`qwen_edge.iospec.carry`);
- the last chunk runs its blocks and the head.

A component that fits is simply one chunk holding every block, so exports of every size share this one path.
Wrappers register only the submodules their chunk uses; the model itself is built on the meta device and
:func:`load_chunk` streams just those weights out of the safetensors, so converting one chunk of a 7B
transformer needs the memory of that chunk, not of the model.

Wrappers call the model's own block methods (``text_step``/``image_step``, the v1 block and its
``modulation``) and the 2.1 model's ``_time``/``_mod``/``_head`` helpers, the same code ``encode_text`` and
``forward_cached`` run; the exporter's parity gates compare every chunk chain against those methods.
Layouts follow Core ML's rank limit of 5: 2.1's text K/V travel as ``(2 * layers, 1, heads, text_len,
head_dim)`` (k and v of each layer interleaved), the same bytes as the IOSpec's rank-6 tensor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from qwen_edge import iospec
from qwen_edge.checkpoint import Sanitize, read_json, weight_files
from qwen_edge.errors import InputError, IntegrityError, UsageError
from torch import nn

CHUNKABLE = ("text_encoder", "text_kv", "transformer")


@dataclass(frozen=True)
class Source:
    """How to build one torch component on the meta device and where its weights are."""

    component: str
    family: str
    build: Callable[[], nn.Module]
    folder: Path
    sanitize: Sanitize


def source(spec, component: str, ane: bool = False) -> Source:
    """The :class:`Source` of a chunkable component of checkpoint ``spec`` (a ModelSpec). ``ane``: the 2.1
    transformer's Neural Engine-friendly variant (per-head attention, linears as 1x1 convs; same weights)."""
    family = spec.family.name
    if ane and (component == "text_encoder" or family != "qwen-image-2.1"):
        if component == "text_encoder":
            ane = False  # the flag concerns the transformer; the text encoder keeps its plain graph
        else:
            raise UsageError("the Neural Engine variant (--ane) exists for qwen-image-2.1's transformer only")
    if component == "text_encoder":
        from qwen_edge import text_encoder as te

        folder = spec.component("text_encoder")
        cfg = te.TextEncoderConfig.from_transformers(read_json(folder / "config.json"))
        return Source(component, family, lambda: te.TextEncoder(cfg), folder, te.sanitize)
    if component not in ("text_kv", "transformer"):
        raise UsageError(f"{component} has no blocks to split into chunks")
    folder = spec.component("transformer")
    if family == "qwen-image-2.1":
        from qwen_edge import transformer_v2 as t2

        cfg = t2.TransformerV2Config.from_diffusers(read_json(folder / "config.json"))
        cfg = dataclasses.replace(cfg, ane_split_heads=ane, ane_conv=ane)
        if not cfg.causal_condition:
            raise UsageError("Core ML export of 2.1 needs causal_condition=True (the text K/V cache)")
        return Source(component, family, lambda: t2.TransformerV2(cfg), folder, t2.sanitize)
    if component == "text_kv":
        raise UsageError("text_kv exists for qwen-image-2.1 only")
    from qwen_edge import transformer_v1 as t1

    cfg = t1.TransformerV1Config.from_diffusers(read_json(folder / "config.json"))
    return Source(component, family, lambda: t1.TransformerV1(cfg), folder, t1.sanitize)


# -- the wrappers -----------------------------------------------------------------------------------------------------


class _Chunk(nn.Module):
    """Blocks ``[start, stop)`` of ``model``; subclasses say which stem/head modules they use."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, start: int, stop: int,
                 stem: Iterable[str] = (), head: Iterable[str] = ()):
        super().__init__()
        self.__dict__["model"] = model  # not registered: only this chunk's weights become the export's parameters
        self.start, self.stop, self.total = start, stop, len(blocks)
        self.first, self.last = start == 0, stop == len(blocks)
        self.stem_names, self.head_names = tuple(stem), tuple(head)
        self.blocks = nn.ModuleList(blocks[start:stop])
        used = [*(self.stem_names if self.first else ()), *(self.head_names if self.last else ())]
        self.parts = nn.ModuleDict({n.replace(".", "_"): _get(model, n) for n in used})

    def layers(self) -> Iterable[tuple[int, nn.Module]]:
        return zip(range(self.start, self.stop), self.blocks)


def _get(model: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        model = getattr(model, part)
    return model


class TextEncoderChunk(_Chunk):
    """input_ids (first) or hidden -> hidden_states (last) or hidden."""

    def __init__(self, model, start: int, stop: int):
        super().__init__(model, model.layers, start, stop, stem=("embed_tokens",),
                         head=("norm",) if model.config.final_norm else ())

    def forward(self, x):
        from qwen_edge.text_encoder import causal_mask

        m = self.model
        if self.first:
            x = m.embed_tokens(x)  # (1, T, E)
        cos, sin = m.rope_tables(x.shape[1], x.dtype, x.device)  # (T, hd/2) each
        mask = causal_mask(None, x.shape[1], x.dtype, x.device)  # (1, 1, T, T)
        for _, layer in self.layers():
            x = layer(x, cos, sin, mask)  # (1, T, E)
        return m.norm(x) if self.last and m.config.final_norm else x


class TextKVChunk(_Chunk):
    """2.1 text K/V of layers [start, stop): text, rope, bias (first) or hidden, modulation, rope, bias ->
    text_kv (2n, 1, H, L, Dh) [+ hidden, modulation]."""

    def __init__(self, model, start: int, stop: int):
        super().__init__(model, model.transformer_blocks, start, stop,
                         stem=("time_text_embed", "modulation", "txt_in"))

    def forward(self, *args):
        from qwen_edge.transformer_v2 import _text_inputs

        m = self.model
        if self.first:
            text, rope_cos, rope_sin, text_bias = args
            temb = m._time(text.new_zeros(1), text.dtype)[0]  # (1, D): the t = 0 row text is modulated at
            mod, txt = m._mod(temb), m.txt_in(text)  # (1, 1, 4D), (1, L, D)
        else:
            txt, mod, rope_cos, rope_sin, text_bias = args
        cos, sin, bias = _text_inputs(rope_cos, rope_sin, text_bias, txt)
        kv = []
        for i, block in self.layers():
            txt, k, v = block.text_step(txt, mod, cos, sin, bias, advance=i < self.total - 1)  # k, v (1, H, L, Dh)
            kv += [k, v]
        kv = torch.stack(kv)  # (2n, 1, H, L, Dh)
        if self.last:
            return kv
        return (kv, txt, mod) if self.first else (kv, txt)  # what later chunks read (iospec.chunk)


class TransformerV2Chunk(_Chunk):
    """2.1 image step over blocks [start, stop) against the cached text K/V (2 * layers, 1, H, L, Dh)."""

    def __init__(self, model, start: int, stop: int):
        super().__init__(model, model.transformer_blocks, start, stop,
                         stem=("time_text_embed", "modulation", "img_in"), head=("norm_out", "proj_out"))

    def forward(self, *args):
        m = self.model
        if self.first:
            latents, text_kv, sigma, cos, sin, bias = args
            temb = m._time(sigma, latents.dtype)[1]  # (1, D)
            mod, img = m._mod(temb), m.img_in(latents)  # (1, 1, 4D), (1, N, D)
        else:
            img, mod, temb, text_kv, cos, sin, bias = args
        for i, block in self.layers():
            img = block.image_step(img, text_kv[2 * i], text_kv[2 * i + 1], mod, cos, sin, bias)  # (1, N, D)
        if self.last:
            return m._head(img, temb)  # (1, N, C)
        return (img, mod, temb) if self.first else img  # the carry later chunks read (iospec.chunk)


class TransformerV1Chunk(_Chunk):
    """v1 dual-stream blocks [start, stop); each block derives its own modulation from temb."""

    def __init__(self, model, start: int, stop: int):
        super().__init__(model, model.transformer_blocks, start, stop,
                         stem=("time_text_embed", "img_in", "txt_in", "txt_norm"), head=("norm_out", "proj_out"))

    def forward(self, *args):
        m = self.model
        if self.first:
            latents, text, sigma, img_cos, img_sin, txt_cos, txt_sin, text_bias = args
            temb = m.time_text_embed(sigma, latents.dtype)  # (1, D)
            img, txt = m.img_in(latents), m.txt_in(m.txt_norm(text))  # (1, N, D), (1, L, D)
        else:
            img, txt, temb, img_cos, img_sin, txt_cos, txt_sin, text_bias = args
        for _, block in self.layers():
            mod = block.modulation(temb)  # (1, 12, D)
            img, txt = block(img, txt, mod, (img_cos, img_sin), (txt_cos, txt_sin), text_bias)
        if not self.last:
            return (img, txt, temb) if self.first else (img, txt)  # the carry later chunks read (iospec.chunk)
        return m.proj_out(m.norm_out(img, m.norm_out.modulation(temb)))  # (1, N, out_features)


def chunk_module(src: Source, model: nn.Module, start: int, stop: int) -> _Chunk:
    """The wrapper of blocks [start, stop) of ``src.component``."""
    if src.component == "text_encoder":
        return TextEncoderChunk(model, start, stop)
    if src.component == "text_kv":
        return TextKVChunk(model, start, stop)
    cls = TransformerV2Chunk if src.family == "qwen-image-2.1" else TransformerV1Chunk
    return cls(model, start, stop)


def blocks_of(model: nn.Module, component: str) -> nn.ModuleList:
    return model.layers if component == "text_encoder" else model.transformer_blocks


# -- sizes and the plan ------------------------------------------------------------------------------------------------


def unit_params(src: Source) -> tuple[int, list[int], int]:
    """Parameter counts of (stem, each block, head), from the meta-device model (no weights read)."""
    with torch.device("meta"):
        model = src.build()
    blocks = blocks_of(model, src.component)
    full = chunk_module(src, model, 0, len(blocks))
    stem = sum(count_params(_get(model, n)) for n in full.stem_names)
    head = sum(count_params(_get(model, n)) for n in full.head_names)
    return stem, [count_params(b) for b in blocks], head


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def plan(src: Source, bytes_per_param: float, limit: int) -> list[tuple[int, int]]:
    """Consecutive [start, stop) block ranges whose packages stay under ``limit`` bytes (greedy, in order)."""
    stem, blocks, head = unit_params(src)
    sizes = [b * bytes_per_param for b in blocks]
    sizes[0] += stem * bytes_per_param
    sizes[-1] += head * bytes_per_param
    worst = max(range(len(sizes)), key=sizes.__getitem__)
    if sizes[worst] > limit:
        raise InputError(f"--chunk-limit {_human(limit)} is smaller than one block of {src.component} (block {worst} "
                         f"needs {_human(sizes[worst])} at this precision); raise the limit or compress more")
    ranges, start, total = [], 0, 0.0
    for i, size in enumerate(sizes):
        if i > start and total + size > limit:
            ranges.append((start, i))
            start, total = i, 0.0
        total += size
    ranges.append((start, len(sizes)))
    return ranges


def _human(n: float) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{int(n)}B"


def parse_size(text: str) -> int:
    """'1GB', '512MB', '300KB', '1.5G' or plain bytes -> bytes (binary units)."""
    t = str(text).strip().upper().removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale > 1 else t)
    except ValueError:
        raise UsageError(f"cannot read the size {text!r}; write e.g. 1GB, 512MB or 300KB") from None
    if not value > 0:
        raise UsageError(f"size {text!r} must be positive")
    return int(value * scale)


# -- loading only one chunk's weights ----------------------------------------------------------------------------------


def load_chunk(src: Source, start: int, stop: int, dtype: torch.dtype = torch.float32) -> _Chunk:
    """Build the model on the meta device and stream in only the weights of blocks [start, stop) (plus the stem
    or head when the chunk has them): memory for this chunk, not the model."""
    with torch.device("meta"):
        model = src.build()
    module = chunk_module(src, model, start, stop)
    names = {id(p): n for n, p in model.named_parameters()}
    wanted = {names[id(p)] for p in module.parameters()}
    state = _read_wanted(src, wanted, dtype)
    missing = sorted(wanted - state.keys())
    if missing:
        shown = ", ".join(missing[:6]) + (f", ... (+{len(missing) - 6} more)" if len(missing) > 6 else "")
        raise InputError(f"{src.folder} lacks {len(missing)} weights of {src.component} blocks [{start}, {stop}): {shown}")
    model.load_state_dict(state, strict=False, assign=True)
    still_meta = [n for n, p in module.named_parameters() if p.is_meta]
    if still_meta:
        raise IntegrityError(f"chunk [{start}, {stop}) of {src.component} still has unloaded weights: {still_meta[:4]}")
    return module.eval().requires_grad_(False)


def _read_wanted(src: Source, wanted: set[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Only the tensors whose (sanitized) names are wanted: names are mapped on meta tensors first, so a
    tensor is read from disk only when this chunk needs it."""
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for f in weight_files(src.folder):
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118  (a safe_open handle, not a dict)
                shape = handle.get_slice(key).get_shape()
                probe = [n for n, _ in src.sanitize(key, torch.empty(shape, device="meta"))]
                if not wanted.intersection(probe):
                    continue
                for name, tensor in src.sanitize(key, handle.get_tensor(key)):
                    if name in wanted:
                        state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return state


def chunk_io(dims: iospec.Dims, component: str, start: int, stop: int, blocks: int) -> iospec.IOSpec:
    """A chunk's IOSpec in Core ML's layout (rank folded to 5)."""
    return iospec.fold_rank(iospec.chunk(dims, component, start, stop, blocks), 5)
