"""ORT-format copies of a bundle's graphs for ONNX Runtime Mobile (``qwen-edge export --ort-format``).

Each component's ``.onnx`` is loaded once by ONNX Runtime, optimised, and saved as ``<component>.ort`` (the
flatbuffer format a minimal mobile build loads); ``required_operators.config`` lists every operator they use,
for a build with only those kernels (``build.sh --minimal_build --include_ops_by_config``). This is what
``python -m onnxruntime.tools.convert_onnx_models_to_ort`` does, with its settings for an ARM device (NCHWc
layouts, x86-only, are not applied; int8 QDQ may fuse to int8 kernels), written into the bundle and hashed in
the manifest's ``ort`` section. The ``qnn`` target keeps basic optimisations only, so the QDQ node units the QNN
execution provider takes stay as they are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
from collections.abc import Callable

from qwen_edge import bundle as bundle_mod
from qwen_edge.errors import InputError, UsageError, require

from .bundle_writer import BundleWriter

CONFIG = "required_operators.config"
ORT_FORMAT_LIMIT = 2**31 - 1  # bytes: an ORT-format model is one flatbuffer, inline weights included
DISABLED = ["NchwcTransformer"]  # x86 blocked layouts: not on ARM (the converter drops it unless told amd64)


def add_ort_format(writer: BundleWriter, manifest: bundle_mod.Manifest,
                   log: Callable[[str], None] | None = None) -> bundle_mod.Manifest:
    """Write ``<component>.ort`` for every graph of the bundle being written and the reduced-operator config;
    return ``manifest`` with its ``ort`` section."""
    log = log or (lambda msg: None)
    ort = require("onnxruntime", "onnx")
    level_name = "basic" if manifest.target == "qnn" else "all"
    level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
             "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level_name]
    models = {}
    for name, comp in manifest.components.items():
        if comp.format != "onnx":
            raise UsageError(f"--ort-format converts ONNX graphs; {name} is {comp.format}")
        src = writer.path(comp.file)
        # External data alone is fine (2.1's text_kv and transformer share theirs): the limit is the size.
        weights = sum(writer.path(f).stat().st_size for f in bundle_mod.external_data_files(src))
        if weights + src.stat().st_size > ORT_FORMAT_LIMIT:
            raise InputError(f"--ort-format: {name} keeps {weights / 2**30:.1f} GB of weights in external data; an "
                             "ORT-format model holds them inline and must stay under 2 GB: quantize it (--quant int8 "
                             "or int4) or export without --ort-format")
        models[name] = f"{name}.ort"
        _convert(ort, src, writer.path(models[name]), level)
    _config(writer, list(models.values()))
    log(f"  ORT format: {', '.join(models.values())} and {CONFIG} (optimisation level {level_name})")
    section = {"models": models, "required_operators": CONFIG,
               "optimization": {"style": "fixed", "level": level_name, "disabled_optimizers": DISABLED,
                                "qdq_is_int8_allowed": True},
               "written_by": f"onnxruntime {ort.__version__}",  # load with an ONNX Runtime at least this new
               "files": writer.hashes([*models.values(), CONFIG])}
    return dataclasses.replace(manifest, ort=section)


def _convert(ort, src, dst, level) -> None:
    """As ``convert_onnx_models_to_ort`` (style Fixed, target ARM): optimise, save in ORT format."""
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    so.add_session_config_entry("session.save_model_format", "ORT")
    so.add_session_config_entry("session.qdqisint8allowed", "1")  # the converter's setting for target "arm"
    try:
        ort.InferenceSession(str(src), sess_options=so, providers=["CPUExecutionProvider"],
                             disabled_optimizers=DISABLED)
    except Exception as e:  # ORT raises its own Fail/InvalidGraph types
        raise InputError(f"{src.name} cannot be saved in ORT format: {e}".splitlines()[0]) from None


def _config(writer: BundleWriter, rels: list[str]) -> None:
    """``required_operators.config`` of the ORT models, naming them by their bundle paths."""
    from qwen_edge.quant.recipes import root_logger_kept

    with root_logger_kept():
        from onnxruntime.tools.ort_format_model import create_config_from_models
    logger = logging.getLogger("ort_format_model.utils")
    level = logger.level
    logger.setLevel(logging.WARNING)  # it logs "Created config in ..." at INFO
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            create_config_from_models([writer.path(r) for r in rels], writer.path(CONFIG), False)
    finally:
        logger.setLevel(level)
    lines = writer.path(CONFIG).read_text(encoding="utf-8").splitlines()
    names = iter(sorted(rels))  # the header lists the models sorted by path, as given
    lines = [f"# - {next(names)}" if line.startswith("# - ") else line for line in lines]
    writer.path(CONFIG).write_text("\n".join(lines) + "\n", encoding="utf-8")
