"""Optional parts of a bundle: conformance vectors, ORT-format models, the LLM prompt expander.

``qwen-edge export --test-vectors --ort-format --expander-llm DIR`` adds them while exporting
(:func:`add_extras`); :func:`augment_bundle` adds them to a bundle exported earlier, without exporting its graphs
again: the bundle is copied into a new temporary bundle (hard links where the file system allows), extended and
swapped in atomically, as an export is.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from qwen_edge import bundle as bundle_mod

from .bundle_writer import BundleWriter


def add_extras(writer: BundleWriter, manifest: bundle_mod.Manifest, torch_components=None, *,
               test_vectors: bool = False, vector_prompt: str | None = None, vector_seed: int = 0,
               ort_format: bool = False, expander_llm=None,
               log: Callable[[str], None] | None = None) -> bundle_mod.Manifest:
    """Add the requested parts to the bundle being written; vectors last (their id covers the graphs only, but
    they are recorded from the finished bundle). ``torch_components``: the checkpoint's, for the vectors."""
    if expander_llm is not None:
        from .expander import add_expander

        manifest = add_expander(writer, manifest, expander_llm, log)
    if ort_format:
        from .ort_format import add_ort_format

        manifest = add_ort_format(writer, manifest, log)
    if test_vectors:
        from .vectors import DEFAULT_PROMPT, add_vectors

        prompt = DEFAULT_PROMPT if vector_prompt is None else vector_prompt
        manifest = add_vectors(writer, manifest, torch_components, prompt, vector_seed, log)
    return manifest


def augment_bundle(bundle, *, model=None, test_vectors: bool = False, vector_prompt: str | None = None,
                   vector_seed: int = 0, ort_format: bool = False, expander_llm=None,
                   log: Callable[[str], None] | None = None) -> bundle_mod.Manifest:
    """Add vectors / ORT-format models / the expander to the existing bundle at ``bundle`` (verified first),
    replacing any it had. ``model``: the checkpoint it was exported from, for the vectors' torch reference
    (default: the one its manifest names). Returns the new manifest."""
    src = bundle_mod.load(bundle)
    replaced = {"vectors": test_vectors, "ort": ort_format, "expander": expander_llm is not None}
    torch_components = None
    if test_vectors:
        from qwen_edge.conform import source_checkpoint
        from qwen_edge.runtimes.torch import TorchComponents

        from .vectors import DEFAULT_PROMPT, check_request

        check_request(DEFAULT_PROMPT if vector_prompt is None else vector_prompt, vector_seed)
        torch_components = TorchComponents(source_checkpoint(src.manifest, model))
    with BundleWriter(src.root) as writer:
        keep = dict(src.manifest.files())
        for key, section in src.manifest.extras().items():
            if not replaced[key]:
                keep.update(section["files"])
        for rel in keep:
            _link_or_copy(src.path(rel), writer.path(rel))
        manifest = src.manifest
        for key, drop in replaced.items():
            if drop:
                manifest = _without(manifest, key)
        manifest = add_extras(writer, manifest, torch_components, test_vectors=test_vectors,
                              vector_prompt=vector_prompt, vector_seed=vector_seed, ort_format=ort_format,
                              expander_llm=expander_llm, log=log)
        writer.commit(manifest)
    return manifest


def _without(manifest: bundle_mod.Manifest, key: str) -> bundle_mod.Manifest:
    import dataclasses

    return dataclasses.replace(manifest, **{key: {}})


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)
