"""Tiny offline checkpoints for the test suite: a byte-level BPE tokenizer with Qwen's special tokens and
random tiny Qwen3-VL / Qwen2.5-VL text encoders written by transformers' own ``save_pretrained``.

Nothing here downloads anything. transformers and diffusers are imported inside the functions that need
them, so importing this module stays cheap (the lead builds whole tiny pipeline directories from it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# Qwen's control tokens, in the order Qwen's tokenizers number them (right after the BPE vocabulary).
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
# Added but not "special" in Qwen's tokenizers: matched whole in text, kept when decoding.
PLAIN_ADDED_TOKENS = (
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
)
# The split Qwen2's tokenizer applies before byte-level BPE (contractions, letters, single digits,
# punctuation runs, newlines, spaces).
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# A Qwen-style chat template written for qwen-edge: one `<|im_start|>role\n...<|im_end|>\n` turn per
# message; content is a string or a list of text / image / video parts, as Qwen-VL processors send it.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}"
    "{%- else %}{%- for part in message.content %}"
    "{%- if part.type == 'image' or 'image' in part %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part.type == 'video' or 'video' in part %}{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in part %}{{- part.text }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
DEFAULT_CORPUS = (
    "A red circle above a blue square on a white background.",
    "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:",
    "Comprehend and analyze the provided prompt.",
    "A capybara wearing a wizard hat, reading a book by candlelight, oil painting.",
    "The quick brown fox jumps over the lazy dog 0123456789 times!",
    "system\nuser\nassistant\n",
    "red green blue yellow orange purple black white gray circle square triangle star left right above "
    "below next to small large tiny big in the middle of the picture",
    "一只猫坐在窗台上，阳光明媚。 café naïve — «quotes» 'single' \"double\" (parens) [brackets]",
)


@dataclass(frozen=True)
class TinyTokenizer:
    """What :func:`train_tiny_tokenizer` wrote: the folder, the full vocabulary size and the ids of the
    control tokens a VL model config refers to."""

    path: Path
    vocab_size: int
    token_ids: dict[str, int]


def copy_sources(repo: Path, dst: Path) -> Path:
    """The package sources of the checkout at ``repo`` copied into ``dst`` (pyproject, README, the four package
    folders; no caches or build leftovers), so pip builds from a private copy, not in the shared tree."""
    import shutil

    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    dst.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(repo / name, dst / name)
    for name in ("edge", "export", "quant", "runtimes"):
        shutil.copytree(repo / name, dst / name, ignore=skip)
    return dst


def train_tiny_tokenizer(out_dir, corpus: list[str] | None = None, vocab_size: int = 1000) -> TinyTokenizer:
    """Train a byte-level BPE tokenizer shaped like Qwen's and write it where ``AutoTokenizer`` and
    ``tokenizers.Tokenizer.from_file`` both load it.

    Writes tokenizer.json, vocab.json, merges.txt, tokenizer_config.json (Qwen2Tokenizer, with the chat
    template) and chat_template.jinja (the file processors read). Training is deterministic. With the
    default corpus the BPE merges saturate below ``vocab_size`` (about 600 tokens in all), and v1's
    template prefix tokenizes into 34 tokens, as with the real Qwen2.5-VL tokenizer.
    """
    from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors,
                            trainers)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(list(corpus or DEFAULT_CORPUS) * 4, trainer=trainer)
    # Added after training so they get the ids after the BPE vocabulary, as in Qwen's tokenizers.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in PLAIN_ADDED_TOKENS])
    tok.save(str(out / "tokenizer.json"))
    tok.model.save(str(out))  # vocab.json + merges.txt, as Qwen's repositories ship them
    _write_tokenizer_config(out, tok)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + PLAIN_ADDED_TOKENS}
    return TinyTokenizer(out, tok.get_vocab_size(with_added_tokens=True), ids)


def _write_tokenizer_config(out: Path, tok) -> None:
    added = {
        str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                  "single_word": False, "special": t in SPECIAL_TOKENS}
        for t in SPECIAL_TOKENS + PLAIN_ADDED_TOKENS
    }
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")],
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": 131072,
        "chat_template": QWEN_CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    (out / "chat_template.jinja").write_text(QWEN_CHAT_TEMPLATE, encoding="utf-8")


_VL_TOKENS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
              "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}


def _vl_token_ids(token_ids: dict[str, int] | None, vocab_size: int) -> dict[str, int]:
    """The VL config's special ids: from the tokenizer when given, else the last ids of the vocabulary."""
    if token_ids:
        return {key: int(token_ids[tok]) for key, tok in _VL_TOKENS.items()}
    return {key: vocab_size - 1 - i for i, key in enumerate(_VL_TOKENS)}


def randomize_(model, std: float = 0.2, seed: int = 0):
    """Overwrite every parameter with seeded noise so no path is zero (reference inits zero some layers):
    norm weights around 1, everything else around 0."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            centre = 1.0 if ("norm" in name and p.ndim == 1) else 0.0
            scale = 0.1 if centre else std
            p.copy_((centre + scale * noise).to(p.dtype))
    return model


def _save(model, out_dir, dtype, max_shard_size) -> Path:
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(out), safe_serialization=True, **kwargs)
    return out


def tiny_qwen3vl_text_encoder(out_dir, vocab_size: int, *, token_ids: dict[str, int] | None = None,
                              hidden_size: int = 32, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                              head_dim: int = 16, intermediate_size: int = 64, rope_theta: float = 5_000_000.0,
                              seed: int = 0, dtype=None, max_shard_size: str | int | None = None) -> Path:
    """A random tiny ``Qwen3VLForConditionalGeneration`` (the 2.1 text encoder) saved to ``out_dir``.

    ``dtype`` (e.g. ``"bfloat16"``) casts before saving; ``max_shard_size`` forces a sharded checkpoint.
    The vision tower is one block of width 16, the smallest the config allows.
    """
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    text = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                head_dim=head_dim, max_position_embeddings=4096, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "mrope_interleaved": True,
                                 "mrope_section": _mrope_section(head_dim, (24, 20, 20))})
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden_size,
                  num_position_embeddings=64, deepstack_visual_indexes=[0], patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2)
    config = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                           **_vl_token_ids(token_ids, vocab_size))
    torch.manual_seed(seed)
    model = randomize_(Qwen3VLForConditionalGeneration(config).eval(), seed=seed)
    return _save(model, out_dir, dtype, max_shard_size)


def tiny_qwen25vl_text_encoder(out_dir, vocab_size: int, *, token_ids: dict[str, int] | None = None,
                               hidden_size: int = 32, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                               intermediate_size: int = 64, rope_theta: float = 1_000_000.0, seed: int = 0,
                               dtype=None, max_shard_size: str | int | None = None) -> Path:
    """A random tiny ``Qwen2_5_VLForConditionalGeneration`` (the v1 text encoder) saved to ``out_dir``.

    Qwen2.5-VL derives head_dim = hidden_size / num_heads; q/k/v carry biases.
    """
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    head_dim = hidden_size // num_heads
    text = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                max_position_embeddings=4096, rms_norm_eps=1e-6, use_sliding_window=False,
                bos_token_id=(token_ids or {}).get("<|endoftext|>"), eos_token_id=(token_ids or {}).get("<|im_end|>"),
                rope_parameters={"rope_type": "default", "rope_theta": rope_theta,
                                 "mrope_section": _mrope_section(head_dim, (16, 24, 24))})
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden_size,
                  fullatt_block_indexes=[0], patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  window_size=112)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                              **_vl_token_ids(token_ids, vocab_size))
    torch.manual_seed(seed)
    model = randomize_(Qwen2_5_VLForConditionalGeneration(config).eval(), seed=seed)
    return _save(model, out_dir, dtype, max_shard_size)


def _mrope_section(head_dim: int, full: tuple[int, int, int]) -> list[int]:
    """Scale the real models' M-RoPE split (of head_dim/2 = 64 frequencies) to a tiny head_dim."""
    half = head_dim // 2
    t, h = full[0] * half // 64, full[1] * half // 64
    return [t, h, half - t - h]


def qwen3vl_processor(folder):
    """A ``Qwen3VLProcessor`` for the tokenizer files in ``folder`` that works without torchvision.

    transformers' Qwen3-VL video processor needs torchvision, which has no CPU build on these machines;
    text-to-image never touches videos, so a stand-in takes its place. Pass the result to the 2.1
    pipeline (``QwenImage21Pipeline(..., processor=qwen3vl_processor(dir))`` or as a ``from_pretrained``
    override). The chat template is read from ``folder`` like a processor would.
    """
    from transformers import AutoTokenizer, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.video_processing_utils import VideoProcessorMixin

    from .prompt import chat_template

    class NoVideoProcessor(VideoProcessorMixin):
        """Stands in for the torchvision-backed video processor; refuses videos."""

        merge_size = 2
        temporal_patch_size = 2

        def preprocess(self, videos, **kwargs):
            raise NotImplementedError("videos are not supported without torchvision")

    class Processor(Qwen3VLProcessor):
        # The base class resolves the expected video processor class through transformers' lazy
        # module table, which is a placeholder without torchvision; accept the stand-in instead.
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and isinstance(argument, NoVideoProcessor):
                return NoVideoProcessor
            return super().check_argument_for_proper_class(argument_name, argument)

    images = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2)
    return Processor(image_processor=images, tokenizer=AutoTokenizer.from_pretrained(str(folder)),
                     video_processor=NoVideoProcessor(), chat_template=chat_template(folder))


# -- whole tiny pipeline directories ------------------------------------------------------------------

# The published Qwen-Image scheduler_config.json (v1; the 2.1 pipeline reads the same keys, with the
# same fallbacks). Tiny checkpoints use it so their sigmas are the real ones.
QWEN_IMAGE_SCHEDULER = {
    "base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 8192,
    "max_shift": 0.9, "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02,
    "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
    "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False,
}
TINY_TRANSFORMER = {
    "qwen-image-2.1": dict(in_channels=16, out_channels=16, num_layers=2, attention_head_dim=32,
                           num_attention_heads=2, context_in_dim=32, axes_dims_rope=(8, 12, 12)),
    "qwen-image": dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32,
                       num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(8, 12, 12)),
}
TINY_VAE = {
    "qwen-image-2.1": dict(base_dim=8, decoder_base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 8, 8], num_res_blocks=1),
    "qwen-image": dict(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                       temperal_downsample=[False, True, True]),
}


def tiny_checkpoint(family: str, out_dir, *, seed: int = 0, dtype=None, max_shard_size: str | int | None = None,
                    scheduler: dict | None = None, sample_sigmas: list[float] | None = None,
                    std: float = 0.2) -> Path:
    """A random tiny diffusers-format pipeline directory of ``family`` ("qwen-image-2.1" or "qwen-image"),
    written by diffusers/transformers' own ``save_pretrained``: model_index.json, transformer/, vae/,
    text_encoder/, tokenizer/ (v1) or processor/ (2.1), scheduler/. Every parameter is random (std ``std``).
    """
    import torch
    from diffusers import (AutoencoderKLQwenImage, AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler,
                           QwenImage21Transformer2DModel, QwenImageTransformer2DModel)

    v21 = family == "qwen-image-2.1"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tiny_tokenizer(out / ("processor" if v21 else "tokenizer"))
    encoder = tiny_qwen3vl_text_encoder if v21 else tiny_qwen25vl_text_encoder
    encoder(out / "text_encoder", tok.vocab_size, token_ids=tok.token_ids, seed=seed, dtype=dtype,
            max_shard_size=max_shard_size)
    torch.manual_seed(seed + 1)
    transformer_cls = QwenImage21Transformer2DModel if v21 else QwenImageTransformer2DModel
    transformer = randomize_(transformer_cls(**TINY_TRANSFORMER[family]).eval(), std=std, seed=seed + 1)
    _save(transformer, out / "transformer", dtype, max_shard_size)
    vae_kw = dict(TINY_VAE[family])
    g = torch.Generator().manual_seed(seed + 2)
    vae_kw["latents_mean"] = (torch.randn(vae_kw["z_dim"], generator=g) * 0.5).tolist()
    vae_kw["latents_std"] = (torch.rand(vae_kw["z_dim"], generator=g) * 2 + 0.5).tolist()
    vae = (AutoencoderKLQwenImage21 if v21 else AutoencoderKLQwenImage)(**vae_kw).eval()
    _save(randomize_(vae, std=std, seed=seed + 2), out / "vae", dtype, max_shard_size)
    FlowMatchEulerDiscreteScheduler.from_config(scheduler or QWEN_IMAGE_SCHEDULER).save_pretrained(out / "scheduler")
    _write_model_index(out, v21, sample_sigmas)
    return out


def _write_model_index(out: Path, v21: bool, sample_sigmas: list[float] | None) -> None:
    import diffusers

    if v21:
        index = {"_class_name": "QwenImage21Pipeline", "processor": ["transformers", "Qwen3VLProcessor"],
                 "text_encoder": ["transformers", "Qwen3VLForConditionalGeneration"],
                 "transformer": ["diffusers", "QwenImage21Transformer2DModel"],
                 "vae": ["diffusers", "AutoencoderKLQwenImage21"]}
        if sample_sigmas is not None:
            index["sample_sigmas"] = list(sample_sigmas)
    else:
        index = {"_class_name": "QwenImagePipeline", "tokenizer": ["transformers", "Qwen2Tokenizer"],
                 "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
                 "transformer": ["diffusers", "QwenImageTransformer2DModel"],
                 "vae": ["diffusers", "AutoencoderKLQwenImage"]}
    index = {"_class_name": index.pop("_class_name"), "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], **index}
    (out / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def reference_pipeline(folder):
    """diffusers' own pipeline for a checkpoint directory (2.1 gets a processor that needs no torchvision)."""
    from diffusers import DiffusionPipeline

    index = json.loads((Path(folder) / "model_index.json").read_text())
    if index["_class_name"] == "QwenImage21Pipeline":
        return DiffusionPipeline.from_pretrained(str(folder), processor=qwen3vl_processor(Path(folder) / "processor"))
    return DiffusionPipeline.from_pretrained(str(folder))
