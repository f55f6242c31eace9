"""Merging a LoRA into a loaded model's Linear weights: ``W += scale * (alpha / rank) * up @ down``.

The file is read with safetensors only (never unpickled) and streamed: the header is validated first,
then one layer's tensors at a time are read and merged in fp32, so the model is left untouched when the
file does not fit it. Key formats accepted, following diffusers' Qwen-Image LoRA loader
(``QwenImageLoraLoaderMixin.lora_state_dict`` and ``_convert_non_diffusers_qwen_lora_to_diffusers``):

- diffusers/PEFT: ``[transformer.|diffusion_model.|base_model.model.]<path>.lora_A[.<adapter>].weight`` and
  ``lora_B``; alpha from an optional ``<path>.alpha`` scalar, else from the ``lora_adapter_metadata``
  JSON that diffusers' ``save_lora_weights`` writes (``r``, ``lora_alpha``, ``rank_pattern``,
  ``alpha_pattern``, ``use_rslora``), else ``alpha = rank`` (scale 1, the PEFT convention).
- kohya / ComfyUI: ``lora_unet_<path with underscores>.lora_down.weight`` / ``lora_up.weight`` /
  ``.alpha``, and the same with a dotted path (Qwen-Image-Lightning's layout).

Underscore names are mapped back to module paths through the model's own Linear names rather than by
guessing where the dots were: diffusers' guesser only knows v1's names (it turns 2.1's ``gate_layer``
into ``gate.layer``), matching against ``named_modules()`` works for any model.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import InputError, IntegrityError

# <path>.(lora_A|lora_B|lora_down|lora_up)[.<adapter>].(weight|bias)  or  <path>.alpha
_KEY = re.compile(r"^(?P<path>.+?)\.(?:(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.(?P<adapter>[^.]+))?"
                  r"\.(?P<param>weight|bias)|(?P<alpha>alpha))$")
_ROLE = {"lora_A": "down", "lora_down": "down", "lora_B": "up", "lora_up": "up"}
# Prefixes the trainers put in front of the module path (tried only when the bare path matches nothing).
_PREFIXES = ("transformer.", "diffusion_model.", "base_model.model.", "model.", "lora_unet_", "lora_transformer_")
# Names only one Qwen-Image family has: used to explain a LoRA made for the other family.
_FAMILY_MARKERS = {
    "Qwen-Image v1": ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "txt_mlp", "img_mod", "txt_mod",
                      "img_mlp.net", "img_mlp_net"),
    "Qwen-Image 2.1": ("gate_layer", "modulation", "img_mlp.proj", "img_mlp_proj", "img_mlp.out", "img_mlp_out",
                       "txt_in.in_layer", "txt_in_in_layer"),
}
_METADATA_KEY = "lora_adapter_metadata"  # where diffusers' save_lora_weights stores the LoraConfig


@dataclass(frozen=True)
class LoraReport:
    """What ``merge_lora`` did: the file, the user scale, the layers changed and the ranks seen."""

    path: Path
    scale: float
    layers: tuple[str, ...]
    ranks: tuple[int, ...]
    key_format: str

    def __str__(self) -> str:
        ranks = ",".join(map(str, self.ranks))
        return (f"merged LoRA {self.path.name} ({self.key_format} keys, rank {ranks}) into {len(self.layers)} "
                f"layers at scale {self.scale:g}")


@dataclass
class _Target:
    """The LoRA tensors aimed at one Linear layer (key names in the file)."""

    down: str | None = None
    up: str | None = None
    up_bias: str | None = None
    alpha: str | None = None
    keys: list[str] = field(default_factory=list)


def merge_lora(module: nn.Module, path: str | Path, scale: float = 1.0) -> LoraReport:
    """Merge the LoRA in the safetensors file ``path`` into ``module``'s Linear layers, in place.

    Each targeted ``nn.Linear`` gets ``W += scale * s * (up @ down)`` (and ``b += scale * s * up_bias``
    when the LoRA trains biases) with ``s = alpha / rank`` (``alpha / sqrt(rank)`` for rsLoRA), computed
    in fp32 and cast back to the weight's dtype. Every key must target a Linear of ``module`` with matching
    shapes; otherwise an InputError lists the offending keys and nothing is changed. An unreadable,
    non-safetensors or non-finite file raises IntegrityError.
    """
    path = Path(path).expanduser()
    scale = _check_scale(scale)
    linears = _linears(module)
    with _open(path) as handle:
        config = _adapter_config(handle, path)
        targets, key_format = _plan(handle, linears, path)
        factors = {name: _alpha_factor(handle, t, name, config) for name, t in targets.items()}
        _check_values(handle, targets, path)
        for name, target in targets.items():
            _merge_one(linears[name], handle, target, scale * factors[name])
        ranks = sorted({_shape(handle, t.down)[0] for t in targets.values()})
    return LoraReport(path, scale, tuple(targets), tuple(ranks), key_format)


def _check_scale(scale: float) -> float:
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise InputError(f"LoRA scale must be a number, not {scale!r}") from None
    if not math.isfinite(scale):
        raise InputError(f"LoRA scale must be finite, not {scale}")
    return scale


def _linears(module: nn.Module) -> dict[str, nn.Linear]:
    linears = {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear)}
    if any(m.weight.is_meta for m in linears.values()):
        raise InputError("the model's weights are not loaded (meta device): load them before merging a LoRA")
    return linears


@contextmanager
def _open(path: Path):
    """``safe_open`` with every failure to open turned into one IntegrityError line naming the file."""
    from safetensors import safe_open

    if not path.is_file():
        raise InputError(f"LoRA file {path} does not exist")
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises SafetensorError, OSError, ValueError...
        raise IntegrityError(_unreadable(path, e)) from None
    with handle:
        yield handle


def _unreadable(path: Path, error: Exception) -> str:
    with path.open("rb") as f:
        head = f.read(4)
    if head[:2] == b"PK" or head[:1] == b"\x80" or path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        return f"{path} is a pickle/torch.save file: LoRAs are only read from .safetensors (convert it first)"
    return f"{path} is not a readable safetensors file ({type(error).__name__}: {error})".splitlines()[0]


def _adapter_config(handle, path: Path) -> dict | None:
    """The PEFT LoraConfig diffusers stores in the header, if any (it carries lora_alpha and the patterns)."""
    raw = (handle.metadata() or {}).get(_METADATA_KEY)
    if raw is None:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise IntegrityError(f"{path}: {_METADATA_KEY} in the header is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise IntegrityError(f"{path}: {_METADATA_KEY} in the header must be a JSON object")
    # save_lora_weights prefixes each field with the component ("transformer.r"); a bare LoraConfig does not.
    if any(k.startswith("transformer.") for k in config):
        config = {k.removeprefix("transformer."): v for k, v in config.items() if k.startswith("transformer.")}
    if config.get("use_dora"):
        raise InputError(f"{path} is a DoRA adapter (use_dora): only plain LoRA can be merged")
    for name in ("r", "lora_alpha"):
        if not isinstance(config.get(name, 1), (int, float)):
            raise IntegrityError(f"{path}: {_METADATA_KEY} field {name!r} is not a number")
    return config


def _plan(handle, linears: dict[str, nn.Linear], path: Path) -> tuple[dict[str, _Target], str]:
    """Group the file's keys by target layer and check names and shapes; raise before touching the model."""
    resolve = _resolver(linears)
    targets: dict[str, _Target] = {}
    unmatched, unknown, problems, formats, adapters = [], [], [], set(), set()
    for key in handle.keys():
        m = _KEY.match(key)
        if m is None:
            unknown.append(key)
            continue
        name = resolve(m["path"])
        if name is None:
            unmatched.append(key)
            continue
        if m["kind"]:
            formats.add("diffusers" if m["kind"] in ("lora_A", "lora_B") else "kohya")
        if m["adapter"]:
            adapters.add(m["adapter"])
        _assign(targets.setdefault(name, _Target()), m, key, problems)
    problems += _shape_problems(handle, targets, linears)
    if len(adapters) > 1:  # PEFT's "lora_A.<adapter>.weight": one file, one adapter
        problems.append(f"keys from several adapters in one file ({', '.join(sorted(adapters))})")
    _raise_if(path, unknown, unmatched, problems)
    if not targets:
        raise InputError(f"{path} holds no LoRA weights (no lora_A/lora_B or lora_down/lora_up keys)")
    return targets, "+".join(sorted(formats))


def _resolver(linears: dict[str, nn.Linear]):
    """path in the file -> Linear name in the model, trying known prefixes and kohya's underscore form."""
    flat: dict[str, str | None] = {}
    for name in linears:
        key = name.replace(".", "_")
        flat[key] = None if key in flat else name  # None: two layers flatten alike, refuse to pick one

    def resolve(path: str) -> str | None:
        for candidate in _candidates(path):
            if candidate in linears:
                return candidate
            if flat.get(candidate):
                return flat[candidate]
        return None

    return resolve


def _candidates(path: str) -> Iterator[str]:
    yield path
    for prefix in _PREFIXES:
        if path.startswith(prefix):
            yield from _candidates(path[len(prefix):])


def _assign(target: _Target, m: re.Match, key: str, problems: list[str]) -> None:
    slot = "alpha" if m["alpha"] else _ROLE[m["kind"]] + ("_bias" if m["param"] == "bias" else "")
    if slot == "down_bias":
        problems.append(f"{key}: a bias on lora_A/lora_down is not a LoRA layout this loader knows")
        return
    if getattr(target, slot) is not None:
        problems.append(f"{key} and {getattr(target, slot)} target the same layer")
        return
    setattr(target, slot, key)
    target.keys.append(key)


def _shape_problems(handle, targets: dict[str, _Target], linears: dict[str, nn.Linear]) -> list[str]:
    problems = []
    for name, t in targets.items():
        if t.down is None or t.up is None:
            problems.append(f"{name}: {'lora_B/lora_up' if t.up is None else 'lora_A/lora_down'} missing")
            continue
        problems += _pair_problems(handle, t, linears[name], name)
    return problems


def _pair_problems(handle, t: _Target, linear: nn.Linear, name: str) -> list[str]:
    down, up = _shape(handle, t.down), _shape(handle, t.up)
    out_f, in_f = linear.weight.shape
    if len(down) != 2 or len(up) != 2 or down[0] != up[1]:
        return [f"{name}: rank mismatch, down {down} vs up {up}"]
    if down[1] != in_f or up[0] != out_f:
        return [f"{name}: LoRA is {up[0]}x{down[1]} (rank {down[0]}) but the layer is {out_f}x{in_f}"]
    if t.up_bias is not None and (linear.bias is None or _shape(handle, t.up_bias) != (out_f,)):
        return [f"{name}: LoRA bias {_shape(handle, t.up_bias)} does not fit the layer's bias"]
    if t.alpha is not None and math.prod(_shape(handle, t.alpha)) != 1:
        return [f"{name}: alpha must be a scalar, got shape {_shape(handle, t.alpha)}"]
    return []


def _shape(handle, key: str) -> tuple[int, ...]:
    """A tensor's shape from the header alone (no data read)."""
    return tuple(handle.get_slice(key).get_shape())


def _raise_if(path: Path, unknown: list[str], unmatched: list[str], problems: list[str]) -> None:
    parts = []
    if unmatched:
        parts.append(f"{len(unmatched)} keys target no Linear layer of this model: {_few(unmatched)}"
                     + _family_hint(unmatched))
    if unknown:
        parts.append(f"{len(unknown)} keys are not LoRA weights: {_few(unknown)}")
    if problems:
        parts.append(f"{len(problems)} problems: {_few(problems)}")
    if parts:
        raise InputError(f"LoRA {path.name} does not fit the model: " + "; ".join(parts))


def _family_hint(keys: list[str]) -> str:
    if any(key.startswith(("lora_te", "text_encoder")) for key in keys):
        return " (text-encoder LoRA weights are not supported: only the transformer's)"
    for family, markers in _FAMILY_MARKERS.items():
        if any(marker in key for key in keys for marker in markers):
            return f" (the keys look like a {family} LoRA)"
    return ""


def _alpha_factor(handle, t: _Target, name: str, config: dict | None) -> float:
    """alpha / rank for one layer: the file's alpha scalar, else the PEFT config, else 1."""
    rank = _shape(handle, t.down)[0]
    if t.alpha is not None:
        return float(handle.get_tensor(t.alpha).float().reshape(())) / rank
    if config is None:
        return 1.0
    r = _pattern(config.get("rank_pattern"), name, config.get("r", rank))
    alpha = _pattern(config.get("alpha_pattern"), name, config.get("lora_alpha", r))
    if r != rank:
        raise InputError(f"LoRA layer {name} has rank {rank} but the file's adapter config says {r}")
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def _pattern(patterns: dict | None, name: str, default: float) -> float:
    """PEFT's rank/alpha_pattern lookup: a key matches when it is a dotted suffix (regex) of the layer name."""
    for key, value in (patterns or {}).items():
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        except re.error:
            raise IntegrityError(f"LoRA adapter config pattern {key!r} is not a valid regular expression") from None
    return default


def _check_values(handle, targets: dict[str, _Target], path: Path) -> None:
    """Read every tensor once before merging, so a NaN/Inf LoRA leaves the model untouched."""
    for t in targets.values():
        for key in t.keys:
            tensor = handle.get_tensor(key)
            if not tensor.is_floating_point():
                raise IntegrityError(f"LoRA {path.name}: {key} has dtype {tensor.dtype}, expected a float type")
            if not bool(torch.isfinite(tensor).all()):
                raise IntegrityError(f"LoRA {path.name}: {key} contains NaN or Inf")


@torch.no_grad()
def _merge_one(linear: nn.Linear, handle, t: _Target, factor: float) -> None:
    weight = linear.weight
    down = handle.get_tensor(t.down).to(weight.device, torch.float32)  # (r, in)
    up = handle.get_tensor(t.up).to(weight.device, torch.float32)  # (out, r)
    weight.copy_((weight.float() + (up @ down) * factor).to(weight.dtype))  # (out, in)
    if t.up_bias is not None:
        bias = handle.get_tensor(t.up_bias).to(weight.device, torch.float32)  # (out,)
        linear.bias.copy_((linear.bias.float() + bias * factor).to(linear.bias.dtype))


def _few(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... (+{len(items) - n} more)" if len(items) > n else "")
