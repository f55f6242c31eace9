"""Training qwen-edge's embedded default model from scratch (torch, CPU, about an hour on 2 cores).

A tiny Qwen-Image 2.1 (qwen-edge's own modules at tiny width) learns the procedural world of
``qwen_edge.world``: a 16x VAE by reconstruction, text encoder + transformer by flow matching (the
40-step teacher), then a 4-step student by trajectory matching. Both are written as diffusers-format
checkpoints. Entry point: :func:`train_default` (``python examples/train_tiny.py``).
"""

from .recipe import Recipe, distill_default, measure, train_default

__all__ = ["Recipe", "distill_default", "measure", "train_default"]
