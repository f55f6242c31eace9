"""Names, shapes and dtypes of every exported component: declared here once.

Exporters name graph inputs/outputs from these specs, runtimes feed sessions by them, calibration
records them, and the bundle manifest copies them. No other module spells a component's I/O names.
NumPy-free and torch-free: the device runtime reads specs back from a manifest.

Static shapes throughout (the QNN HTP backend and Core ML want them): the text is right-padded to
``text_len`` tokens after the template drop. Padding is exact, not approximate: the text encoders are
causal, so pad tokens never change the real tokens' states, and the transformers mask pad keys out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import InputError, IntegrityError
from .family import family as family_of

DTYPES = ("float32", "float16", "int64", "int32")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise IntegrityError(f"tensor {self.name!r}: unknown dtype {self.dtype!r}")
        if not self.shape or any(not isinstance(d, int) or d < 1 for d in self.shape):
            raise IntegrityError(f"tensor {self.name!r}: shape must be positive integers, got {self.shape!r}")

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: dict) -> TensorSpec:
        try:
            return cls(str(d["name"]), tuple(d["shape"]), str(d.get("dtype", "float32")))
        except (KeyError, TypeError) as e:
            raise IntegrityError(f"malformed tensor spec {d!r}: {e}") from None


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


def transformer(d: Dims) -> IOSpec:
    n, t, half, c = d.tokens, d.text_len, d.head_dim // 2, d.token_channels
    out = (TensorSpec("velocity", (1, n, c)),)
    if d.family == "qwen-image-2.1":
        ins = (TensorSpec("latents", (1, n, c)), TensorSpec("text_kv", (d.layers, 2, 1, d.heads, t, d.head_dim)),
               TensorSpec("sigma", (1,)), TensorSpec("rope_cos", (n, half)), TensorSpec("rope_sin", (n, half)),
               TensorSpec("image_bias", (1, 1, n, t + n)))
    else:
        ins = (TensorSpec("latents", (1, n, c)), TensorSpec("text", (1, t, d.text_hidden)), TensorSpec("sigma", (1,)),
               TensorSpec("img_cos", (n, half)), TensorSpec("img_sin", (n, half)),
               TensorSpec("txt_cos", (t, half)), TensorSpec("txt_sin", (t, half)),
               TensorSpec("text_bias", (1, 1, 1, t + n)))
    return IOSpec("transformer", ins, out)


def vae_decoder(d: Dims) -> IOSpec:
    fam = family_of(d.family)
    h, w = d.height // fam.vae_factor, d.width // fam.vae_factor
    return IOSpec("vae_decoder", (TensorSpec("latents", (1, d.z_channels, h, w)),),
                  (TensorSpec("image", (1, d.image_channels, d.height, d.width)),))


def vae_encoder(d: Dims) -> IOSpec:
    fam = family_of(d.family)
    h, w = d.height // fam.vae_factor, d.width // fam.vae_factor
    return IOSpec("vae_encoder", (TensorSpec("image", (1, d.encoder_channels, d.height, d.width)),),
                  (TensorSpec("latents", (1, d.z_channels, h, w)),))


def components(d: Dims) -> dict[str, IOSpec]:
    """Every exportable component of the family, in pipeline order."""
    specs = [text_encoder(d)]
    if d.family == "qwen-image-2.1":
        specs.append(text_kv(d))
    specs += [transformer(d), vae_decoder(d), vae_encoder(d)]
    return {s.component: s for s in specs}


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
    transformer_cfg = _read_json(spec.root / "transformer" / "config.json")
    vae_cfg = _read_json(spec.root / "vae" / "config.json")
    text_cfg = _read_json(spec.root / "text_encoder" / "config.json")
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


def _read_json(path) -> dict:
    import json
    from pathlib import Path

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IntegrityError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IntegrityError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise IntegrityError(f"{path} must hold a JSON object")
    return data
