"""Rendering a scene to pixels with Pillow: flat colours, anti-aliased edges."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .scene import BACKGROUNDS, COLORS, SIZE, Obj, Scene

SUPERSAMPLE = 4  # drawn at 4x then box-averaged: smooth edges, interiors keep the exact palette RGB


def render(scene: Scene) -> np.ndarray:
    """The scene as a ``(SIZE, SIZE, 3)`` uint8 RGB array (an unstated background is white)."""
    k = SUPERSAMPLE
    canvas = Image.new("RGB", (SIZE * k, SIZE * k), BACKGROUNDS[scene.background or "white"])
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        _draw(draw, obj, k)
    return np.asarray(canvas.reduce(k), dtype=np.uint8).copy()


def _draw(draw: ImageDraw.ImageDraw, obj: Obj, k: int) -> None:
    # Pixel edges, not centres, sit at integer coordinates; at k x scale the shape spans
    # [k (c - r), k (c + r)), hence the "- 1" on inclusive right/bottom edges.
    x0, y0 = k * (obj.cx - obj.r), k * (obj.cy - obj.r)
    x1, y1 = k * (obj.cx + obj.r) - 1, k * (obj.cy + obj.r) - 1
    fill = COLORS[obj.color]
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:  # upright isosceles: apex at the top middle, base on the bottom edge
        draw.polygon([(k * obj.cx, y0), (x0, y1), (x1, y1)], fill=fill)
