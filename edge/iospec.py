"""Names, shapes and dtypes of every exported component: declared here once.

Exporters name graph inputs/outputs from these specs, runtimes feed sessions by them, calibration
records them, and the bundle manifest copies them. No other module spells a component's I/O names.
NumPy-free and torch-free: the device runtime reads specs back from a manifest.

Static shapes by default (the QNN HTP backend and Core ML want them): the text is right-padded to
``text_len`` tokens after the template drop. Padding is exact, not approximate: the text encoders are
causal, so pad tokens never change the real tokens' states, and the transformers mask pad keys out.
With ``dynamic`` (``export --dynamic``, CPU targets) the image-size-dependent dims are named by one of
:data:`SYMBOLS` instead of a number; the text stays padded to ``text_len``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .jsonfile import read_json
from .errors import InputError, IntegrityError
from .family import family as family_of

DTYPES = ("float32", "float16", "int64", "int32")
# The symbolic dims of a dynamic-size graph: each name stands for one size derived from the image size.
SYMBOLS = {
    "height": "image height in pixels",
    "width": "image width in pixels",
    "latent_height": "height / vae_factor",
    "latent_width": "width / vae_factor",
    "tokens": "image tokens, (height / (vae_factor * patch)) * (width / (vae_factor * patch))",
    "keys": "attention keys of an image query: text_len + tokens",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]  # a str is one of SYMBOLS (a dynamic-size graph's axis)
    dtype: str = "float32"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise IntegrityError(f"tensor {self.name!r}: unknown dtype {self.dtype!r}")
        if not self.shape or any(not _is_dim(d) for d in self.shape):
            raise IntegrityError(f"tensor {self.name!r}: shape must be positive integers or one of "
                                 f"{', '.join(SYMBOLS)}, got {self.shape!r}")

    @property
    def dynamic(self) -> bool:
        """Whether any axis is symbolic."""
        return any(isinstance(d, str) for d in self.shape)

    def at(self, d: Dims) -> TensorSpec:
        """This tensor with its symbolic axes replaced by their values at ``d``'s size."""
        if not self.dynamic:
            return self
        values = symbol_values(d)
        return TensorSpec(self.name, tuple(values[s] if isinstance(s, str) else s for s in self.shape), self.dtype)

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: dict) -> TensorSpec:
        try:
            return cls(str(d["name"]), tuple(d["shape"]), str(d.get("dtype", "float32")))
        except (KeyError, TypeError) as e:
            raise IntegrityError(f"malformed tensor spec {d!r}: {e}") from None


def _is_dim(d: object) -> bool:
    return d in SYMBOLS if isinstance(d, str) else isinstance(d, int) and not isinstance(d, bool) and d >= 1


@dataclass(frozen=True)
class IOSpec:
    component: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def to_json(self) -> dict:
        return {"inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs]}

    @classmethod
    def from_json(cls, component: str, d: dict) -> IOSpec:
        try:
            return cls(component, tuple(TensorSpec.from_json(t) for t in d["inputs"]),
                       tuple(TensorSpec.from_json(t) for t in d["outputs"]))
        except (KeyError, TypeError) as e:
            raise IntegrityError(f"component {component!r}: malformed inputs/outputs ({e})") from None


@dataclass(frozen=True)
class Dims:
    """Everything the shapes depend on, read from a checkpoint's config.json files."""

    family: str
    height: int
    width: int
    text_len: int  # prompt tokens after the template drop, padded
    drop: int  # template tokens dropped in front
    text_hidden: int  # text encoder hidden size
    z_channels: int
    image_channels: int  # decoder output channels (2.1: RGBA = 4)
    encoder_channels: int  # encoder input channels
    heads: int
    head_dim: int
    layers: int

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the transformer's token grid."""
        fam = family_of(self.family)
        return self.height // (fam.vae_factor * fam.patch), self.width // (fam.vae_factor * fam.patch)

    @property
    def tokens(self) -> int:
        h, w = self.grid
        return h * w

    @property
    def token_channels(self) -> int:
        return self.z_channels * family_of(self.family).patch ** 2

    def to_json(self) -> dict:
        return asdict(self)


def symbol_values(d: Dims) -> dict[str, int]:
    """What each of :data:`SYMBOLS` is at ``d``'s image size."""
    factor = family_of(d.family).vae_factor
    return {"height": d.height, "width": d.width, "latent_height": d.height // factor,
            "latent_width": d.width // factor, "tokens": d.tokens, "keys": d.text_len + d.tokens}


def _sizes(d: Dims, dynamic: bool) -> dict[str, int | str]:
    """The image-size-dependent dims of ``d``: their values, or with ``dynamic`` their symbolic names."""
    values = symbol_values(d)
    return {name: name for name in values} if dynamic else values


def text_encoder(d: Dims) -> IOSpec:
    t = d.drop + d.text_len
    return IOSpec("text_encoder", (TensorSpec("input_ids", (1, t), "int64"),),
                  (TensorSpec("hidden_states", (1, t, d.text_hidden)),))


def text_kv(d: Dims) -> IOSpec:
    """2.1 only: per-layer text keys/values, computed once per prompt (text is modulated at t = 0)."""
    t, half = d.text_len, d.head_dim // 2
    return IOSpec("text_kv",
                  (TensorSpec("text", (1, t, d.text_hidden)), TensorSpec("rope_cos", (t, half)),
                   TensorSpec("rope_sin", (t, half)), TensorSpec("text_bias", (1, 1, t, t))),
                  (TensorSpec("text_kv", (d.layers, 2, 1, d.heads, t, d.head_dim)),))


def transformer(d: Dims, modulation: bool = False, dynamic: bool = False) -> IOSpec:
    """One sampler step. 2.1 with ``modulation``: the step's precomputed ``step_modulation`` (1, 5 * dim) in
    place of ``sigma`` (the bundle tabulates it per step of its schedule, :meth:`TransformerV2.step_modulation`).
    With ``dynamic`` the token axes are ``tokens`` and ``keys`` (:data:`SYMBOLS`)."""
    size = _sizes(d, dynamic)
    n, keys, t, half, c = size["tokens"], size["keys"], d.text_len, d.head_dim // 2, d.token_channels
    out = (TensorSpec("velocity", (1, n, c)),)
    if d.family == "qwen-image-2.1":
        step = TensorSpec("step_modulation", (1, 5 * d.heads * d.head_dim)) if modulation else TensorSpec("sigma", (1,))
        ins = (TensorSpec("latents", (1, n, c)), TensorSpec("text_kv", (d.layers, 2, 1, d.heads, t, d.head_dim)),
               step, TensorSpec("rope_cos", (n, half)), TensorSpec("rope_sin", (n, half)),
               TensorSpec("image_bias", (1, 1, n, keys)))
    else:
        ins = (TensorSpec("latents", (1, n, c)), TensorSpec("text", (1, t, d.text_hidden)), TensorSpec("sigma", (1,)),
               TensorSpec("img_cos", (n, half)), TensorSpec("img_sin", (n, half)),
               TensorSpec("txt_cos", (t, half)), TensorSpec("txt_sin", (t, half)),
               TensorSpec("text_bias", (1, 1, 1, keys)))
    return IOSpec("transformer", ins, out)


def vae_decoder(d: Dims, dynamic: bool = False) -> IOSpec:
    s = _sizes(d, dynamic)
    return IOSpec("vae_decoder", (TensorSpec("latents", (1, d.z_channels, s["latent_height"], s["latent_width"])),),
                  (TensorSpec("image", (1, d.image_channels, s["height"], s["width"])),))


def vae_encoder(d: Dims, dynamic: bool = False) -> IOSpec:
    s = _sizes(d, dynamic)
    return IOSpec("vae_encoder", (TensorSpec("image", (1, d.encoder_channels, s["height"], s["width"])),),
                  (TensorSpec("latents", (1, d.z_channels, s["latent_height"], s["latent_width"])),))


def components(d: Dims, max_rank: int | None = None, modulation: bool = False,
               dynamic: bool = False) -> dict[str, IOSpec]:
    """Every exportable component of the family, in pipeline order; with ``max_rank`` as a backend with that
    tensor rank limit takes them (:func:`fold_rank`: the QNN HTP backend and Core ML stop at rank 5); with
    ``modulation`` the 2.1 transformer taking its step's precomputed modulation (:func:`transformer`); with
    ``dynamic`` the image-size-dependent axes symbolic (:data:`SYMBOLS`; the text encoders have none)."""
    specs = [text_encoder(d)]
    if d.family == "qwen-image-2.1":
        specs.append(text_kv(d))
    specs += [transformer(d, modulation and d.family == "qwen-image-2.1", dynamic), vae_decoder(d, dynamic),
              vae_encoder(d, dynamic)]
    if max_rank is not None:
        specs = [fold_rank(s, max_rank) for s in specs]
    return {s.component: s for s in specs}


# -- chunks: a component split at block boundaries, and tensor rank limits ---------------------------------
# A runtime with a package size limit (Core ML) runs a big component as consecutive chunks of its blocks.
# Between chunks flows the ``carry``: the hidden state and whatever the blocks read that the component's
# own inputs do not give (modulation, time embedding). Declared here like every other tensor name.

_STEM_INPUTS = {"text_encoder": ("input_ids",), "text_kv": ("text",), "transformer": ("latents", "sigma", "text")}
_EVOLVING = ("hidden", "text_hidden")  # carry every chunk updates; the rest is made once by the first chunk
# A chunk returns the carry it updates as ``next_<name>`` and the following chunk reads it as ``<name>``: Core ML
# forbids one name being both an input and an output of a program.
NEXT = "next_"


def carried(name: str) -> str:
    """The input name a chunk output feeds in the following chunk (``next_hidden`` -> ``hidden``)."""
    return name[len(NEXT):] if name.startswith(NEXT) else name


def carry(d: Dims, component: str) -> tuple[TensorSpec, ...]:
    """The tensors one chunk of ``component`` hands to the next."""
    dim = d.heads * d.head_dim
    if component == "text_encoder":
        return (TensorSpec("hidden", (1, d.drop + d.text_len, d.text_hidden)),)
    if component == "text_kv":  # text rows only; modulation is the shared t = 0 row
        return (TensorSpec("hidden", (1, d.text_len, dim)), TensorSpec("modulation", (1, 1, 4 * dim)))
    if component == "transformer" and d.family == "qwen-image-2.1":
        return (TensorSpec("hidden", (1, d.tokens, dim)), TensorSpec("modulation", (1, 1, 4 * dim)),
                TensorSpec("temb", (1, dim)))
    if component == "transformer":  # v1: both streams; each block derives its modulation from temb
        return (TensorSpec("hidden", (1, d.tokens, dim)), TensorSpec("text_hidden", (1, d.text_len, dim)),
                TensorSpec("temb", (1, dim)))
    raise InputError(f"{component} cannot be split into chunks: it has no stack of blocks")


def chunk(d: Dims, component: str, start: int, stop: int, blocks: int) -> IOSpec:
    """Blocks ``[start, stop)`` of ``component`` (which has ``blocks`` blocks) as one graph.

    The first chunk takes the component's inputs, later ones the carry in place of the stem's inputs. The last
    chunk returns the component's outputs; the others return the carry they update (``next_hidden``, v1's
    ``next_text_hidden``), and the first also the carry it alone makes (modulation, temb), which every later
    chunk reads. A ``text_kv`` chunk returns the keys/values of its own layers, ``(stop - start, 2, 1, heads,
    text_len, head_dim)``; concatenated they are ``text_kv``.
    """
    if not 0 <= start < stop <= blocks:
        raise InputError(f"chunk [{start}, {stop}) is not inside {component}'s {blocks} blocks")
    full, state = components(d)[component], carry(d, component)
    first, last = start == 0, stop == blocks
    ins = full.inputs if first else state + tuple(t for t in full.inputs if t.name not in _STEM_INPUTS[component])
    outs = () if last else tuple(TensorSpec(NEXT + t.name, t.shape, t.dtype) for t in state if t.name in _EVOLVING)
    if first and not last:
        outs += tuple(t for t in state if t.name not in _EVOLVING)
    if component == "text_kv":
        kv = full.outputs[0]
        outs = (TensorSpec(kv.name, (stop - start, *kv.shape[1:])), *outs)
    elif last:
        outs = full.outputs
    return IOSpec(component, ins, outs)


# What each tensor name means, for model files that carry descriptions (Core ML shows them in Xcode).
_MEANING = {
    "input_ids": "token ids of the prompt template, right-padded to drop + text_len",
    "hidden_states": "text encoder hidden states of every token (the first `drop` belong to the template)",
    "text": "prompt hidden states after the template drop, right-padded to text_len",
    "rope_cos": "rotary cosine table, one row per token (qwen_edge.rope)",
    "rope_sin": "rotary sine table, one row per token (qwen_edge.rope)",
    "img_cos": "rotary cosine table of the image tokens (qwen_edge.rope_v1)",
    "img_sin": "rotary sine table of the image tokens (qwen_edge.rope_v1)",
    "txt_cos": "rotary cosine table of the text tokens (qwen_edge.rope_v1)",
    "txt_sin": "rotary sine table of the text tokens (qwen_edge.rope_v1)",
    "text_bias": "additive attention bias: 0 where a key is visible, -65504 for text padding",
    "image_bias": "additive attention bias of the image queries over [text, image] keys",
    "text_kv": "per-layer text keys and values, computed once per prompt",
    "latents": "latents: packed tokens (transformer) or the unpacked (1, C, h, w) grid (VAE)",
    "sigma": "noise level in [0, 1] of this sampler step (timestep / 1000)",
    "step_modulation": "this sampler step's AdaLN rows [scale1, gate1, scale2, gate2, final scale], precomputed",
    "velocity": "flow-matching velocity of the image tokens",
    "image": "image (1, C, H, W) in about [-1, 1]",
    "hidden": "chunk carry: hidden states after this chunk's blocks",
    "text_hidden": "chunk carry: text-stream hidden states after this chunk's blocks",
    "modulation": "chunk carry: the shared AdaLN modulation rows",
    "temb": "chunk carry: the time embedding",
}


def describe(name: str) -> str:
    """One line saying what tensor ``name`` holds (empty for names without a description)."""
    return _MEANING.get(name, "")


def fold_rank(spec: IOSpec, max_rank: int) -> IOSpec:
    """``spec`` with every tensor of more than ``max_rank`` dims reshaped by merging its leading axes (Core ML
    stops at rank 5; 2.1's text_kv is rank 6). Same bytes in the same order: a plain reshape either way."""

    def fold(t: TensorSpec) -> TensorSpec:
        shape = t.shape
        while len(shape) > max_rank:
            shape = (shape[0] * shape[1], *shape[2:])
        return TensorSpec(t.name, shape, t.dtype)

    return IOSpec(spec.component, tuple(map(fold, spec.inputs)), tuple(map(fold, spec.outputs)))


# -- Dims from a checkpoint's JSON or back from a manifest ------------------------------------------------

# Shape keys per family in the component config.json files, with the released models' values as fallbacks
# (diffusers fills absent keys with these defaults too). JSON only: no model code, no torch.
_TRANSFORMER_KEYS = {  # family -> (heads, head_dim, layers) keys and defaults
    "qwen-image-2.1": (("num_attention_heads", 32), ("attention_head_dim", 128), ("num_layers", 32)),
    "qwen-image": (("num_attention_heads", 24), ("attention_head_dim", 128), ("num_layers", 60)),
}
_VAE_CHANNELS = {  # family -> (decoder output, encoder input) channel keys and defaults
    "qwen-image-2.1": (("out_channels", 4), ("in_channels", 4)),
    "qwen-image": (("input_channels", 3), ("input_channels", 3)),
}


def dims_from_checkpoint(spec, height: int, width: int, text_len: int) -> Dims:
    """The :class:`Dims` of checkpoint ``spec`` (a :class:`qwen_edge.spec.ModelSpec`) exported at
    ``height`` x ``width`` with the prompt padded to ``text_len`` tokens after the template drop."""
    fam = spec.family
    check_size(fam.name, height, width)
    if isinstance(text_len, bool) or not isinstance(text_len, int) or text_len < 1:
        raise InputError(f"text length must be a positive integer, got {text_len!r}")
    transformer_cfg = read_json(spec.root / "transformer" / "config.json")
    vae_cfg = read_json(spec.root / "vae" / "config.json")
    text_cfg = read_json(spec.root / "text_encoder" / "config.json")
    text_cfg = {**text_cfg, **(text_cfg.get("text_config") or {})}  # VL configs nest the text stack
    (heads, hd, layers), (out_ch, in_ch) = _TRANSFORMER_KEYS[fam.name], _VAE_CHANNELS[fam.name]
    return Dims(family=fam.name, height=height, width=width, text_len=text_len, drop=spec.template.drop,
                text_hidden=int(text_cfg["hidden_size"]), z_channels=spec.z_channels,
                image_channels=int(vae_cfg.get(*out_ch)), encoder_channels=int(vae_cfg.get(*in_ch)),
                heads=int(transformer_cfg.get(*heads)), head_dim=int(transformer_cfg.get(*hd)),
                layers=int(transformer_cfg.get(*layers)))


def dims_from_json(d: dict) -> Dims:
    """Inverse of :meth:`Dims.to_json` (a bundle manifest's ``dims``)."""
    try:
        return Dims(**{f: d[f] for f in Dims.__dataclass_fields__})
    except (KeyError, TypeError) as e:
        raise IntegrityError(f"malformed dims {d!r}: {e}") from None


def check_size(family: str, height: int, width: int) -> None:
    """Height and width must be positive multiples of the family's grid (qwen-edge refuses to floor)."""
    m = family_of(family).size_multiple
    for name, side in (("height", height), ("width", width)):
        if isinstance(side, bool) or not isinstance(side, int) or side < m or side % m:
            raise InputError(f"{name} {side!r} is not a positive multiple of {m} ({family}'s patch grid)")


# -- the prompt expander's causal LM: optimum's decoder-with-KV-cache layout -----------------------------
# Lengths vary (the whole prompt first, then one token per step), so this graph is described by names and
# dynamic axes rather than static TensorSpecs. The names are optimum's ``text-generation-with-past`` layout,
# so a model exported by optimum on another machine runs unchanged (qwen_edge.expand reads and writes it).

EXPANDER_LM = "expander_lm"  # the component's name in a bundle


@dataclass(frozen=True)
class CausalLMIO:
    """Inputs ``input_ids``, ``attention_mask``, ``position_ids`` (optional in optimum's exports) and
    ``past_key_values.{i}.key/value`` (1, kv_heads, past, head_dim); outputs ``logits`` (1, seq, vocab)
    and ``present.{i}.key/value`` (1, kv_heads, past + seq, head_dim)."""

    layers: int

    input_ids = "input_ids"
    attention_mask = "attention_mask"
    position_ids = "position_ids"
    logits = "logits"

    def past(self, i: int, kind: str) -> str:
        return f"past_key_values.{i}.{kind}"

    def present(self, i: int, kind: str) -> str:
        return f"present.{i}.{kind}"

    @property
    def past_names(self) -> list[str]:
        return [self.past(i, kind) for i in range(self.layers) for kind in ("key", "value")]

    @property
    def present_names(self) -> list[str]:
        return [self.present(i, kind) for i in range(self.layers) for kind in ("key", "value")]

    @property
    def input_names(self) -> list[str]:
        return [self.input_ids, self.attention_mask, self.position_ids, *self.past_names]

    @property
    def output_names(self) -> list[str]:
        return [self.logits, *self.present_names]

    @classmethod
    def from_input_names(cls, names) -> CausalLMIO:
        """The layout of a graph with these input names; IntegrityError unless it is a decoder with a cache."""
        names = set(names)
        layers = 0
        while cls(layers + 1).past(layers, "key") in names and cls(layers + 1).past(layers, "value") in names:
            layers += 1
        if not layers or cls.input_ids not in names or cls.attention_mask not in names:
            raise IntegrityError("not a causal LM with a KV cache: expected inputs input_ids, attention_mask and "
                                 "past_key_values.{i}.key/value (optimum's text-generation-with-past layout)")
        return cls(layers)
