"""Exporters: a checkpoint -> a bundle of per-component models (see docs/bundle.md).

``qwen_edge.export.onnx.export_bundle`` is the ONNX exporter (the ``qwen-edge export`` command);
:class:`qwen_edge.export.bundle_writer.BundleWriter` writes any bundle atomically. Importing this package
imports neither torch nor onnx: the names below load their module on first use.
"""

from __future__ import annotations

_LAZY = {"export_bundle": "onnx", "BundleWriter": "bundle_writer"}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
