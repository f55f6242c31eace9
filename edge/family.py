"""The two Qwen-Image families and what differs between them outside the networks.

NumPy-free and torch-free: the device runtime reads a bundle's family from its manifest and needs these
facts (latent layout, VAE factor, size rules) without importing any model code.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError


@dataclass(frozen=True)
class Family:
    name: str  # the name used on the command line and in bundle manifests
    pipeline_class: str  # diffusers' `_class_name` in model_index.json
    vae_factor: int  # pixels per latent cell along one side
    patch: int  # latent cells per transformer token along one side (2.x: 1, v1: 2x2 packing)
    latent_layout: str  # how unpacked latents (1, C, h, w) become tokens (1, N, C*patch^2)

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this (the pipelines floor to it; qwen-edge refuses)."""
        # 2.1 floors to vae_factor * 2 = 32 even though its patch is 1 (pipeline_qwenimage21.check_inputs);
        # v1 floors to vae_factor * patch = 16.
        return self.vae_factor * 2


QWEN_IMAGE_21 = Family("qwen-image-2.1", "QwenImage21Pipeline", vae_factor=16, patch=1,
                       latent_layout="tokens: (1,C,h,w) -> flatten(2).transpose(1,2) -> (1,h*w,C)")
QWEN_IMAGE = Family("qwen-image", "QwenImagePipeline", vae_factor=8, patch=2,
                    latent_layout="patch2x2: (1,C,h,w) -> (1,(h/2)(w/2),C*4), channel = c*4 + dy*2 + dx")

FAMILIES = {f.name: f for f in (QWEN_IMAGE_21, QWEN_IMAGE)}
_BY_PIPELINE = {f.pipeline_class: f for f in FAMILIES.values()}


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise InputError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def family_of_pipeline(class_name: str) -> Family:
    """The family of a diffusers checkpoint from its model_index.json `_class_name`."""
    if class_name in _BY_PIPELINE:
        return _BY_PIPELINE[class_name]
    # Turbo / modular checkpoints name variants of the same pipeline.
    for known, fam in _BY_PIPELINE.items():
        if class_name.startswith(known):
            return fam
    raise InputError(f"unknown model family: model_index.json names pipeline {class_name!r}; "
                     f"qwen-edge knows {', '.join(_BY_PIPELINE)}")
