"""iOS 18 Core ML bundles: 2.1's text_kv and transformer in one multifunction package, their common weights once.

2.1 runs the text and the image tokens through the same blocks, so as two packages ``text_kv`` stores nearly every
block weight of ``transformer`` again: 0.85 MB of the embedded default's 3.5 MB of fp16 weights, and a whole
7B transformer's worth on a real checkpoint. Core ML shares weights only between the functions of one package,
which needs iOS 18 / macOS 15 (``MLModelConfiguration.functionName``): with ``--ios18`` each text_kv package goes
into the transformer package covering the same blocks as a second function, :data:`FUNCTION`, through
coremltools' own ``MultiFunctionDescriptor`` / ``save_multifunction`` (it stores identical weights once). The
transformer stays the package's default function ``main``; the manifest's text_kv chunks name the merged package
and carry ``"function": "text_kv"``. Each merged function is gated against the package it came from (already
gated against torch), run by the MIL interpreter on the same inputs. iOS 17 programs cannot hold functions: those
bundles keep two packages.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from qwen_edge import bundle as bundle_mod
from qwen_edge import iospec
from qwen_edge.errors import NumericalError

FUNCTION = "text_kv"  # the text_kv function's name in the merged package; the transformer is "main"
MERGE_GATE_DB = 60.0  # the same program in another container: anything lower means the merge changed it


def share_blocks(root: Path, entries: dict[str, bundle_mod.Component], work: Path,
                 log: Callable[[str], None]) -> dict[str, bundle_mod.Component]:
    """Merge each text_kv package into the transformer package of the same blocks (see the module docstring);
    return the entries with text_kv's chunks pointing at the merged packages and both components' files
    re-hashed. Entries without both components, or chunks covering other blocks, are left as they are."""
    kv, tr = entries.get("text_kv"), entries.get("transformer")
    if kv is None or tr is None:
        return entries
    pairs = [(k, t) for k, t in zip(kv.chunks, tr.chunks) if k["blocks"] == t["blocks"]]
    if not pairs:
        return entries
    for k, t in pairs:
        merge(root / _folder(t), root / _folder(k), iospec.IOSpec.from_json("transformer", t),
              iospec.IOSpec.from_json("text_kv", k), work)
    moved = {k["file"]: t["file"] for k, t in pairs}
    chunks = tuple({**k, "file": moved[k["file"]], "function": FUNCTION} if k["file"] in moved else k
                   for k in kv.chunks)
    log(f"  text_kv: {len(pairs)} package(s) merged into the transformer's as function {FUNCTION!r} "
        "(shared weights stored once)")
    return {**entries, "text_kv": _rehashed(root, dataclasses.replace(kv, chunks=chunks, file=chunks[0]["file"])),
            "transformer": _rehashed(root, tr)}


def merge(main: Path, other: Path, main_io: iospec.IOSpec, other_io: iospec.IOSpec, work: Path) -> None:
    """Replace package ``main`` with a multifunction package: its own program as ``main`` and ``other``'s as
    :data:`FUNCTION`; ``other`` is removed. NumericalError if either function computes otherwise than before."""
    from .coreml import DEBUG_FILES, _quiet, coremltools

    ct = coremltools()
    desc = ct.utils.MultiFunctionDescriptor()
    desc.add_function(str(main), src_function_name="main", target_function_name="main")
    desc.add_function(str(other), src_function_name="main", target_function_name=FUNCTION)
    desc.default_function_name = "main"
    merged = Path(work) / f"merged-{main.name}"
    with _quiet():
        ct.utils.save_multifunction(desc, str(merged))
    for name in DEBUG_FILES:
        (merged / name).unlink(missing_ok=True)
    _check(merged, "main", main, main_io)
    _check(merged, FUNCTION, other, other_io)
    shutil.rmtree(main)
    shutil.rmtree(other)
    shutil.move(str(merged), str(main))


def _check(merged: Path, function: str, source: Path, io: iospec.IOSpec) -> None:
    """The merged package's ``function`` against the package it came from, on seeded inputs of ``io``."""
    from qwen_edge.runtimes.mil import Program

    from .coreml import fidelity

    rng = np.random.default_rng(0)
    feed = {t.name: (np.zeros(t.shape, np.int32) if t.dtype.startswith("int")
                     else rng.standard_normal(t.shape).astype(np.float32)) for t in io.inputs}
    want, got = Program.load(source).run(feed), Program.load(merged, function).run(feed)
    worst = min(fidelity(want[k], got[k])["psnr_db"] for k in want)
    if not worst >= MERGE_GATE_DB:
        raise NumericalError(f"{io.component}: merging {source.name} into a multifunction package changed what it "
                             f"computes ({worst:.1f} dB against the package alone); no bundle was written")


def _folder(chunk) -> str:
    """The package folder of a chunk entry (its ``file`` is the package's Manifest.json)."""
    return str(Path(chunk["file"]).parent)


def _rehashed(root: Path, entry: bundle_mod.Component) -> bundle_mod.Component:
    """``entry`` listing every file of the packages its chunks name, hashed now."""
    files = {}
    for folder in dict.fromkeys(_folder(c) for c in entry.chunks):
        for f in sorted(p for p in (root / folder).rglob("*") if p.is_file()):
            files[f.relative_to(root).as_posix()] = bundle_mod.sha256_file(f)
    return dataclasses.replace(entry, files=files)

