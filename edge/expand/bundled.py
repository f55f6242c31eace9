"""The LLM expander a bundle may carry (``qwen-edge export --expander-llm``): its folder, checked.

The manifest's optional ``expander`` section names the folder (``expander/``, the layout
:class:`qwen_edge.expand.LLMExpander` loads) and hashes every file in it. Torch-free, onnxruntime-free.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from .. import bundle as bundle_mod
from ..errors import IntegrityError


def bundled_expander(root, verify: bool = True) -> Path | None:
    """The folder of the expander inside the bundle at ``root``, or None when it has none. With ``verify``,
    every file of the folder is checked against its sha256 first (as :func:`qwen_edge.bundle.load` does for
    the graphs)."""
    root = Path(root)
    section = bundle_mod.read_manifest(root).expander
    if not section:
        return None
    folder = bundle_mod.check_relative(section.get("folder"), "expander.folder")
    files = section["files"]
    if f"{folder}/config.json" not in files or section.get("file") not in files:
        raise IntegrityError(f"{bundle_mod.MANIFEST}: the expander's config.json and model are not among its "
                             "hashed files")
    for rel in files:
        if PurePosixPath(rel).parts[0] != folder:
            raise IntegrityError(f"{bundle_mod.MANIFEST}: expander file {rel!r} is outside {folder}/")
        bundle_mod.inside(root, rel, "expander file")
    path = bundle_mod.inside(root, folder, "expander.folder")
    if verify:
        bundle_mod.verify_files(root, files)
        base = root.resolve()
        unlisted = sorted(rel for rel in (p.relative_to(base).as_posix() for p in path.rglob("*") if p.is_file())
                          if rel not in files)
        if unlisted:  # the expander reads whatever its folder holds (a chat template, say): all of it is hashed
            raise IntegrityError(f"bundle file {unlisted[0]} is not listed in {bundle_mod.MANIFEST} (added after "
                                 "export?)")
    return path
