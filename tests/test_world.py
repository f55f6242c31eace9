"""The procedural world: captions are exact, the judge accepts true renders (also blurred, noisy,
rescaled) and rejects noise, blanks and prompts with one word changed. NumPy + Pillow only."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageFilter
from qwen_edge.errors import InputError
from qwen_edge.world import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    Obj,
    caption,
    evaluate,
    evaluate_many,
    judge,
    parse_prompt,
    prompts,
    render,
    sample_scene,
    scene_from_prompt,
    split_of,
)

N = 300


@pytest.fixture(scope="module")
def world():
    """N sampled scenes, their captions and renders."""
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(N)]
    return scenes, [caption(s) for s in scenes], [render(s) for s in scenes]


def ok_rate(images, texts) -> float:
    return float(np.mean([evaluate(im, t).ok for im, t in zip(images, texts)]))


def test_no_torch_import():
    """The torch-free runtime imports the world: it must not pull torch in."""
    code = "import sys, qwen_edge.world; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_renders_pass(world):
    _, texts, images = world
    assert images[0].shape == (128, 128, 3) and images[0].dtype == np.uint8
    summary = evaluate_many(images, texts)
    assert summary["n"] == N and summary["ok"] >= 0.99
    assert all(summary[a] >= 0.99 for a in ATTRIBUTES)


def test_distribution(world):
    scenes, _, _ = world
    two = np.mean([len(s.objects) == 2 for s in scenes])
    assert 0.5 < two < 0.7
    assert {s.background for s in scenes} == {None, "white", "black", "gray"}
    for s in scenes:  # fully inside the canvas, at least PAD = 2 px from its edges
        for o in s.objects:
            assert min(o.cx, o.cy) - o.r >= 2 - 1e-9 and max(o.cx, o.cy) + o.r <= 126 + 1e-9
        if len(s.objects) == 2:  # apart by GAP = 8 px along at least one axis: never overlapping
            a, b = s.objects
            assert max(abs(a.cx - b.cx), abs(a.cy - b.cy)) - a.r - b.r >= 8 - 1e-9


def test_noise_and_blank_fail(world):
    _, texts, _ = world
    rng = np.random.default_rng(1)
    noise = [rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for _ in range(100)]
    assert ok_rate(noise, texts[:100]) <= 0.02
    solid = [(255, 255, 255), (0, 0, 0), (128, 128, 128), *COLORS.values()]
    blanks = [np.full((128, 128, 3), solid[i % len(solid)], np.uint8) for i in range(100)]
    assert ok_rate(blanks, texts[:100]) <= 0.02


def _changed(text: str, field: str, choices, rng) -> str | None:
    """``text`` with one stated ``field`` changed to another value (None if it states none)."""
    spec = parse_prompt(text)
    if field in ("color", "shape", "size"):  # an object's attribute: change a random object's
        i = int(rng.integers(len(spec.objects)))
        obj = spec.objects[i]
        new = dataclasses.replace(obj, **{field: _other(getattr(obj, field), choices, rng)})
        objects = (*spec.objects[:i], new, *spec.objects[i + 1 :])
        return caption(dataclasses.replace(spec, objects=objects))
    if getattr(spec, field) is None:
        return None
    return caption(dataclasses.replace(spec, **{field: _other(getattr(spec, field), choices, rng)}))


def _other(value, choices, rng):
    rest = [c for c in choices if c != value]
    return rest[int(rng.integers(len(rest)))]


@pytest.mark.parametrize(
    "field, choices",
    [
        ("color", list(COLORS)),
        ("shape", SHAPES),
        ("relation", RELATIONS),
        ("position", POSITIONS),
        ("size", SIZES),
        ("background", list(BACKGROUNDS)),
    ],
)
def test_changed_word_fails(world, field, choices):
    """The judge notices one changed colour / shape / relation / position / size / background."""
    _, texts, images = world
    rng = np.random.default_rng(2)
    pairs = [(im, _changed(t, field, choices, rng)) for im, t in zip(images, texts)]
    pairs = [(im, t) for im, t in pairs if t is not None]
    assert len(pairs) >= 50
    assert 1 - ok_rate(*zip(*pairs)) >= 0.95


def test_blends_keep_their_colour():
    """An anti-aliased or blurred edge pixel (a blend of background and colour) is read as that
    colour when it is at least half colour, else as nothing: never as a third colour."""
    alpha = np.linspace(0, 1, 501, dtype=np.float32)[:, None]
    for bg in BACKGROUNDS.values():
        for i, rgb in enumerate(COLORS.values()):
            blend = np.round(np.float32(bg) + alpha * (np.float32(rgb) - np.float32(bg)))
            img = np.tile(blend.astype(np.uint8)[:, None], (1, 8, 1))  # (501, 8, 3)
            labels = judge._classify(img.astype(np.float32), np.float32(bg))[:, 0]
            assert set(labels[alpha[:, 0] < 0.49]) <= {-1}
            assert set(labels[alpha[:, 0] > 0.51]) == {i}


def _blur(image):
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(1.5)))


def test_blur_and_noise_pass(world):
    _, texts, images = world
    rng = np.random.default_rng(3)
    assert ok_rate([_blur(im) for im in images], texts) >= 0.95
    noisy = [np.clip(im + rng.normal(0, 10, im.shape), 0, 255).astype(np.uint8) for im in images]
    assert ok_rate(noisy, texts) >= 0.95


@pytest.mark.parametrize("size", [(96, 96), (256, 256), (128, 192)])
def test_other_sizes(world, size):
    """Rescaled (square) or widened with background (non-square) renders still pass."""
    _, texts, images = world
    out = []
    for im in images[:100]:
        if size[0] == size[1]:
            out.append(np.asarray(Image.fromarray(im).resize(size[::-1], Image.BILINEAR)))
        else:
            wide = np.empty((*size, 3), np.uint8)
            wide[:] = im[0, 0]
            wide[:, 32:160] = im
            out.append(wide)
    assert ok_rate(out, texts[:100]) >= 0.95


def test_parse_round_trip(world):
    scenes, texts, _ = world
    for scene, text in zip(scenes, texts):
        spec = parse_prompt(text)
        assert spec == scene.spec and spec.unknown == ()
        assert caption(spec) == text


def test_parse_examples():
    spec = parse_prompt("A large red circle above a blue square on a black background.")
    assert [(o.color, o.shape, o.size) for o in spec.objects] == [
        ("red", "circle", "large"),
        ("blue", "square", None),
    ]
    assert (spec.relation, spec.background, spec.position) == ("above", "black", None)
    spec = parse_prompt("an orange triangle in the centre, grey background")
    assert (spec.objects[0].color, spec.position) == ("orange", "in the center")
    assert spec.background == "gray"
    assert caption(parse_prompt("a small green triangle")) == "a small green triangle"


def test_unknown_words():
    spec = parse_prompt("a shiny red circle floating on the moon")
    assert spec.unknown == ("shiny", "floating", "on", "moon")
    assert spec.objects[0].color == "red" and spec.objects[0].shape == "circle"
    assert parse_prompt("a cat").unknown == ("cat",)


def test_split_disjoint_and_deterministic():
    train, held = prompts("train", 2000, seed=0), prompts("heldout", 500, seed=0)
    assert not set(train) & set(held)
    assert all(split_of(t) == "heldout" for t in held)
    assert prompts("heldout", 50, seed=7) == prompts("heldout", 50, seed=7)
    # a stated white background is the same content as none: same split
    assert split_of("a red circle") == split_of("a red circle on a white background")
    frac = np.mean(
        [split_of(caption(sample_scene(np.random.default_rng(i)))) == "heldout" for i in range(400)]
    )
    assert 0.1 < frac < 0.3
    with pytest.raises(InputError):
        prompts("test", 1)


def test_scene_from_prompt():
    rng = np.random.default_rng(4)
    texts = [
        "a large red circle above a large blue square",
        "a large yellow triangle to the left of a large green circle on a gray background",
        "a small triangle on the left",
        "a purple square",
        "a red circle and a blue triangle on a black background",
    ]
    for text in texts * 10:
        scene = scene_from_prompt(text, rng)
        assert evaluate(render(scene), text).ok, (text, scene)
    assert scene_from_prompt("a small triangle", rng).objects[0].color in COLORS


@pytest.mark.parametrize(
    "text",
    [
        "a cat",
        "a red circle above",
        "a red circle on the left above a blue square",
        "a red circle a blue square a green triangle",
    ],
)
def test_bad_prompts(text):
    """Prompts that describe no scene of the world are an InputError, for sampling and judging."""
    with pytest.raises(InputError):
        scene_from_prompt(text, np.random.default_rng(0))
    with pytest.raises(InputError):
        evaluate(np.zeros((128, 128, 3), np.uint8), text)


def test_bad_inputs():
    with pytest.raises(InputError):
        evaluate(np.zeros((128, 128)), "a red circle")
    with pytest.raises(InputError):
        evaluate(np.zeros((128, 128, 3), np.float32), "a red circle")
    with pytest.raises(InputError):
        evaluate_many([np.zeros((128, 128, 3), np.uint8)], [])
    with pytest.raises(InputError):
        Obj("pink", "circle", None, 64, 64, 20)
