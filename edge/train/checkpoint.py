"""Writing trained qwen-edge modules as a normal diffusers-format Qwen-Image 2.1 checkpoint.

The reference classes (diffusers' ``QwenImage21Transformer2DModel`` / ``AutoencoderKLQwenImage21``,
transformers' ``Qwen3VLForConditionalGeneration``) are built with our configs, our weights are copied in
with a strict ``load_state_dict``, and their own ``save_pretrained`` writes the files: whatever loads
real checkpoints (qwen-edge, diffusers) loads this one. qwen-edge's modules use the reference parameter
names, so the key maps are tiny: ``model.language_model.`` for the text stack, 4D norm gammas and the
[mean; logvar] rows of ``quant_conv`` for the VAE.

The checkpoint is written into a temporary sibling directory and renamed into place at the end.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..testing import train_tiny_tokenizer
from ..text_encoder import TextEncoder
from ..transformer_v2 import TransformerV2
from ..vae_v2 import VAEV2Decoder, VAEV2Encoder

# mu = 0 at every size (base_shift = max_shift = 0): the exponential time shift is the identity and there is
# no terminal stretch, so the sampled sigmas are exactly the grid (linspace(1, 1/N, N), or sample_sigmas).
SCHEDULER = {
    "base_image_seq_len": 256, "base_shift": 0.0, "invert_sigmas": False, "max_image_seq_len": 8192,
    "max_shift": 0.0, "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": None,
    "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
    "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False,
}
SYSTEM_TEXT = ("<|im_start|>system\nComprehend and analyze the provided prompt.<|im_end|>\n"
               "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")


def write_tokenizer(out: Path, captions: list[str]):
    """A Qwen-style byte-level BPE tokenizer trained on the world's captions and the 2.1 template text."""
    corpus = [SYSTEM_TEXT.format(c) for c in captions]
    return train_tiny_tokenizer(out, corpus, vocab_size=512)


def write_checkpoint(out: Path, *, tokenizer_dir: Path, text_encoder: TextEncoder, transformer: TransformerV2,
                     vae: tuple[VAEV2Encoder, VAEV2Decoder], sample_sigmas: list[float] | None,
                     card: str) -> Path:
    """Write the whole pipeline directory atomically; returns ``out``."""
    import diffusers

    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copytree(tokenizer_dir, tmp / "processor")
    _save_text_encoder(text_encoder, tmp / "text_encoder", tokenizer_dir)
    _save_transformer(transformer, tmp / "transformer")
    _save_vae(*vae, tmp / "vae")
    diffusers.FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER).save_pretrained(tmp / "scheduler")
    (tmp / "qwen_edge.json").write_text(json.dumps({"default_size": 128}, indent=2) + "\n")
    (tmp / "README.md").write_text(card, encoding="utf-8")
    _write_index(tmp, sample_sigmas)  # last: a folder with model_index.json is a complete checkpoint
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _save_transformer(tr: TransformerV2, folder: Path) -> None:
    from diffusers import QwenImage21Transformer2DModel

    c = tr.config
    ref = QwenImage21Transformer2DModel(
        patch_size=c.patch_size, in_channels=c.in_channels, out_channels=c.out_channels, num_layers=c.num_layers,
        attention_head_dim=c.head_dim, num_attention_heads=c.num_heads, context_in_dim=c.context_dim,
        mlp_ratio=c.mlp_ratio, axes_dims_rope=list(c.axes_dims), eps=c.eps, causal_condition=c.causal_condition)
    ref.load_state_dict(tr.state_dict(), strict=True)
    ref.save_pretrained(str(folder), safe_serialization=True)


def _save_vae(enc: VAEV2Encoder, dec: VAEV2Decoder, folder: Path) -> None:
    from diffusers import AutoencoderKLQwenImage21

    c = dec.config
    ref = AutoencoderKLQwenImage21(
        base_dim=c.base_dim, decoder_base_dim=c.decoder_base_dim, z_dim=c.z_dim, dim_mult=list(c.dim_mult),
        num_res_blocks=c.num_res_blocks, temperal_downsample=list(c.temporal_downsample),
        latents_mean=list(c.latents_mean), latents_std=list(c.latents_std))
    target = ref.state_dict()
    ours = {**enc.state_dict(), **dec.state_dict()}
    # quant_conv outputs [mean; logvar]; we trained the mean rows. A tiny constant log-variance (weights 0,
    # bias -20) makes diffusers' posterior sample equal its mean.
    w, b = ours.pop("quant_conv.weight"), ours.pop("quant_conv.bias")
    ours["quant_conv.weight"] = torch.cat([w, torch.zeros_like(w)])
    ours["quant_conv.bias"] = torch.cat([b, torch.full_like(b, -20.0)])
    ref.load_state_dict({k: v.reshape(target[k].shape) for k, v in ours.items()}, strict=True)
    ref.save_pretrained(str(folder), safe_serialization=True)


def _save_text_encoder(te: TextEncoder, folder: Path, tokenizer_dir: Path) -> None:
    """A loadable ``Qwen3VLForConditionalGeneration``: our text stack plus a random, unused vision tower."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from ..testing import _mrope_section, _vl_token_ids

    c = te.config
    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    token_ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    text = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                head_dim=c.head_dim, max_position_embeddings=4096, rms_norm_eps=c.rms_norm_eps,
                rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta, "mrope_interleaved": True,
                                 "mrope_section": _mrope_section(c.head_dim, (24, 20, 20))})
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=c.hidden_size,
                  num_position_embeddings=64, deepstack_visual_indexes=[0], patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2)
    config = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                           **_vl_token_ids(token_ids, c.vocab_size))
    torch.manual_seed(0)
    ref = Qwen3VLForConditionalGeneration(config).eval()
    state = ref.state_dict()
    prefix = "model.language_model."
    ours = {prefix + k: v for k, v in te.state_dict().items()}
    missing = sorted(k for k in state if k.startswith(prefix) and k not in ours)
    if missing or any(k not in state for k in ours):
        raise RuntimeError(f"text encoder keys do not match Qwen3-VL's: missing {missing[:5]}")
    ref.load_state_dict({**state, **ours}, strict=True)
    ref.save_pretrained(str(folder), safe_serialization=True)


def _write_index(out: Path, sample_sigmas: list[float] | None) -> None:
    import diffusers

    index = {"_class_name": "QwenImage21Pipeline", "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "processor": ["transformers", "Qwen3VLProcessor"],
             "text_encoder": ["transformers", "Qwen3VLForConditionalGeneration"],
             "transformer": ["diffusers", "QwenImage21Transformer2DModel"],
             "vae": ["diffusers", "AutoencoderKLQwenImage21"]}
    if sample_sigmas is not None:
        index["sample_sigmas"] = [float(s) for s in sample_sigmas]
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
