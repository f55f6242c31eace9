"""Training data from the procedural world: rendered scenes and their captions, train split only.

Held-out prompts (``qwen_edge.world.split_of(caption) == "heldout"``) never reach training, so the
evaluation over them measures unseen combinations of colour, shape, size, position and background.
"""

from __future__ import annotations

import numpy as np
import torch

from ..world import caption, render, sample_scene, split_of


def train_scenes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[str]]:
    """``n`` rendered training scenes: images (n, 128, 128, 3) uint8 and their captions."""
    images, texts = [], []
    while len(texts) < n:
        scene = sample_scene(rng)
        text = caption(scene)
        if split_of(text) == "train":
            images.append(render(scene))
            texts.append(text)
    return np.stack(images), texts


def to_rgba(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 4, H, W) in [-1, 1] with an opaque alpha of +1 (the 2.1 VAE's input)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W)
    return torch.cat([x, torch.ones_like(x[:, :1])], dim=1)  # (B, 4, H, W)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two uint8 images (or stacks of them)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))
