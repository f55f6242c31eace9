"""The world's prompt grammar: captions from scenes, specs from prompts, the held-out split.

Grammar (articles follow English: "an orange circle")::

    prompt     := object [position] [background] | object relation object [background]
    object     := "a" [size] colour shape
    position   := "at the top" | "at the bottom" | "on the left" | "on the right" | "in the center"
    relation   := "above" | "below" | "to the left of" | "to the right of"
    background := "on a" ("white" | "black" | "gray") "background"

Two objects joined by "and" (no relation) are also read and written, though never sampled. The
parser is lenient (any order, "the", "grey", "centre", an omitted article, colour or shape): it reads
what it understands and returns the rest as unknown words for the CLI to report.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

from ..errors import InputError
from .scene import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    ObjSpec,
    Scene,
    Spec,
    place,
    sample_spec,
)

HELDOUT_PERCENT = 20
_FILLERS = {"a", "an", "the", "and"}
_SYNONYMS = {"grey": "gray", "centre": "center"}
_PHRASES = {  # token tuple -> (slot, value); "background" phrases are added below
    **{tuple(p.split()): ("position", p) for p in POSITIONS},
    **{tuple(r.split()): ("relation", r) for r in RELATIONS},
}
for _bg in BACKGROUNDS:
    for _head in (("on", "a"), ("on",), ()):
        _PHRASES[(*_head, _bg, "background")] = ("background", _bg)
_LONGEST = max(map(len, _PHRASES))
# "object" is how a caption names an object whose shape it does not state.
_WORD_SLOT = {
    **{c: "color" for c in COLORS},
    **{s: "size" for s in SIZES},
    **{s: "shape" for s in (*SHAPES, "object")},
}
_SHAPE = {s: s for s in SHAPES}  # "object" (and no shape word) -> None


def caption(scene: Scene | Spec) -> str:
    """The prompt that states exactly what ``scene`` (or a spec) says, in the world's grammar."""
    spec = scene.spec if isinstance(scene, Scene) else scene
    words = [_noun_phrase(spec.objects[0])]
    if spec.relation or len(spec.objects) == 2:
        words += [spec.relation or "and", _noun_phrase(spec.objects[1])]
    if spec.position:
        words.append(spec.position)
    if spec.background:
        words.append(f"on a {spec.background} background")
    return " ".join(words)


def _noun_phrase(obj: ObjSpec) -> str:
    words = [w for w in (obj.size, obj.color, obj.shape or "object") if w]
    return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)


def parse_prompt(text: str) -> Spec:
    """Read the attributes ``text`` states; words outside the grammar go to ``Spec.unknown``.

    Never raises on content: call ``Spec.check()`` to require a describable scene.
    """
    if not isinstance(text, str):
        raise InputError(f"a prompt must be a string, got {type(text).__name__}")
    tokens = [_SYNONYMS.get(t, t) for t in re.findall(r"[a-z]+", text.lower())]
    objects: list[dict] = []
    slots: dict[str, str] = {}
    unknown: list[str] = []
    i = 0
    while i < len(tokens):
        n, slot, value = _match_phrase(tokens, i)
        if slot and slot not in slots:
            slots[slot] = value
            _close(objects)
        elif slot or not _read_word(tokens[i], objects):
            unknown += tokens[i : i + n]
        i += n
    objs = tuple(
        ObjSpec(o.get("color"), _SHAPE.get(o.get("shape")), o.get("size")) for o in objects
    )
    position, relation, background = (slots.get(k) for k in ("position", "relation", "background"))
    return Spec(objs, position, relation, background, tuple(unknown))


def _match_phrase(tokens: list[str], i: int) -> tuple[int, str | None, str | None]:
    """The longest grammar phrase starting at ``tokens[i]`` as (length, slot, value)."""
    for n in range(min(_LONGEST, len(tokens) - i), 0, -1):
        hit = _PHRASES.get(tuple(tokens[i : i + n]))
        if hit:
            return n, *hit
    return 1, None, None


def _read_word(word: str, objects: list[dict]) -> bool:
    """Apply one colour / size / shape / filler word to the object list; False if not understood."""
    slot = _WORD_SLOT.get(word)
    if slot is None:
        return word in _FILLERS
    # A repeated attribute or a word after the shape starts the next object.
    if not objects or objects[-1].get("done") or slot in objects[-1]:
        objects.append({})
    objects[-1][slot] = word
    objects[-1]["done"] = slot == "shape"
    return True


def _close(objects: list[dict]) -> None:
    if objects:
        objects[-1]["done"] = True


def split_of(text: str) -> str:
    """The split a prompt belongs to, "train" or "heldout", from a hash of its canonical form.

    The canonical form drops unknown words and a stated white background, so "a red circle" and
    "a red circle on a white background" share a split and held-out prompts are unseen content.
    """
    spec = parse_prompt(text)
    background = None if spec.background == "white" else spec.background
    content = Spec(spec.objects, spec.position, spec.relation, background)
    key = caption(content) if spec.objects else ""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 100
    return "heldout" if bucket < HELDOUT_PERCENT else "train"


def prompts(split: str = "train", n: int = 100, seed: int = 0) -> list[str]:
    """``n`` captions sampled from the world's distribution that fall in ``split`` (deterministic
    for a seed; common single-object captions may repeat)."""
    if split not in ("train", "heldout"):
        raise InputError(f"split must be 'train' or 'heldout', got {split!r}")
    rng = np.random.default_rng(seed)
    out: list[str] = []
    while len(out) < n:
        text = caption(sample_spec(rng))
        if split_of(text) == split:
            out.append(text)
    return out


def scene_from_prompt(text: str, rng: np.random.Generator) -> Scene:
    """Sample a scene that satisfies ``text`` (unstated colours/shapes random, sizes medium,
    background white); unknown words are ignored. Raises InputError if no scene fits."""
    return place(parse_prompt(text), rng)
