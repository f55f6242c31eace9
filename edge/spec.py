"""What a pipeline needs to know about a checkpoint (or a bundle), read from its JSON files only (no torch).

A diffusers directory: ``model_index.json`` names the pipeline (and so the family) and, for Turbo
checkpoints, ``sample_sigmas``; ``scheduler/scheduler_config.json`` the schedule; ``vae/config.json``
the latent channels; ``tokenizer/`` (v1) or ``processor/`` (2.1) the tokenizer files. A bundle's
``manifest.json`` records the same facts (:meth:`ModelSpec.from_bundle`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import prompt as prompt_mod
from .errors import IntegrityError
from .family import Family, family_of_pipeline
from .schedule import FAMILY_DEFAULTS, SchedulerConfig


@dataclass(frozen=True)
class ModelSpec:
    root: Path
    family: Family
    scheduler: SchedulerConfig
    sample_sigmas: tuple[float, ...] | None
    z_channels: int
    template: prompt_mod.PromptTemplate
    tokenizer_dir: Path
    default_size: int
    fixed_size: tuple[int, int] | None = None  # (height, width) a bundle's static graphs were exported for
    default_width: int | None = None  # a dynamic bundle's export width (default_size is its height)

    @property
    def cfg_rescale(self) -> bool:
        """v1's true CFG rescales the guided prediction to the conditional one's norm; 2.1 does not."""
        return FAMILY_DEFAULTS[self.family.name].cfg_rescale

    def component(self, name: str) -> Path:
        folder = self.root / name
        if not folder.is_dir():
            raise IntegrityError(f"checkpoint {self.root} has no {name}/ folder")
        return folder

    @property
    def size(self) -> tuple[int, int]:
        """The (height, width) a request gets when it names none: a static bundle's size, a dynamic bundle's
        export size, a checkpoint's square default."""
        return self.fixed_size or (self.default_size, self.default_width or self.default_size)

    @classmethod
    def from_checkpoint(cls, model) -> ModelSpec:
        from .errors import require

        require("torch", "torch")  # .checkpoint imports torch: only checkpoints need it, bundles do not
        from .checkpoint import read_json, resolve

        root = resolve(model)
        index = read_json(root / "model_index.json")
        fam = family_of_pipeline(str(index.get("_class_name", "")))
        sched = SchedulerConfig.from_diffusers(read_json(root / "scheduler" / "scheduler_config.json"))
        vae = read_json(root / "vae" / "config.json")
        tok_dir = next((root / d for d in ("tokenizer", "processor") if (root / d).is_dir()), None)
        if tok_dir is None:
            raise IntegrityError(f"checkpoint {root} has neither tokenizer/ nor processor/")
        sample = index.get("sample_sigmas")
        return cls(
            root=root,
            family=fam,
            scheduler=sched,
            sample_sigmas=tuple(float(s) for s in sample) if sample else None,
            z_channels=int(vae["z_dim"]),
            template=prompt_mod.template_for(fam.name, tok_dir),
            tokenizer_dir=tok_dir,
            default_size=_default_size(root),
        )


    @classmethod
    def from_bundle(cls, manifest, root) -> ModelSpec:
        """The spec of an exported bundle (a :class:`qwen_edge.bundle.Manifest` and its directory): the same
        schedule, template and tokenizer as the checkpoint it came from, at the bundle's static size (a dynamic
        bundle: any size on the patch grid, its export size by default)."""
        from .family import family

        m, root = manifest, Path(root)
        tok = m.tokenizer
        return cls(
            root=root,
            family=family(m.family),
            scheduler=SchedulerConfig.from_diffusers(dict(m.sampler.scheduler)),
            sample_sigmas=m.sampler.sample_sigmas,
            z_channels=m.dims.z_channels,
            template=prompt_mod.PromptTemplate(m.family, tok.template, tok.drop, tok.max_length),
            tokenizer_dir=(root / tok.file).parent,
            default_size=m.height,
            fixed_size=None if m.dynamic else (m.height, m.width),
            default_width=m.width,
        )


def _default_size(root: Path) -> int:
    """Both pipelines default to 1024x1024; qwen-edge's own small checkpoints state theirs in qwen_edge.json
    (a sidecar diffusers ignores)."""
    from .checkpoint import read_json

    extra = root / "qwen_edge.json"
    return int(read_json(extra).get("default_size", 1024)) if extra.is_file() else 1024


def default_model() -> Path:
    """The embedded default checkpoint shipped inside the package."""
    path = Path(__file__).parent / "assets" / "default"
    if not (path / "model_index.json").is_file():
        raise IntegrityError(f"the embedded default model is missing from {path}; reinstall qwen-edge")
    return path
