"""The torch runtime: qwen-edge's own PyTorch modules as pipeline components.

Only provides callables (see :class:`qwen_edge.pipeline.Components`); sampling, tokenization and image
handling stay in the pipeline. NumPy arrays in and out.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from qwen_edge.spec import ModelSpec
from qwen_edge.text_encoder import load_text_encoder
from qwen_edge.transformer_v1 import load_transformer_v1
from qwen_edge.transformer_v2 import load_transformer_v2
from qwen_edge.vae_v1 import load_vae_v1_decoder
from qwen_edge.vae_v2 import load_vae_v2_decoder

_LOADERS = {  # family -> (transformer loader, VAE decoder loader)
    "qwen-image-2.1": (load_transformer_v2, load_vae_v2_decoder),
    "qwen-image": (load_transformer_v1, load_vae_v1_decoder),
}


class TorchComponents:
    """Text encoder, transformer and VAE decoder of one checkpoint, loaded strictly in fp32."""

    def __init__(self, spec: ModelSpec, lora=None, lora_scale: float = 1.0, dtype: torch.dtype = torch.float32):
        load_transformer, load_decoder = _LOADERS[spec.family.name]
        self.spec = spec
        self.text_encoder = load_text_encoder(spec.component("text_encoder"), dtype=dtype)
        self.transformer = load_transformer(spec.component("transformer"), dtype=dtype)
        if lora is not None:
            from qwen_edge.lora import merge_lora

            print(f"qwen-edge: {merge_lora(self.transformer, lora, lora_scale)}", file=sys.stderr)
        self.vae_decoder = load_decoder(spec.component("vae"), dtype=dtype)
        self.dtype = dtype

    @torch.inference_mode()
    def encode_text(self, ids: np.ndarray) -> np.ndarray:
        return _np(self.text_encoder(torch.from_numpy(ids)))  # (1, L, D)

    def denoiser(self, text: np.ndarray, h: int, w: int):
        """Bind one prompt: rotary tables (and, for 2.1, the text K/V cache) are computed once here."""
        txt = torch.from_numpy(text).to(self.dtype)  # (1, L, D)
        if self.spec.family.name == "qwen-image-2.1":
            return self._denoiser_v2(txt, h, w)
        return self._denoiser_v1(txt, h, w)

    @torch.inference_mode()
    def _denoiser_v2(self, txt: torch.Tensor, h: int, w: int):
        model = self.transformer
        cos, sin = model.rope(txt.shape[1], h, w)  # (L+N, Dh/2) each
        kv = model.encode_text(txt, cos, sin) if model.config.causal_condition else None

        @torch.inference_mode()
        def call(latents: np.ndarray, sigma: float) -> np.ndarray:
            x = torch.from_numpy(latents).to(self.dtype)  # (1, N, C)
            s = torch.full((x.shape[0],), sigma, dtype=torch.float32)
            if kv is not None:  # text is modulated at t = 0: its keys/values are the same every step
                return _np(model.forward_cached(x, kv, s, cos, sin))
            return _np(model(x, txt, s, cos, sin))

        return call

    @torch.inference_mode()
    def _denoiser_v1(self, txt: torch.Tensor, h: int, w: int):
        model = self.transformer
        tables = model.rope(txt.shape[1], h, w)  # image and text (cos, sin)

        @torch.inference_mode()
        def call(latents: np.ndarray, sigma: float) -> np.ndarray:
            x = torch.from_numpy(latents).to(self.dtype)  # (1, N, 64)
            s = torch.full((x.shape[0],), sigma, dtype=torch.float32)
            return _np(model(x, txt, s, *tables))

        return call

    @torch.inference_mode()
    def decode(self, z: np.ndarray) -> np.ndarray:
        return _np(self.vae_decoder(torch.from_numpy(z).to(self.dtype)))  # (1, C, H, W)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy()
