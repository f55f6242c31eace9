"""A GenEval-style judge: does an image satisfy its prompt, decided from pixels only.

1. Rescale so the short side is ``SIZE``: every threshold below is in pixels at that scale.
2. The background is the median colour of the image border.
3. A pixel belongs to palette colour c when it lies within ``COLOR_TOL`` of the segment from the
   background colour to c, at c's end (c covers at least half of it, were it a blend): the edges of
   blurred or anti-aliased objects stay where they were drawn.
4. Per colour, a 3x3 closing fills pinholes; a connected component is an object when its 3x3
   opening (which erases speckle and thin noise) keeps ``MIN_AREA`` pixels. Geometry is measured
   on the unopened component, so triangle tips survive.
5. Shape from the component's box (see ``_shape``), size from the box's half side, position and
   relation from box centres, as the scene model defines them."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import permutations

import numpy as np
from PIL import Image

from ..errors import InputError
from .prompt import parse_prompt
from .scene import BACKGROUNDS, COLORS, SIZE, Obj, Spec

COLOR_TOL = 50.0  # RGB distance; palette colours are > 85 apart (see scene.COLORS)
MIN_AREA = 80  # px; the smallest object (a small triangle) has ~290
# Shape features, measured on 300 renders, blurred (sigma 1.5-3) and noisy (sigma 10-20):
TRIANGLE_SKEW = 0.1  # |upper-half share of area - 1/2|: triangle > 0.12, circle/square < 0.075
SQUARE_CORNERS = 0.55  # filled fraction of the box's corner quarters: square > 0.7, circle < 0.42
# Half-side thresholds between the scene.RADIUS ranges 12-16 | 20-24 | 28-34, less the ~1 px a blur
# takes off an object's box.
SMALL_BELOW, LARGE_ABOVE = 17.5, 25.5
EDGE, CENTER = 0.4, 0.15  # "at the top": centre in the top 40%; "in the center": within 15%
ATTRIBUTES = ("colors", "shapes", "count", "sizes", "position", "relation", "background")

_OBJ_RGB = np.array(list(COLORS.values()), dtype=np.float32)  # (6, 3)
_BG_RGB = np.array(list(BACKGROUNDS.values()), dtype=np.float32)  # (3, 3)


@dataclass(frozen=True)
class Result:
    """Per-attribute verdicts for one image and prompt; ``ok`` when all hold. Also what was seen."""

    colors: bool
    shapes: bool
    count: bool
    sizes: bool
    position: bool
    relation: bool
    background: bool
    ok: bool
    objects: tuple[Obj, ...] = ()
    found_background: str | None = None


def evaluate(image: np.ndarray, prompt: str) -> Result:
    """Judge whether ``image`` (uint8 (H, W, 3) RGB, any size) shows what ``prompt`` states.

    Attributes a prompt leaves unsaid are not checked, except the background, which must be white.
    Raises InputError for a malformed image or a prompt that does not describe one or two objects.
    """
    spec = parse_prompt(prompt)
    spec.check()
    img = _canonical(image)  # (h, w, 3)
    background, objects = _detect(img)
    verdict = _best_match(spec, objects, img.shape[:2])
    verdict["count"] = len(objects) == len(spec.objects)
    verdict["background"] = background == (spec.background or "white")
    return Result(**verdict, ok=all(verdict.values()), objects=objects, found_background=background)


def evaluate_many(images, prompts) -> dict:
    """Accuracy per attribute and for whole prompts (``"ok"``) over paired images and prompts."""
    if len(images) != len(prompts):
        raise InputError(f"{len(images)} images but {len(prompts)} prompts")
    if not len(prompts):
        raise InputError("evaluate_many needs at least one image")
    return summarize([evaluate(im, p) for im, p in zip(images, prompts)])


def summarize(results) -> dict:
    """:func:`evaluate_many`'s figures from :func:`evaluate` results already in hand (for callers that also keep
    each prompt's verdict)."""
    summary = {a: float(np.mean([getattr(r, a) for r in results])) for a in (*ATTRIBUTES, "ok")}
    return {"n": len(results), **summary}


def detect(image: np.ndarray) -> tuple[str | None, tuple[Obj, ...]]:
    """The background name (None if the border is not a plain palette background) and the objects
    found in ``image``, top to bottom, as ``Obj`` (``size=None``: medium) with geometry in pixels of
    the image rescaled to a short side of ``SIZE``."""
    return _detect(_canonical(image))


def _detect(img: np.ndarray) -> tuple[str | None, tuple[Obj, ...]]:
    frame = np.ones(img.shape[:2], bool)
    frame[2:-2, 2:-2] = False
    border = np.median(img[frame], axis=0)  # (3,) the colour of the outer 2 px
    labels = _classify(img, border)  # (h, w) palette index, -1 for none
    objects = []
    for c, name in enumerate(COLORS):
        mask = _close(labels == c)
        if mask.any():
            objects += [_describe(name, comp) for comp in _components(mask, _open(mask))]
    return _background(border), tuple(sorted(objects, key=lambda o: (o.cy, o.cx)))


def _canonical(image: np.ndarray) -> np.ndarray:
    if (
        not isinstance(image, np.ndarray)
        or image.dtype != np.uint8
        or image.ndim != 3
        or image.shape[2] != 3
        or min(image.shape[:2]) < 16
    ):
        raise InputError("an image must be a uint8 RGB array of shape (H, W, 3) with H, W >= 16")
    h, w = image.shape[:2]
    if min(h, w) != SIZE:  # thresholds are in SIZE-px units: bring the short side to SIZE
        k = SIZE / min(h, w)
        size = (round(w * k), round(h * k))
        image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    return image.astype(np.float32)


def _classify(img: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """Palette index per pixel (-1: none), by distance to the segment background -> colour."""
    v, d = img - bg, _OBJ_RGB - bg  # (h, w, 3), (6, 3)
    vd, dd = v @ d.T, np.maximum((d * d).sum(1), 1.0)  # (h, w, 6), (6,); 1: a colour background
    alpha = vd / dd  # object coverage, were the pixel a blend of background and colour
    a = np.clip(alpha, 0, 1)
    dist2 = (v * v).sum(-1, keepdims=True) - 2 * a * vd + a * a * dd  # (h, w, 6) to the segment
    best = dist2.argmin(-1)[..., None]  # (h, w, 1) the nearest segment: a blend's own colour
    near = np.take_along_axis(dist2, best, -1) < COLOR_TOL**2
    covered = np.take_along_axis(alpha, best, -1) >= 0.5
    return np.where(near & covered, best, -1)[..., 0]


def _background(border: np.ndarray) -> str | None:
    dist = np.linalg.norm(_BG_RGB - border, axis=-1)  # (3,)
    return list(BACKGROUNDS)[int(dist.argmin())] if dist.min() < COLOR_TOL else None


def _shift_all(mask: np.ndarray, fill: bool) -> list[np.ndarray]:
    """The 3x3 neighbourhood of every pixel as nine shifted copies (``fill`` outside the image)."""
    p = np.pad(mask, 1, constant_values=fill)
    h, w = mask.shape
    return [p[i : i + h, j : j + w] for i in range(3) for j in range(3)]


def _open(mask: np.ndarray) -> np.ndarray:
    eroded = np.logical_and.reduce(_shift_all(mask, True))
    return np.logical_or.reduce(_shift_all(eroded, False))


def _close(mask: np.ndarray) -> np.ndarray:
    dilated = np.logical_or.reduce(_shift_all(mask, False))
    return np.logical_and.reduce(_shift_all(dilated, True))


def _components(mask: np.ndarray, core: np.ndarray) -> list[np.ndarray]:
    """4-connected components of ``mask`` holding at least ``MIN_AREA`` pixels of ``core``.

    Every pixel takes the smallest index reachable, by repeated neighbour-min steps plus pointer
    jumping (NumPy only: no SciPy on the edge).
    """
    h, w = mask.shape
    none = h * w
    label = np.where(mask, np.arange(none).reshape(h, w), none)
    while True:
        p = np.pad(label, 1, constant_values=none)
        new = np.minimum.reduce([label, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        flat = np.append(new.ravel(), none)
        new = np.where(mask, flat[new], none)  # jump: take the label's own label
        if np.array_equal(new, label):
            break
        label = new
    counts = np.bincount(label[core & mask], minlength=none)
    return [label == i for i in np.flatnonzero(counts >= MIN_AREA)]


def _describe(color: str, comp: np.ndarray) -> Obj:
    # The box spans rows / columns with 2+ pixels: a lone pixel on an edge flipped by noise would
    # otherwise widen it.
    (x0, x1), (y0, y1) = _span(comp.sum(0)), _span(comp.sum(1))  # pixel edges
    box = comp[y0:y1, x0:x1]
    r = (box.shape[0] + box.shape[1]) / 4
    size = "small" if r < SMALL_BELOW else "large" if r > LARGE_ABOVE else None
    return Obj(color, _shape(box), size, (x0 + x1) / 2, (y0 + y1) / 2, float(r))


def _shape(box: np.ndarray) -> str:
    """Triangle: its area sits in one half of its box (1/4 vs 3/4; a square or circle splits it
    evenly). Square: the corner quarters of its box are filled (a circle's are ~30% full)."""
    h, w = box.shape
    ch, cw = max(1, h // 4), max(1, w // 4)
    corners = np.mean(
        [box[:ch, :cw].mean(), box[:ch, -cw:].mean(), box[-ch:, :cw].mean(), box[-ch:, -cw:].mean()]
    )
    top = box[: h // 2].sum() / max(1, box.sum())  # share of the area in the upper half
    if abs(top - 0.5) >= TRIANGLE_SKEW:
        return "triangle"
    return "square" if corners >= SQUARE_CORNERS else "circle"


def _span(counts: np.ndarray) -> tuple[int, int]:
    idx = np.flatnonzero(counts >= 2)
    return (int(idx[0]), int(idx[-1]) + 1) if len(idx) else (0, 1)


def _best_match(spec: Spec, objects: tuple[Obj, ...], hw: tuple[int, int]) -> dict:
    """Pair prompt objects with detections the way that satisfies the most attributes."""
    pool = [*objects, *[None] * len(spec.objects)]  # None: a prompt object nobody matched
    best = None
    for idx in permutations(range(len(pool)), len(spec.objects)):
        verdict = _judge(spec, [pool[i] for i in idx], hw)
        if best is None or sum(verdict.values()) > sum(best.values()):
            best = verdict
    return best


def _judge(spec: Spec, found: list[Obj | None], hw: tuple[int, int]) -> dict:
    """Attribute verdicts for one pairing (``found[i]`` is matched with ``spec.objects[i]``)."""

    def agree(key: str) -> bool:  # an unstated attribute (None) agrees with anything
        return all(
            o is not None and getattr(s, key) in (None, getattr(o, key))
            for s, o in zip(spec.objects, found)
        )

    complete = None not in found
    return {
        "colors": agree("color"),
        "shapes": agree("shape"),
        "sizes": agree("size"),
        "position": spec.position is None or (complete and _at(found[0], spec.position, hw)),
        "relation": spec.relation is None or (complete and _related(*found, spec.relation)),
    }


def _at(o: Obj, position: str, hw: tuple[int, int]) -> bool:
    x, y = o.cx / hw[1], o.cy / hw[0]  # fractions of the width / height
    return {
        "at the top": y < EDGE,
        "at the bottom": y > 1 - EDGE,
        "on the left": x < EDGE,
        "on the right": x > 1 - EDGE,
        "in the center": abs(x - 0.5) < CENTER and abs(y - 0.5) < CENTER,
    }[position]


def _related(a: Obj, b: Obj, relation: str) -> bool:
    """``a <relation> b``: the offset along the stated axis points the right way and dominates."""
    dx, dy = b.cx - a.cx, b.cy - a.cy  # from a to b; y grows downwards
    return {
        "above": dy > abs(dx),
        "below": -dy > abs(dx),
        "to the left of": dx > abs(dy),
        "to the right of": -dx > abs(dy),
    }[relation]
