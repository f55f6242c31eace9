"""The embedded model's numbers: VAE reconstruction PSNR and prompt fidelity over held-out prompts.

Images are generated through :class:`qwen_edge.pipeline.Pipeline` on the torch runtime, exactly as a user
gets them, with seed ``i`` for the i-th prompt, and judged by ``qwen_edge.world.evaluate_many``. Used by the
training command (for the model card) and by ``benchmarks/eval_default.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..world import evaluate_many, prompts, render, scene_from_prompt


def heldout_prompts(n: int = 200, seed: int = 0) -> list[str]:
    """``n`` held-out captions: none of their canonical forms was seen in training."""
    return prompts("heldout", n, seed=seed)


def heldout_images(texts: list[str], seed: int = 0) -> np.ndarray:
    """One rendered scene per caption (N, 128, 128, 3) uint8: the VAE's held-out test set."""
    rng = np.random.default_rng(seed)
    return np.stack([render(scene_from_prompt(t, rng)) for t in texts])


def generate(model: str | Path, texts: list[str], steps: int | None, desc: str = "generate",
             cfg: float = 1.0) -> list[np.ndarray]:
    """128x128 images for ``texts`` (seed = index) through the pipeline; ``steps=None``: the checkpoint's
    own grid (``sample_sigmas``); ``cfg`` > 1: true CFG against the blank prompt (``flow.BLANK``)."""
    from .flow import BLANK
    from ..pipeline import Pipeline, Request

    pipe = Pipeline.from_pretrained(model)
    sigmas = pipe.spec.sample_sigmas if steps is None else None
    images = []
    for i, text in enumerate(tqdm(texts, desc=desc, unit="img")):
        req = Request(prompt=text, height=128, width=128, steps=steps or len(sigmas), sigmas=sigmas, seed=i,
                      negative_prompt=BLANK if cfg > 1 else None, cfg_scale=cfg)
        *_, last = pipe.generate(req)
        images.append(last.image)
    return images


def fidelity(model: str | Path, texts: list[str], steps: int | None, desc: str = "generate",
             cfg: float = 1.0) -> dict:
    """Per-attribute and whole-prompt accuracy (``"ok"``) of ``model`` over ``texts``."""
    return evaluate_many(generate(model, texts, steps, desc, cfg), texts)
