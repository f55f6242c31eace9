"""qwen-edge: Qwen-Image text-to-image models on edge devices."""

__version__ = "0.1.0"
