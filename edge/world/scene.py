"""The world's vocabulary, its scene model and the scene sampler.

A scene records exactly what its caption states (``size=None`` and ``background=None`` mean "not
said": a medium object, a white canvas) plus the geometry that makes it true, so every rendered image
has exact ground truth. All geometry is in pixels of the ``SIZE`` x ``SIZE`` canvas; an object's
``(cx, cy)`` is the centre of its bounding box and ``r`` half its side (the radius of a circle).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError

SIZE = 128
# Flat, mutually distant colours: every pairwise RGB distance (backgrounds included) is > 85, so the
# judge's 50-px colour tolerance never confuses two of them, even with noise.
COLORS = {
    "red": (230, 30, 40),
    "green": (30, 170, 60),
    "blue": (30, 70, 225),
    "yellow": (245, 220, 30),
    "purple": (145, 45, 190),
    "orange": (250, 135, 10),
}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("at the top", "at the bottom", "on the left", "on the right", "in the center")
RELATIONS = ("above", "below", "to the left of", "to the right of")

# Radius ranges (px at SIZE=128) for small / unstated / large: the classes are > 4 px apart so blur
# and anti-aliasing (about 1 px) never move an object into its neighbour's class.
RADIUS = {"small": (12.0, 16.0), None: (20.0, 24.0), "large": (28.0, 34.0)}
PAD = 2.0  # min distance of an object's bounding box from the canvas edge
GAP = 8.0  # min gap between two objects along their relation axis
JITTER = 10.0  # max offset of a positioned object from the middle of its stated side


def _check_word(value, allowed, what: str) -> None:
    if value not in allowed:
        raise InputError(f"unknown {what} {value!r}; expected one of {sorted(map(str, allowed))}")


@dataclass(frozen=True)
class ObjSpec:
    """What a prompt says about one object; ``None`` means the prompt does not say."""

    color: str | None = None
    shape: str | None = None
    size: str | None = None


@dataclass(frozen=True)
class Spec:
    """Everything a prompt states, plus the words the parser did not understand."""

    objects: tuple[ObjSpec, ...] = ()
    position: str | None = None
    relation: str | None = None
    background: str | None = None
    unknown: tuple[str, ...] = ()

    def check(self) -> None:
        """Raise InputError unless this spec describes a scene of the world."""
        if not 1 <= len(self.objects) <= 2:
            raise InputError(f"a prompt must describe one or two objects, got {len(self.objects)}")
        if self.position is not None and len(self.objects) != 1:
            raise InputError("a position ('on the left', ...) needs exactly one object")
        if self.relation is not None and len(self.objects) != 2:
            raise InputError("a relation ('above', ...) needs exactly two objects")


@dataclass(frozen=True)
class Obj:
    """One flat-coloured object: its stated attributes and its bounding-box geometry (px)."""

    color: str
    shape: str
    size: str | None
    cx: float
    cy: float
    r: float

    def __post_init__(self):
        _check_word(self.color, COLORS, "colour")
        _check_word(self.shape, SHAPES, "shape")
        _check_word(self.size, (None, *SIZES), "size")


@dataclass(frozen=True)
class Scene:
    """One or two objects on a plain background (``None`` = unstated, rendered white); a single
    object may have a stated position, two objects a relation (none: the caption joins them with
    "and", which the sampler never does)."""

    objects: tuple[Obj, ...]
    background: str | None = None
    position: str | None = None
    relation: str | None = None

    def __post_init__(self):
        _check_word(self.background, (None, *BACKGROUNDS), "background")
        _check_word(self.position, (None, *POSITIONS), "position")
        _check_word(self.relation, (None, *RELATIONS), "relation")
        self.spec.check()

    @property
    def spec(self) -> Spec:
        """The symbolic part of the scene: exactly what its caption states."""
        objs = tuple(ObjSpec(o.color, o.shape, o.size) for o in self.objects)
        return Spec(objs, self.position, self.relation, self.background)


def sample_spec(rng: np.random.Generator) -> Spec:
    """Sample the stated attributes: 40% one object (60% of those positioned), 60% two related."""
    n = 1 if rng.random() < 0.4 else 2
    objs = [_sample_obj_spec(rng) for _ in range(n)]
    # Two identical objects make "A above B" and "B above A" the same image: avoid them.
    while n == 2 and objs[0][:2] == objs[1][:2]:
        objs[1] = _sample_obj_spec(rng)
    position = _choice(rng, POSITIONS) if n == 1 and rng.random() < 0.6 else None
    relation = _choice(rng, RELATIONS) if n == 2 else None
    return Spec(tuple(ObjSpec(*o) for o in objs), position, relation, _sample_background(rng))


def sample_scene(rng: np.random.Generator) -> Scene:
    """Sample a random scene of the world (attributes from :func:`sample_spec`, then geometry)."""
    return place(sample_spec(rng), rng)


def place(spec: Spec, rng: np.random.Generator) -> Scene:
    """Sample geometry that makes ``spec`` true; unstated colours and shapes are drawn at random."""
    spec.check()
    attrs = [
        (o.color or _choice(rng, list(COLORS)), o.shape or _choice(rng, SHAPES), o.size)
        for o in spec.objects
    ]  # (colour, shape, size) per object
    if len(attrs) == 1:
        r = _radius(rng, attrs[0][2])
        objs = (Obj(*attrs[0], *_place_one(rng, spec.position, r), r),)
    else:
        objs = _place_two(rng, attrs, spec.relation)
    return Scene(objs, spec.background, spec.position, spec.relation)


def _choice(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _sample_obj_spec(rng: np.random.Generator) -> tuple:
    u = rng.random()
    size = "small" if u < 0.25 else "large" if u < 0.5 else None
    return (_choice(rng, list(COLORS)), _choice(rng, SHAPES), size)


def _sample_background(rng: np.random.Generator) -> str | None:
    u = rng.random()
    if u < 0.25:
        return "black"
    if u < 0.5:
        return "gray"
    return "white" if u < 0.65 else None  # white is stated in 30% of white scenes


def _radius(rng: np.random.Generator, size: str | None) -> float:
    lo, hi = RADIUS[size]
    return float(rng.uniform(lo, hi))


def _place_one(rng: np.random.Generator, position: str | None, r: float) -> tuple[float, float]:
    lo, hi = PAD + r, SIZE - PAD - r
    if position is None:
        return float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
    # A stated side: the centre lies in that side's outer 30% and near the middle of the other axis
    # (so "at the top" is never also "on the left"); the center: near the middle of both.
    edge = float(rng.uniform(lo, max(lo, 0.3 * SIZE)))
    near = rng.uniform(SIZE / 2 - JITTER, SIZE / 2 + JITTER, size=2).tolist()
    return {
        "at the top": (near[0], edge),
        "at the bottom": (near[0], SIZE - edge),
        "on the left": (edge, near[1]),
        "on the right": (SIZE - edge, near[1]),
        "in the center": (near[0], near[1]),
    }[position]


def _fit_radii(rng: np.random.Generator, size_a: str | None, size_b: str | None) -> tuple:
    """Two radii of the stated sizes that fit side by side: two large objects do not always fit at
    random radii, so the excess is taken from each in proportion to its room above its minimum
    (at their minimum, 28 px, they always fit)."""
    (lo_a, _), (lo_b, _) = RADIUS[size_a], RADIUS[size_b]
    ra, rb = _radius(rng, size_a), _radius(rng, size_b)
    excess = ra + rb - (SIZE - 2 * PAD - GAP) / 2
    if excess > 0:
        room = (ra - lo_a) + (rb - lo_b)
        ra, rb = ra - excess * (ra - lo_a) / room, rb - excess * (rb - lo_b) / room
    return ra, rb


def _place_two(rng: np.random.Generator, attrs: list, relation: str | None) -> tuple[Obj, Obj]:
    """Stack two objects along the relation's axis with a clear gap; the other axis offset is
    at most half the distance along the axis, so the stated relation is the dominant one."""
    relation = relation or _choice(rng, RELATIONS)  # unstated: any non-overlapping layout
    ra, rb = _fit_radii(rng, attrs[0][2], attrs[1][2])
    slack = max(0.0, SIZE - 2 * PAD - 2 * ra - 2 * rb - GAP)
    start = float(rng.uniform(0, slack))
    a_main = PAD + ra + start
    b_main = a_main + ra + GAP + float(rng.uniform(0, slack - start)) + rb
    a_other = float(rng.uniform(PAD + ra, SIZE - PAD - ra))
    lim = 0.5 * (b_main - a_main)
    b_other = float(rng.uniform(max(PAD + rb, a_other - lim), min(SIZE - PAD - rb, a_other + lim)))
    if relation in ("below", "to the right of"):  # the first object is the far one
        a_main, b_main = SIZE - a_main, SIZE - b_main
    vertical = relation in ("above", "below")
    a = (a_other, a_main) if vertical else (a_main, a_other)
    b = (b_other, b_main) if vertical else (b_main, b_other)
    return Obj(*attrs[0], *a, ra), Obj(*attrs[1], *b, rb)
