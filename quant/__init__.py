"""Quantization of exported components: ``quantize(component, src, dst, recipe, calibration)``.

The ONNX exporter writes each component in fp32 and then calls :func:`quantize`; the returned facts go
into the bundle manifest. Recipes (see :mod:`qwen_edge.quant.recipes`) are ONNX Runtime's own tools:
``fp16``, ``int8``, ``w8a32`` (weight-only int8), ``int4``, ``w8a16`` (the QNN NPU path) and ``mixed`` (per-layer sensitivity,
:mod:`qwen_edge.quant.sensitivity`). Calibration feeds come from :func:`qwen_edge.quant.calibrate.record`,
the torch pipeline's real inputs to each component along the sampler's trajectory.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
from qwen_edge.errors import InputError, IntegrityError

RECIPES = ("fp16", "int8", "w8a32", "int4", "w8a16", "mixed")
NEEDS_CALIBRATION = ("w8a16", "mixed")
EVAL_FEEDS = 4  # calibration feeds the returned fidelity figure is measured on


def quantize(component: str, src: Path, dst: Path, recipe: str,
             calibration: list[dict[str, np.ndarray]] | None = None, *, block_size: int | None = None,
             target_psnr: float = 35.0, reduce_range: bool = False, activations: str = "token") -> dict:
    """Quantize the fp32 ONNX model ``src`` of ``component`` with ``recipe`` into ``dst``.

    ``calibration``: feeds recorded by :func:`qwen_edge.quant.calibrate.record` for this component
    (required by ``w8a16`` and ``mixed``; ``int8`` uses them for static convolutions). ``block_size``:
    int4 / w8a32 block (32, 64 or 128; None: per weight the largest of 64 and 32 dividing its K,
    :func:`qwen_edge.quant.recipes.block_for`); ``target_psnr``: the ``mixed`` recipe's goal in dB;
    ``activations``: ``int8``'s activation grid, ``"token"`` (per row, :mod:`qwen_edge.quant.per_token`) or
    ``"tensor"``. Returns the facts for the manifest: recipe, tool versions, what was quantized how, op counts,
    bytes before/after, the files written (``dst`` and any external data) and, with calibration, ``psnr_db``: the
    output PSNR vs fp32 on up to :data:`EVAL_FEEDS` feeds (worst feed, peak = the largest fp32 magnitude, as the
    exporter's parity gate). An existing ``dst`` is replaced; on failure nothing is left at ``dst``.
    """
    import onnxruntime as ort

    from . import recipes, sensitivity

    src, dst = Path(src), Path(dst)
    _check(component, src, dst, recipe, calibration)
    opts = recipes.Options(block_size=block_size, target_psnr=target_psnr, reduce_range=reduce_range,
                           activations=activations)
    _remove(dst)  # onnx appends external data to an existing file: start from nothing
    run = sensitivity.mixed if recipe == "mixed" else getattr(recipes, recipe)
    try:
        facts = run(component, src, dst, calibration, opts)
        result = {"recipe": recipe, "component": component, "tool": f"onnxruntime {ort.__version__}", **facts,
                  **_sizes(src, dst), "ops": _quant_ops(dst)}
        if calibration and "psnr_db" not in result:
            result["psnr_db"] = sensitivity.psnr_of(src, dst, calibration[:EVAL_FEEDS])
    except BaseException:
        _remove(dst)
        raise
    return result


def _check(component: str, src: Path, dst: Path, recipe: str, calibration) -> None:
    from .recipes import COMPONENTS

    if recipe not in RECIPES:
        raise InputError(f"unknown quantization recipe {recipe!r}; known: fp32 (none), {', '.join(RECIPES)}")
    if component not in COMPONENTS:
        raise InputError(f"unknown component {component!r}; known: {', '.join(COMPONENTS)}")
    if not src.is_file():
        raise IntegrityError(f"{src} does not exist")
    _readable(src)
    if src.resolve() == dst.resolve():
        raise InputError(f"quantize would overwrite its source {src}; write to another file")
    if not dst.parent.is_dir():
        raise InputError(f"output folder {dst.parent} does not exist")
    if recipe in NEEDS_CALIBRATION and not calibration:
        raise InputError(f"the {recipe} recipe needs calibration feeds (qwen_edge.quant.calibrate.record)")


def _readable(path: Path) -> None:
    """Refuse a file that is not an ONNX model (its graph parses; external data is not read)."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError) as e:
        raise IntegrityError(f"{path} is not a readable ONNX model ({e})") from None


def _sizes(src: Path, dst: Path) -> dict:
    from .recipes import files_of, model_bytes

    before, after = model_bytes(src), model_bytes(dst)
    return {"bytes": {"fp32": before, "quantized": after}, "size_ratio": round(after / before, 4),
            "files": [f.name for f in files_of(dst)]}


def _quant_ops(dst: Path) -> dict[str, int]:
    """Counts of the quantized op types in the result (what actually runs in integer or reduced precision)."""
    from .recipes import op_counts

    keep = ("MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear",
            "MatMulNBits", "GatherBlockQuantized", "ConvInteger", "QLinearConv", "QLinearMatMul", "Cast")
    return {op: n for op, n in sorted(op_counts(dst).items()) if op in keep or op in ("MatMul", "Gemm", "Conv")}


def _remove(dst: Path) -> None:
    """Delete ``dst``, the external data files of its own it references (named after it: a file other graphs
    share, such as a bundle's ``shared_weights.data``, stays) and the data file a recipe would write next to it."""
    from google.protobuf.message import DecodeError

    from .recipes import files_of

    extra = [dst.with_name(dst.name + ".data")]
    if dst.exists():
        with contextlib.suppress(DecodeError, OSError, ValueError, IntegrityError):  # half-written: drop what we can
            extra += [f for f in files_of(dst)[1:] if f.name.startswith(dst.name)]
    for f in [dst, *extra]:
        f.unlink(missing_ok=True)
