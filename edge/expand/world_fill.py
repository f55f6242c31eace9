"""The embedded default's world: fill what a prompt of the world leaves unsaid, in the world's grammar.

The default model was trained on captions of :mod:`qwen_edge.world`, which state every object's colour and
shape and often its size, position and background. A terse prompt ("a circle", "something red") leaves
those open; the template expander draws them from the seed with the world's own frequencies and writes the
result back through :func:`qwen_edge.world.caption`, so the expanded prompt is a caption the model has seen
the like of, and its image can be judged against exactly what the expansion states.
"""

from __future__ import annotations

import re

import numpy as np

from .. import world
from ..errors import InputError
from .base import Expansion

# Words a terse prompt uses for "an object of some shape": read as the world's shapeless "object".
_VAGUE = {"something", "anything", "thing", "shape", "object"}
_PLAIN = re.compile(r"[A-Za-z\s.,;:!?-]+")
_FILLERS = {"a", "an", "the", "and"}
_ADJECTIVES = {*world.COLORS, *world.SIZES, "grey"}
# The world's frequencies (see world.scene.sample_spec): small / large a quarter each, else unstated, which
# the world draws as medium; backgrounds white half the time, black and gray a quarter each.
_SIZE_P = {"small": 0.25, "large": 0.25, None: 0.5}
_BACKGROUND_P = {"white": 0.5, "black": 0.25, "gray": 0.25}


def world_spec(prompt: str) -> world.Spec | None:
    """The prompt's :class:`~qwen_edge.world.Spec` when every word belongs to the world's grammar (vague
    nouns like "something" allowed) and it describes a scene the world can draw; otherwise None."""
    # The parser skips what is not a Latin word (digits, quotes, Chinese): those are not the world's words.
    if not _PLAIN.fullmatch(prompt) or not set(re.findall(r"[a-z]+", prompt.lower())) - _FILLERS:
        return None
    spec = world.parse_prompt(_unvague(prompt))
    if spec.unknown:
        return None
    # A stated relation implies two objects, anything else at least one; missing ones are filled in.
    wanted = 2 if spec.relation else max(1, len(spec.objects))
    objects = spec.objects + (world.ObjSpec(),) * (wanted - len(spec.objects))
    spec = world.Spec(objects, spec.position, spec.relation, spec.background)
    try:
        spec.check()
    except InputError:  # e.g. three objects, or a position for two: not the world's, rewrite it generally
        return None
    return spec


def _unvague(prompt: str) -> str:
    """'something red' -> 'red object': the world's parser reads adjectives before the noun."""
    tokens = re.findall(r"[a-z]+", prompt.lower())
    out: list[str] = []
    i = 0
    while i < len(tokens):
        if tokens[i] in _VAGUE:
            j = i + 1
            while j < len(tokens) and tokens[j] in _ADJECTIVES:
                j += 1
            out += [*tokens[i + 1 : j], "object"]
            i = j
        else:
            out.append(tokens[i])
            i += 1
    return " ".join(out)


def fill(spec: world.Spec, seed: int) -> Expansion:
    """Fill every unstated colour, shape, size, position (one object) or relation (two), and background.

    All draws happen whatever is stated, in a fixed order, so one seed gives "a circle" and "a red circle"
    the same size, place and background.
    """
    rng = np.random.default_rng(seed)
    drawn = [_draw_object(rng) for _ in spec.objects]
    position = _choice(rng, world.POSITIONS)
    relation = _choice(rng, world.RELATIONS)
    background = _choice(rng, list(_BACKGROUND_P), p=list(_BACKGROUND_P.values()))
    objects = [_merge(stated, d) for stated, d in zip(spec.objects, drawn)]
    if len(objects) == 2:
        objects[1] = _distinct(objects[0], objects[1], spec.objects[1], rng)
    two = len(objects) == 2
    filled = world.Spec(
        tuple(objects),
        None if two else spec.position or position,
        (spec.relation or relation) if two else None,
        spec.background or background,
    )
    return Expansion(world.caption(filled), (_fill_note(spec, seed),))


def _draw_object(rng: np.random.Generator) -> world.ObjSpec:
    color = _choice(rng, list(world.COLORS))
    shape = _choice(rng, world.SHAPES)
    size = _choice(rng, list(_SIZE_P), p=list(_SIZE_P.values()))
    return world.ObjSpec(color, shape, size)


def _merge(stated: world.ObjSpec, drawn: world.ObjSpec) -> world.ObjSpec:
    return world.ObjSpec(stated.color or drawn.color, stated.shape or drawn.shape,
                         stated.size or drawn.size)


def _distinct(first: world.ObjSpec, second: world.ObjSpec, stated: world.ObjSpec,
              rng: np.random.Generator) -> world.ObjSpec:
    """Redraw the second object's unstated colour/shape while it equals the first: the world never shows
    two identical objects ("A above B" and "B above A" would be the same image)."""
    for _ in range(32):
        if (second.color, second.shape) != (first.color, first.shape) or (stated.color and stated.shape):
            break
        second = world.ObjSpec(stated.color or _choice(rng, list(world.COLORS)),
                               stated.shape or _choice(rng, world.SHAPES), second.size)
    return second


def _choice(rng: np.random.Generator, items, p=None):
    return items[int(rng.choice(len(items), p=p))]


def _fill_note(stated: world.Spec, seed: int) -> str:
    """Which attributes the seed chose (the caption is the rest of the story)."""
    names = [f"{attr} of object {k + 1}" for k, o in enumerate(stated.objects)
             for attr, value in (("colour", o.color), ("shape", o.shape), ("size", o.size)) if value is None]
    names += [attr for attr, value in (("position", stated.position), ("relation", stated.relation),
                                      ("background", stated.background)) if value is None
              and not (attr == "position" and len(stated.objects) == 2)
              and not (attr == "relation" and len(stated.objects) == 1)]
    return f"world prompt of the embedded default: {', '.join(names) or 'nothing'} filled from seed {seed}"
