"""The embedded default's procedural world: prompts with exact ground truth, their rendered images,
and a pixel-only judge of prompt fidelity. NumPy and Pillow only (no torch), so the torch-free
runtime and ``verify`` can use it.

    scene = sample_scene(np.random.default_rng(0))
    image, text = render(scene), caption(scene)      # (128, 128, 3) uint8, "a red circle above ..."
    evaluate(image, text).ok                         # True
"""

from .draw import render
from .judge import ATTRIBUTES, Result, detect, evaluate, evaluate_many, summarize
from .prompt import caption, parse_prompt, prompts, scene_from_prompt, split_of
from .scene import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZE,
    SIZES,
    Obj,
    ObjSpec,
    Scene,
    Spec,
    place,
    sample_scene,
    sample_spec,
)

__all__ = [
    "ATTRIBUTES",
    "BACKGROUNDS",
    "COLORS",
    "POSITIONS",
    "RELATIONS",
    "SHAPES",
    "SIZE",
    "SIZES",
    "Obj",
    "ObjSpec",
    "Result",
    "Scene",
    "Spec",
    "caption",
    "detect",
    "evaluate",
    "evaluate_many",
    "parse_prompt",
    "place",
    "prompts",
    "render",
    "sample_scene",
    "sample_spec",
    "scene_from_prompt",
    "split_of",
    "summarize",
]
