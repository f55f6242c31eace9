"""Loading diffusers-format checkpoints: resolve, stream safetensors, map keys, load strictly.

A component is built on the meta device, then every tensor is streamed out of its (possibly sharded)
safetensors files, renamed/reshaped by the component's own ``sanitize`` key map, and assigned. Nothing
is unpickled: safetensors and JSON only. Any missing, unexpected or mis-shaped key ends in one
:class:`InputError` that lists them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import InputError, IntegrityError
from .jsonfile import read_json  # noqa: F401  (re-exported: components import it from here)

# (name, tensor) -> zero or more (new_name, new_tensor): a component's declarative key map.
Sanitize = Callable[[str, Tensor], Iterable[tuple[str, Tensor]]]


def identity(name: str, tensor: Tensor) -> Iterable[tuple[str, Tensor]]:
    return ((name, tensor),)


def resolve(model: str | Path) -> Path:
    """A local directory, or a Hugging Face repo id resolved from the local cache only (never a download)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise InputError(f"model path {path} is a file; give the checkpoint directory (with model_index.json)")
    if str(model).count("/") == 1 and not str(model).startswith((".", "/", "~")):
        import os

        from huggingface_hub import snapshot_download

        try:  # the cache folder is read at call time so HF_HUB_CACHE set by the caller is honoured
            return Path(snapshot_download(str(model), local_files_only=True,
                                          cache_dir=os.environ.get("HF_HUB_CACHE") or None))
        except Exception as e:  # huggingface_hub raises several types for "not in the cache"
            raise InputError(f"{model} is not in the local Hugging Face cache ({type(e).__name__}); "
                             "download it first or pass a directory") from None
    raise InputError(f"model directory {path} does not exist")


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of one component folder: sharded (``*.safetensors.index.json``) or single."""
    folder = Path(folder)
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        index = read_json(indexes[0])
        names = sorted(set((index.get("weight_map") or {}).values()))
        if not names:
            raise IntegrityError(f"{indexes[0]} has an empty weight_map")
        files = [folder / n for n in names]
        for name, f in zip(names, files):
            if Path(name).name != name:
                raise IntegrityError(f"shard name {name!r} in {indexes[0].name} leaves the folder")
            if not f.is_file():
                raise IntegrityError(f"shard {f} listed in {indexes[0].name} is missing")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
        hint = f" (found {', '.join(pickles)}: pickle checkpoints are never loaded; convert to safetensors)" if pickles else ""
        raise IntegrityError(f"no .safetensors weights in {folder}{hint}")
    return files


def iter_tensors(files: Iterable[Path]) -> Iterator[tuple[str, Tensor]]:
    """Stream (name, tensor) pairs from safetensors files, memory-mapped, one tensor at a time."""
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)
        except (InputError, IntegrityError):
            raise
        except Exception as e:  # safetensors raises its own SafetensorError, OSError, ValueError...
            raise IntegrityError(f"cannot read {f}: {type(e).__name__}: {e}".splitlines()[0]) from None


def load_state(module: nn.Module, tensors: Iterable[tuple[str, Tensor]], sanitize: Sanitize = identity,
               dtype: torch.dtype = torch.float32, what: str = "checkpoint") -> nn.Module:
    """Assign streamed tensors into a (meta-device) module, strictly.

    Floating-point tensors are cast to ``dtype``. Missing, unexpected and mis-shaped keys are collected
    and reported together in one InputError.
    """
    expected = {k: v.shape for k, v in module.state_dict().items()}
    state: dict[str, Tensor] = {}
    unexpected, wrong_shape = [], []
    for name, tensor in tensors:
        for key, value in sanitize(name, tensor):
            if key not in expected:
                unexpected.append(key)
                continue
            if tuple(value.shape) != tuple(expected[key]):
                wrong_shape.append(f"{key} {tuple(value.shape)} != {tuple(expected[key])}")
                continue
            state[key] = value.to(dtype) if value.is_floating_point() else value
    missing = sorted(set(expected) - set(state))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys: {_few(sorted(unexpected))}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} mis-shaped: {_few(wrong_shape)}")
    if problems:
        raise InputError(f"{what} does not match the model: " + "; ".join(problems))
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def load_component(build: Callable[[], nn.Module], folder: Path, sanitize: Sanitize = identity,
                   dtype: torch.dtype = torch.float32) -> nn.Module:
    """Build a component on the meta device and fill it from the safetensors in ``folder``."""
    with torch.device("meta"):
        module = build()
    return load_state(module, iter_tensors(weight_files(folder)), sanitize, dtype, what=str(folder))


def _few(items: list[str], n: int = 6) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... (+{len(items) - n} more)" if len(items) > n else "")
